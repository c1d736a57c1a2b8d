"""Recipe options: one dataclass per recipe, defaults from YAML, overrides from the command line.

    python recipes/<name>.py --config recipes/configs/<name>.yaml [--key value ...]

`--help` lists every field of the dataclass (with its help text). A YAML key or CLI flag the
dataclass does not have is an error that names it and suggests the closest valid name; so is a
YAML value of the wrong type. Nothing is loaded or written before the config is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def _fail(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is typing.Literal:
        return value in args
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def parse_config(cls, argv: list[str] | None = None):
    """Build `cls` from `--config FILE` (optional) and CLI flags; CLI wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # allow_abbrev=False: argparse would otherwise take `--max_len 9` as --max_length and `--resum false` as
    # --resume, silently, while the same typo in the YAML is an error.
    parser = HfArgumentParser(cls, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with defaults for any option below (CLI flags override it)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)

    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    if config_path and not any(a in ("-h", "--help") for a in argv):
        path = Path(config_path)
        if not path.is_file():
            _fail(f"--config {config_path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{config_path}:{mark.line + 1}" if mark else config_path
            _fail(f"{where}: not valid YAML ({getattr(e, 'problem', e)})")
        if not isinstance(values, dict):
            _fail(f"{config_path}: must be a mapping of option: value")
        for key, value in values.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                _fail(f"{config_path}: unknown key {key!r}{hint}; `--help` lists the valid options")
            if hints[key] is str and isinstance(value, bool):
                value = values[key] = "true" if value else "false"  # `packing: true` for an auto|true|false option
            if not _type_ok(value, hints[key]):
                hint = ""
                if isinstance(value, str) and _type_ok(1.0, hints[key]):
                    try:
                        float(value)
                        hint = " (YAML reads a number like 1e-3 as text; write it with a dot: 1.0e-3)"
                    except ValueError:
                        pass
                _fail(f"{config_path}: {key}: {value!r} is not a valid {_type_name(hints[key])}{hint}")
            if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
                values[key] = float(value)  # `epochs: 8` gives 8.0, as `--epochs 8` does
        parser.set_defaults(**values)

    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], fields, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        _fail(f"unknown option {flag!r}{hint}; `--help` lists the valid options")
    kwargs = {k: v for k, v in vars(namespace).items() if k in fields}
    for k, v in kwargs.items():  # `--eval_dataset_path null` on the command line means None, as in YAML
        if isinstance(v, str) and v.lower() in ("null", "none") and _type_ok(None, hints[k]):
            kwargs[k] = None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        _fail(str(e))
