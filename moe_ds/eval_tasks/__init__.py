"""Local lm-eval tasks for offline machines: WikiText-2, ARC-Easy and PIQA over a data folder, and
perplexity on any local text/JSONL file.

lm-eval reads ``dataset_path: json`` tasks with ``data_files`` resolved against the current directory,
not the YAML's, so the shipped YAMLs are templates (``@DATA_DIR@``, ``@TEXT_FILE@``) that
:func:`render_local_tasks` fills with absolute paths into a folder passed to
``TaskManager(include_path=...)`` (or ``lm_eval --include_path``). ``eval_task_utils.py`` is copied beside
them because ``!function`` loads the module from the YAML's folder.
"""

import shutil
from dataclasses import dataclass
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


def render_local_tasks(out_dir: str | Path, data_dir: str | Path | None = None,
                       text_file: str | Path | None = None) -> dict[str, str]:
    """Write the local task YAMLs with absolute paths into ``out_dir``.

    Args:
        out_dir: folder to hold the rendered YAMLs and ``eval_task_utils.py``; give it to
            ``TaskManager(include_path=out_dir)``.
        data_dir: folder laid out like the evaluation data folder (``wikitext2_raw_test_docs.jsonl``, ``arc_easy/``,
            ``piqa/``); when given, ``wikitext``, ``arc_easy`` and ``piqa`` map to local tasks.
        text_file: a ``.jsonl``/``.json`` file of records with a ``text`` (or ``page``) field, or a ``.txt``
            file (one document per blank-line-separated paragraph); when given, ``perplexity`` maps to it.

    Returns:
        Map from user-facing task name (``wikitext``, ``arc_easy``, ``piqa``, ``perplexity``) to the lm-eval
        task name to request.

    Raises:
        FileNotFoundError: when a data file the tasks need is missing.
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
    return names
