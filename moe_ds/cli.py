"""Command lines built from the stages' config dataclasses, and the one way a launcher reports bad input.

Each field's trailing ``# comment`` becomes its ``--help`` text; ``transformers.HfArgumentParser`` turns the
type hints into options (``Literal`` -> choices, ``bool`` -> flag, ``list[X]`` -> several values).
Precedence: dataclass defaults < ``--config FILE`` (JSON/YAML) < flags given on the command line.
"""

import argparse
import dataclasses
import errno
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A command line, config file or config value is unusable (the message names the setting)."""


def field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in ``cls``'s source (and its dataclass bases')."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        name, line = None, 0
        for tok in tokens:
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] != line and name is None:
                name, line = tok.string, tok.start[0]  # first name on an indented class-body line
            elif tok.type == tokenize.COMMENT and name is not None and tok.start[0] == line:
                comments[name] = tok.string.lstrip("#").strip()
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
    return comments


def _or_none(kind: type):
    """An argparse type: ``kind(text)``, or None for "none" (any case)."""
    def convert(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    convert.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return convert


def build_parser(cls, description: str | None = None, exclude: tuple[str, ...] = (),
                 config_file: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of the dataclass ``cls`` (``--field-name`` and ``--field_name``).

    Options left out of the command line are absent from the parsed namespace (so a config file's value is
    not overridden by a default); ``--help`` shows each field's comment and its default.

    Args:
        cls: the stage's config dataclass.
        description: shown above the options (usually the launcher's docstring).
        exclude: fields not offered as options (e.g. nested lists that only a config file can hold).
        config_file: add ``--config FILE`` (JSON or YAML mapping of field names to values).
    """
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    shadow_fields, optional = [], set()
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        text = comments.get(f.name, "")
        text += " (required)" if default is dataclasses.MISSING else f" (default: {default})"
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if type(None) in typing.get_args(hint):
                optional.add(f.name)
            hint = args[0] if len(args) == 1 else hint
        if hint is bool:  # "--flag" sets True, "--no-flag" False, whatever the default
            shadow_fields.append((f.name, bool, dataclasses.field(default=True, metadata={"help": text})))
        else:
            shadow_fields.append((f.name, hint | None, dataclasses.field(default=None, metadata={"help": text})))
    shadow = dataclasses.make_dataclass(cls.__name__, shadow_fields)
    parser = HfArgumentParser(shadow, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)  # "--group" must not silently mean "--groups"
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    if config_file:
        parser.add_argument("--config", metavar="FILE", help="JSON/YAML file of settings (defaults < file < flags)")
    for action in parser._actions:  # absent options stay absent: a file's value must not meet a default
        if action.dest != "help":
            action.default = argparse.SUPPRESS
        if action.dest in optional and action.type in (int, float):  # "--save-total-limit none" means None
            action.type = _or_none(action.type)
        if action.nargs in ("+", "*") and type(action) is argparse._StoreAction:
            action.__class__ = argparse._ExtendAction  # "--groups a --groups b" keeps both
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"turn --{action.dest.replace('_', '-')} off"
    return parser


def load_settings_file(path: str | Path, cls=None) -> dict:
    """Settings from a JSON or YAML mapping; with ``cls``, every key must be one of its fields.

    Raises:
        ConfigError: missing file, unparsable, not a mapping, or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {path} is not valid {kind}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    if cls is not None:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"config file {path}: unknown setting(s) {unknown}")
    return data


def from_mapping(cls, values: dict, what: str):
    """``cls(**values)`` with one-line errors: unknown keys, missing required fields, and ``__post_init__`` checks.

    Raises:
        ConfigError: not a mapping, unknown or missing settings, or a value ``cls`` rejects (its own
            ``ValueError`` subclasses pass through unchanged).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a {what} must be a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {what} setting(s) {unknown}; known: {sorted(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{what}: missing required setting(s) "
                          f"{', '.join('--' + m.replace('_', '-') for m in missing)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        if type(e) not in (TypeError, ValueError):  # the stage's own error class: already a full message
            raise
        raise ConfigError(f"{what}: {e}") from e


def parse_config(cls, argv=None, description: str | None = None, exclude: tuple[str, ...] = (),
                 config_file: bool = False, what: str = "settings"):
    """Parse a launcher's command line into the stage's config (defaults < ``--config`` file < flags).

    Raises:
        ConfigError: see ``load_settings_file`` and ``from_mapping``; argparse exits 2 on unknown flags.
    """
    parser = build_parser(cls, description, exclude, config_file)
    given = vars(parser.parse_args(argv))
    given.pop("local_rank", None)
    settings = load_settings_file(given.pop("config"), cls) if given.get("config") else {}
    settings.update(given)
    return from_mapping(cls, settings, what)


def run(prog: str, main, errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a launcher's ``main()``; the stage's known errors become ``PROG: error: MESSAGE`` and exit code 2.

    A full disk (or a file-size limit) is reported the same way: every stage resumes, so the message says to
    free space and rerun. Ctrl-C exits 130 with one line. Anything else is a bug and keeps its traceback.
    """
    try:
        main()
    except (ConfigError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        code = _errno_of(e)
        if code not in _DISK_FULL:
            raise
        where = getattr(e, "filename", None) or "the output"
        print(f"{prog}: error: {os.strerror(code)} writing {where}; free space and rerun the same command to "
              f"resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ERRNO_TEXT = re.compile(r"(?:os error|errno =|Errno) ?(\d+)")  # safetensors (Rust) and HDF5 wrap the errno in text


def _errno_of(error: BaseException) -> int | None:
    """The errno behind an exception: OSError.errno, else one named in its message (or its causes')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        m = _ERRNO_TEXT.search(str(error))
        if m:
            return int(m.group(1))
        error = error.__cause__ or error.__context__
    return None
