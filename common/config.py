"""Recipe options: one dataclass per recipe, defaults from YAML, overrides from the command line.

    python recipes/<name>.py [--config recipes/configs/<name>.yaml] [--key value ...]

Defaults come from one place: the recipe's own YAML, recipes/configs/<recipe file name>.yaml, is read
when no --config is given (so `python recipes/x.py`, `bash launch/x.sh` and `--help` show and run the
same values); the dataclass defaults apply only to options that YAML leaves out. `--help` lists every
field with the default that will run. A YAML key or CLI flag the dataclass does not have is an error
that names it and suggests the closest valid name; so is a value of the wrong type, or out of range
(STANDARD_BOUNDS for the option names the recipes share, or a field's own `min`/`max`/`gt`/`lt`
metadata). Every error is one `error:` line and exit 2; nothing is loaded or written before the
config is valid.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser


class ConfigError(Exception):
    """A bad option; parse_config prints it as one `error:` line and exits 2."""


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


# ---- value bounds --------------------------------------------------------------------------------
# The option names the recipes share (HF conventions) and the values each accepts; a field's own metadata
# keys min (>=), max (<=), gt (>), lt (<) override these (e.g. `"min": 0` where 0 means "off"). Any float
# field whose name ends in `_learning_rate` takes learning_rate's bounds.
STANDARD_BOUNDS: dict[str, dict] = {
    "learning_rate": {"gt": 0},
    "per_device_train_batch_size": {"min": 1},
    "gradient_accumulation_steps": {"min": 1},
    "max_steps": {"min": -1, "why": "-1 trains for num_train_epochs"},
    "num_train_epochs": {"gt": 0, "only_if": lambda v: v.get("max_steps", -1) <= 0,
                         "only_if_text": "when --max_steps is {max_steps}",
                         "why": "or set --max_steps N > 0"},
    "save_steps": {"min": 1},
    "logging_steps": {"min": 1},
    "eval_steps": {"min": 0},
    "lora_r": {"min": 1},
    "lora_alpha": {"gt": 0},
    "lora_dropout": {"min": 0, "lt": 1},
    "max_length": {"min": 16, "why": "a chat template alone takes more tokens than that"},
    "warmup_steps": {"min": 0},
    "eval_split": {"min": 0, "lt": 1, "why": "the fraction of the training file held out; 0: no split"},
    "weight_decay": {"min": 0},
    "max_grad_norm": {"min": 0, "why": "0 turns clipping off"},
    "save_total_limit": {"min": 1, "why": "null keeps every checkpoint"},
    "seed": {"min": 0, "max": 2**32 - 1},
    "max_new_tokens": {"min": 1},
    "sample_generations": {"min": 0},
    "temperature": {"gt": 0},
    "memory_budget_gb": {"gt": 0},
}
_BOUND_KEYS = ("min", "max", "gt", "lt")
_OUR_METADATA = (*_BOUND_KEYS, "why", "only_if", "only_if_text")
_BOUND_TEXT = {"min": ">=", "max": "<=", "gt": ">", "lt": "<"}


def bounds_for(f: dataclasses.Field) -> dict:
    """The bounds that apply to field `f`: STANDARD_BOUNDS by name, overridden by the field's metadata."""
    rule = dict(STANDARD_BOUNDS.get(f.name) or (STANDARD_BOUNDS["learning_rate"] if f.name.endswith("_learning_rate")
                                                 else {}))
    own = {k: f.metadata[k] for k in _OUR_METADATA if k in f.metadata}
    if any(k in own for k in _BOUND_KEYS):  # the field states its own range: the standard one no longer applies
        rule = {k: v for k, v in rule.items() if k not in _BOUND_KEYS}
    rule.update(own)
    return rule


def _out_of_bounds(value, rule: dict, values: dict) -> str | None:
    """Why `value` breaks `rule` ("must be >= 1"), or None when it is fine (None values are "not set")."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not any(k in rule for k in _BOUND_KEYS):
        return None
    if "only_if" in rule and not rule["only_if"](values):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    broken = [k for k in _BOUND_KEYS if k in rule and not {
        "min": value >= rule.get("min", 0), "max": value <= rule.get("max", 0),
        "gt": value > rule.get("gt", 0), "lt": value < rule.get("lt", 0)}[k]]
    if not broken:
        return None
    lower = [f"{_BOUND_TEXT[k]} {rule[k]}" for k in ("min", "gt") if k in rule]
    upper = [f"{_BOUND_TEXT[k]} {rule[k]}" for k in ("max", "lt") if k in rule]
    text = "must be " + " and ".join(lower + upper)
    if "only_if_text" in rule:
        try:
            text += " " + rule["only_if_text"].format(**values)
        except KeyError:  # the condition names an option this recipe does not have
            pass
    return text


def _short_help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    text = re.split(r"; |: | \(", text, maxsplit=1)[0].strip()
    return text if len(text) <= 80 else text[:77] + "..."


# Short names for library fields in error lines (TrainingArguments' own help texts are paragraphs).
LIBRARY_HELP = {"learning_rate": "peak learning rate", "per_device_train_batch_size": "micro-batch size",
                "gradient_accumulation_steps": "micro-batches per optimizer step", "max_steps": "optimizer steps",
                "num_train_epochs": "epochs", "save_steps": "checkpoint every N optimizer steps", "warmup_steps": "warmup",
                "seed": "random seed", "logging_steps": "log every N optimizer steps", "eval_steps": "evaluate every N steps",
                "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping",
                "save_total_limit": "keep at most N checkpoints", "max_length": "tokens per example"}


def check_values(cls, values: dict, where) -> None:
    """Every field of `cls` in range, else ConfigError naming the option, its value, where it was set and
    the range. `where(name)` says where a value came from: ("cli", raw text) / ("yaml", path, line) / None."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        rule = bounds_for(f)
        problem = _out_of_bounds(values[f.name], rule, values)
        if problem is None:
            continue
        own_help = LIBRARY_HELP.get(f.name) if _is_library(cls) else None
        notes = [n for n in (own_help or _short_help(f), rule.get("why")) if n]
        note = f" ({'; '.join(dict.fromkeys(notes))})" if notes else ""
        source = where(f.name)
        if source and source[0] == "cli":
            raise ConfigError(f"--{f.name} {source[1]}: {problem}{note}")
        if source and source[0] == "yaml":
            raise ConfigError(f"{source[1]}:{source[2]}: {f.name}: {values[f.name]!r} {problem}{note}; fix it there or override "
                  f"it with --{f.name}")
        raise ConfigError(f"the default {f.name} = {values[f.name]!r} of {cls.__name__} {problem}{note}; pass --{f.name}")


# ---- where defaults come from ----------------------------------------------------------------------
def recipe_file(cls) -> Path | None:
    """The script that defines `cls` (a recipe run as __main__, by runpy, or imported from its file)."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def default_config_path(cls) -> Path | None:
    """recipes/configs/<recipe file name>.yaml, read when no --config is given; None if there is none
    (a copied recipe without its own YAML runs its dataclass defaults, and --help says so)."""
    file = recipe_file(cls)
    if file is None:
        return None
    path = file.parent / "configs" / f"{file.stem}.yaml"
    return path if path.is_file() else None


def _display(path: Path | str) -> str:
    path = str(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


# ---- the parser ------------------------------------------------------------------------------------
_ARGPARSE_VALUE = re.compile(r"argument (?P<flags>\S+): invalid (?P<type>\S+) value: '(?P<value>.*)'$")
_ARGPARSE_CHOICE = re.compile(r"argument (?P<flags>\S+): invalid choice: '(?P<value>.*)' \(choose from (?P<choices>.*)\)$")
_ARGPARSE_BOOL = re.compile(r"argument (?P<flags>\S+): Truthy value expected: got (?P<value>.*) but expected one of")
_TYPE_WORDS = {"int": "not an int", "float": "not a float", "string_to_bool": "not a bool (true or false)"}


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (`error: --learning_rate abc: not a float`), not the
    whole usage text with the useful line last. Bounds in field metadata are for check_values, not argparse.
    With several dataclasses, a field is added once: the recipe's own dataclass (first) shadows a library
    field of the same name, and `hidden` library fields (set by the recipe from its own option) are left out."""

    def __init__(self, dataclass_types, hidden=(), **kwargs):
        self._taken, self._hidden = set(), set(hidden)
        super().__init__(dataclass_types, **kwargs)

    def _add_dataclass_arguments(self, dtype):
        if len(self.dataclass_types) > 1:  # --help groups the recipe's options apart from the library's
            dtype = type(dtype.__name__, (dtype,), {"_argument_group_name": f"{dtype.__name__} options"})
        super()._add_dataclass_arguments(dtype)

    def _parse_dataclass_field(self, parser, field: dataclasses.Field):
        if field.name in self._taken or field.name in self._hidden:
            return
        self._taken.add(field.name)
        field = copy.copy(field)
        field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k not in _OUR_METADATA})
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str) -> typing.NoReturn:
        m = _ARGPARSE_VALUE.match(message)
        if m:
            what = _TYPE_WORDS.get(m["type"], f"not a valid {m['type']}")
            _fail(f"{m['flags'].split('/')[0]} {m['value']}: {what}")
        m = _ARGPARSE_BOOL.match(message)
        if m:
            _fail(f"{m['flags'].split('/')[0]} {m['value']}: not a bool (true or false)")
        m = _ARGPARSE_CHOICE.match(message)
        if m:
            _fail(f"{m['flags'].split('/')[0]} {m['value']}: choose one of {m['choices']}")
        message = re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1: ", message)
        _fail(f"{message}; `--help` lists the valid options")


def _load_yaml(path: Path, shown: str, fields: dict, hints: dict) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {shown}: no such file")
    text = path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark else shown
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{shown}: must be a mapping of option: value")
    for key, value in values.items():
        if key not in fields:
            close = closest_option(key, fields)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(f"{shown}: unknown key {key!r}{hint}; `--help` lists the valid options")
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
            raise ConfigError(f"{shown}: {key}: {value!r} is not a valid {_type_name(hints[key])}{hint}")
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)  # `epochs: 8` gives 8.0, as `--epochs 8` does
    return values


def _yaml_line(path: Path, key: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(rf"{re.escape(key)}\s*:", line):
            return number
    return 1


def _cli_values(argv: list[str], fields: dict) -> dict[str, str]:
    """The raw text of each option given on the command line (the last one wins, as in argparse)."""
    given = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name.startswith("no_") and name[3:] in fields and name not in fields:
            given[name[3:]] = "false"
            continue
        if name in fields:
            if not eq:
                rest = []
                for token in argv[i + 1:]:
                    if token.startswith("--"):
                        break
                    rest.append(token)
                value = " ".join(rest)
            given[name] = value
    return given


# Library fields a recipe sets from one of its own options, when its dataclass has that option: `--precision auto`
# picks bf16/fp16 for the hardware and `--device` picks use_cpu, so the library's flags would only disagree with them.
SET_BY_RECIPE = {"bf16": "precision", "fp16": "precision", "use_cpu": "device",
                 "activation_checkpointing": "gradient_checkpointing"}
# What a library config gets unless the YAML or the command line says otherwise.
LIBRARY_DEFAULTS = {"report_to": "none", "logging_first_step": True}


def _is_library(cls) -> bool:
    return any(c.__module__.split(".")[0] in ("transformers", "trl") for c in cls.__mro__)


def closest_option(name: str, fields) -> str | None:
    """The option a typo most likely meant: among difflib's close matches, the longest shared prefix
    (so `lora_rank` suggests `lora_r`, not TrainingArguments' `local_rank`)."""
    close = difflib.get_close_matches(str(name), list(fields), n=3)
    if not close:
        return None
    return max(close, key=lambda c: (len(os.path.commonprefix([c, str(name)])), -close.index(c)))


def _option_fields(classes: tuple) -> tuple[dict, dict, dict, set]:
    """The options of `classes` by name: field, owning class, type hint; and the SET_BY_RECIPE names hidden."""
    own = {f.name for f in dataclasses.fields(classes[0])}
    hidden = {name for name, by in SET_BY_RECIPE.items() if by in own} if len(classes) > 1 else set()
    fields, owner, hints = {}, {}, {}
    for c in classes:
        c_hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if f.init and f.name not in fields and f.name not in hidden:
                fields[f.name], owner[f.name], hints[f.name] = f, c, c_hints[f.name]
    return fields, owner, hints, hidden


def option_defaults(cls) -> dict[str, object]:
    """Every option a recipe accepts (its CONFIGS, as parse_config sees them) and its dataclass default."""
    classes = tuple(cls) if isinstance(cls, tuple) else (cls,)
    fields, owner, _, _ = _option_fields(classes)
    out = {}
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
        else:
            out[name] = None
        if _is_library(owner[name]) and name in LIBRARY_DEFAULTS:
            out[name] = LIBRARY_DEFAULTS[name]
    return out


def load_recipe(path: str | Path):
    """Import a recipe file as a module (for its CONFIGS and main) without running it."""
    import importlib.util

    path = Path(path).resolve()
    name = f"_recipe_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def parse_config(cls, argv: list[str] | None = None, default_config: str | Path | None = None):
    """Build `cls` from `--config FILE` (default: `default_config`, else the recipe's own
    recipes/configs/<name>.yaml when it exists) and CLI flags; CLI wins. Exit 2 with one line on any error.

    `cls` may be a tuple: the recipe's own dataclass first, then library configs (TrainingArguments,
    DPOConfig, ...), parsed together from one YAML and one command line; a tuple of instances is returned.
    A field of the recipe's dataclass shadows a library field of the same name (the recipe sets the library's
    from it), and so do the SET_BY_RECIPE fields. A library config's output_dir defaults to runs/<recipe file
    name>; it is built for the CPU (use_cpu, no bf16/fp16) until the recipe has chosen the device and precision."""
    classes = tuple(cls) if isinstance(cls, tuple) else (cls,)
    argv = list(sys.argv[1:] if argv is None else argv)
    fields, owner, hints, hidden = _option_fields(classes)
    wants_help = any(a in ("-h", "--help") for a in argv)

    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    implicit = config_path is None
    if implicit:
        default_config = default_config or default_config_path(classes[0])
        config_path = str(default_config) if default_config else None
    shown = _display(config_path) if config_path else None

    # allow_abbrev=False: argparse would otherwise take `--max_len 9` as --max_length and `--resum false` as
    # --resume, silently, while the same typo in the YAML is an error.
    parser = _Parser(list(classes), hidden=hidden, allow_abbrev=False)
    parser.add_argument("--config", default=shown if implicit else None,
                        help="YAML file with defaults for any option below (CLI flags override it); without it, "
                             "the recipe's own recipes/configs/<name>.yaml")
    file = recipe_file(classes[0])
    library_defaults = {}
    for name, value in {**LIBRARY_DEFAULTS, "output_dir": f"runs/{file.stem}" if file else None}.items():
        if name in fields and _is_library(owner[name]) and value is not None:
            library_defaults[name] = value
    parser.set_defaults(**library_defaults)
    values: dict = {}
    if config_path:
        try:
            values = _load_yaml(Path(config_path), shown if implicit else config_path, fields, hints)
        except ConfigError as e:
            if not wants_help:
                _fail(str(e))
            parser.epilog = f"note: the defaults above are the dataclass's: {e}"
        else:
            parser.set_defaults(**values)
            if wants_help:
                parser.epilog = f"Defaults shown: {shown} where it sets an option, else the recipe's dataclass."
    elif wants_help and file is not None:
        parser.epilog = (f"Defaults shown: the dataclass in {_display(file)} (there is no "
                         f"{_display(file.parent / 'configs' / (file.stem + '.yaml'))}).")

    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        if name in hidden:
            _fail(f"{flag}: this recipe sets it from --{SET_BY_RECIPE[name]}; `--help` lists the valid options")
        close = closest_option(name, fields)
        hint = f" (did you mean --{close}?)" if close else ""
        _fail(f"unknown option {flag!r}{hint}; `--help` lists the valid options")
    kwargs = {k: v for k, v in vars(namespace).items() if k in fields}
    for k, v in kwargs.items():  # `--eval_dataset_path null` on the command line means None, as in YAML
        nulls = ("null",) if _is_library(owner[k]) else ("null", "none")  # report_to: none is a value there
        if isinstance(v, str) and v.lower() in nulls and _type_ok(None, hints[k]):
            kwargs[k] = None

    cli = _cli_values(argv, fields)

    def where(name):
        if name in cli:
            return ("cli", cli[name])
        if name in values:
            return ("yaml", shown if implicit else config_path, _yaml_line(Path(config_path), name))
        return None

    built = []
    for c in classes:
        mine = {k: v for k, v in kwargs.items() if owner[k] is c}
        try:
            check_values(c, mine, where)
        except ConfigError as e:
            _fail(str(e))
        if hidden and _is_library(c):  # the recipe sets these once it knows the device (Run.library_args)
            mine.update({k: v for k, v in (("use_cpu", True), ("bf16", False), ("fp16", False))
                         if k in {f.name for f in dataclasses.fields(c)} and k in hidden})
        try:
            built.append(c(**mine))
        except (TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            _fail(f"{c.__name__}: {first}" if _is_library(c) else str(e))
    return tuple(built) if isinstance(cls, tuple) else built[0]


def options_set_by_user(cls, argv: list[str] | None = None) -> set[str]:
    """The options given in the --config YAML (or the recipe's own YAML when there is no --config) or as
    --flags: what the user pinned, as opposed to defaults a recipe may still decide for itself."""
    classes = tuple(cls) if isinstance(cls, tuple) else (cls,)
    argv = list(sys.argv[1:] if argv is None else argv)
    names, config = set(), None
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if name == "config":
                config = value or (argv[i + 1] if i + 1 < len(argv) else None)
            else:
                names.add(name)
    config = config or default_config_path(classes[0])
    if config:
        names |= set(yaml.safe_load(Path(config).read_text()) or {})
    return names
