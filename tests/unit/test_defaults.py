"""One source of defaults: every recipe's and harness's own YAML is what runs with no --config, and what
its --help shows as the default of each option the YAML sets."""
import importlib.util
import re
import sys
from dataclasses import fields

import pytest
import yaml

from common.config import parse_config
from conftest import REPO

SCRIPTS = sorted(p for folder in ("recipes", "harnesses") for p in (REPO / folder).glob("*.py")
                 if (p.parent / "configs" / f"{p.stem}.yaml").is_file())


def load(path):
    name = f"_defaults_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and parse_config look the module up
    spec.loader.exec_module(module)
    return module


def value_of(parsed, name):
    for part in parsed if isinstance(parsed, tuple) else (parsed,):
        if name in {f.name for f in fields(part)}:
            value = getattr(part, name)
            return getattr(value, "value", value)
    raise AssertionError(f"{name} is not an option")


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.stem}" for p in SCRIPTS])
def test_help_and_the_yaml_agree(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = load(script)
    classes = getattr(module, "CONFIGS", getattr(module, "Config", None))
    if classes is None:
        pytest.skip(f"{script.name} has no Config")
    raw = yaml.safe_load((script.parent / "configs" / f"{script.stem}.yaml").read_text()) or {}
    parsed = parse_config(classes, [])
    for key, expected in raw.items():
        got = value_of(parsed, key)
        if key == "report_to" and expected == "none":
            assert got in ([], "none"), key
            continue
        assert got == expected, f"{script.name}: {key}: runs {got!r}, the YAML says {expected!r}"
    with pytest.raises(SystemExit) as e:
        parse_config(classes, ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index(" options: "):]  # past the usage line
    for key, expected in raw.items():
        start = re.search(rf" --{key} (\[?[A-Z0-9_]+\]?|{{[^}}]*}})[ ,]", text)
        assert start, f"{script.name}: --{key} is not in --help"
        following = re.search(r" --[a-z][a-z0-9_]* (\[?[A-Z0-9_]+|{)", text[start.end():])
        segment = text[start.end():start.end() + following.start()] if following else text[start.end():]
        shown = segment.rsplit("(default: ", 1)
        assert len(shown) == 2, f"{script.name}: --{key} shows no default in --help"
        shown = shown[1].rsplit(")", 1)[0].replace(" ", "")
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            assert float(shown) == expected, f"{script.name}: --help shows {key} {shown}, the YAML {expected}"
        elif key != "report_to":
            assert shown == str(expected).replace(" ", ""), f"{script.name}: --help shows {key} {shown}, the YAML {expected}"
