"""common.config.parse_config: YAML defaults, CLI overrides, and a clear exit-2 error for every bad option."""
import importlib.util
import os
import runpy
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pytest
import yaml

from common.config import parse_config
from conftest import REPO

RECIPE = REPO / "recipes" / "sft_memory_diet.py"
RECIPE_YAML = REPO / "recipes" / "configs" / "sft_memory_diet.yaml"


@dataclass
class Small:
    name: str = field(default="base", metadata={"help": "a name"})
    max_length: int = field(default=128, metadata={"help": "tokens"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak lr"})
    flag: bool = field(default=True, metadata={"help": "a switch"})
    eval_path: str | None = field(default=None, metadata={"help": "optional path"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj"], metadata={"help": "modules"})


@dataclass
class Checked:
    lr: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def fails(capsys, cls, argv):
    """parse_config must exit 2; returns its stderr."""
    with pytest.raises(SystemExit) as e:
        parse_config(cls, argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- values ---------------------------------------------------------------------------------------
def test_no_config_gives_dataclass_defaults():
    assert parse_config(Small, []) == Small()


def test_yaml_sets_every_type(tmp_path):
    path = write(tmp_path, "name: tuned\nmax_length: 64\nlearning_rate: 2.0e-4\nflag: false\n"
                           "eval_path: data/x.jsonl\nlora_target_modules: [q_proj, k_proj, v_proj]\n")
    assert parse_config(Small, ["--config", str(path)]) == Small(
        name="tuned", max_length=64, learning_rate=2e-4, flag=False, eval_path="data/x.jsonl",
        lora_target_modules=["q_proj", "k_proj", "v_proj"])


def test_empty_yaml_gives_defaults(tmp_path):
    assert parse_config(Small, ["--config", str(write(tmp_path, "# nothing set\n"))]) == Small()


def test_cli_overrides_yaml(tmp_path):
    path = write(tmp_path, "learning_rate: 2.0e-4\nmax_length: 64\nflag: true\neval_path: a.jsonl\n"
                           "lora_target_modules: [gate_proj]\n")
    cfg = parse_config(Small, ["--config", str(path), "--learning_rate", "1e-3", "--flag", "false",
                               "--lora_target_modules", "q_proj", "v_proj", "--eval_path", "b.jsonl"])
    assert cfg == Small(max_length=64, learning_rate=1e-3, flag=False, eval_path="b.jsonl",
                        lora_target_modules=["q_proj", "v_proj"])
    # order does not matter, and --config=FILE works too
    cfg = parse_config(Small, ["--learning_rate=1e-3", f"--config={path}"])
    assert (cfg.learning_rate, cfg.max_length) == (1e-3, 64)


@pytest.mark.parametrize("argv, expected", [
    (["--flag", "false"], False), (["--flag", "False"], False), (["--flag", "no"], False), (["--flag", "0"], False),
    (["--flag", "true"], True), (["--flag"], True), (["--no_flag"], False),
])
def test_bool_from_cli(tmp_path, argv, expected):
    assert parse_config(Small, argv).flag is expected
    # also when the YAML said the opposite
    path = write(tmp_path, f"flag: {str(not expected).lower()}\n")
    assert parse_config(Small, ["--config", str(path)] + argv).flag is expected


def test_yaml_int_for_float_field_becomes_float(tmp_path):
    cfg = parse_config(Small, ["--config", str(write(tmp_path, "learning_rate: 1\n"))])
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float


def test_post_init_error_exits_2(capsys):
    assert fails(capsys, Checked, ["--lr", "-1"]) == "error: lr must be > 0, got -1.0\n"


# ---- unknown keys and flags -----------------------------------------------------------------------
def test_unknown_yaml_key_names_it_and_suggests(tmp_path, capsys):
    path = write(tmp_path, "max_length: 64\nlearnin_rate: 1.0e-3\n")
    err = fails(capsys, Small, ["--config", str(path)])
    assert err == (f"error: {path}: unknown key 'learnin_rate' (did you mean 'learning_rate'?); "
                   "`--help` lists the valid options\n")


def test_unknown_yaml_key_without_close_match(tmp_path, capsys):
    path = write(tmp_path, "zzz: 1\n")
    err = fails(capsys, Small, ["--config", str(path)])
    assert err == f"error: {path}: unknown key 'zzz'; `--help` lists the valid options\n"


def test_unknown_yaml_key_is_reported_even_when_cli_sets_it_right(tmp_path, capsys):
    path = write(tmp_path, "learnin_rate: 1.0e-3\n")
    err = fails(capsys, Small, ["--config", str(path), "--learning_rate", "1e-3"])
    assert "unknown key 'learnin_rate'" in err


@pytest.mark.parametrize("argv, flag, suggestion", [
    (["--learnin_rate", "1e-3"], "--learnin_rate", "--learning_rate"),
    (["--learnin_rate=1e-3"], "--learnin_rate=1e-3", "--learning_rate"),
    (["--max_lenght", "64"], "--max_lenght", "--max_length"),
    # a prefix of a real option is not that option (argparse would silently accept it by default)
    (["--max_len", "64"], "--max_len", "--max_length"),
    (["--fla", "false"], "--fla", "--flag"),
])
def test_unknown_cli_flag_names_it_and_suggests(capsys, argv, flag, suggestion):
    err = fails(capsys, Small, ["--max_length", "32"] + argv)
    assert err == f"error: unknown option {flag!r} (did you mean {suggestion}?); `--help` lists the valid options\n"


def test_unknown_cli_flag_without_close_match(capsys):
    err = fails(capsys, Small, ["--zzz", "1"])
    assert err == "error: unknown option '--zzz'; `--help` lists the valid options\n"


def test_stray_positional_argument_is_an_error(capsys):
    err = fails(capsys, Small, ["--max_length", "32", "64"])
    assert err.startswith("error: unknown option '64'")


@pytest.mark.parametrize("argv, line", [
    (["--max_length", "long"], "error: --max_length long: not an int"),
    (["--learning_rate", "abc"], "error: --learning_rate abc: not a float"),
    (["--learning-rate", "abc"], "error: --learning_rate abc: not a float"),
    (["--flag", "maybe"], "error: --flag maybe: not a bool (true or false)"),
    (["--lora_target_modules"], "error: --lora_target_modules: expected at least one argument; `--help` lists the "
                                "valid options"),
])
def test_bad_cli_value_is_one_line_without_usage(capsys, argv, line):
    """argparse would print the whole usage (38 lines for the SFT recipe) before the one useful line."""
    assert fails(capsys, Small, argv) == line + "\n"


# ---- wrong YAML types ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('max_length: "long"\n', "max_length: 'long' is not a valid int"),
    ("max_length: 1.5\n", "max_length: 1.5 is not a valid int"),
    ("max_length: true\n", "max_length: True is not a valid int"),
    ("max_length: null\n", "max_length: None is not a valid int"),
    ("learning_rate: fast\n", "learning_rate: 'fast' is not a valid float"),
    ("learning_rate: true\n", "learning_rate: True is not a valid float"),
    ('flag: "false"\n', "flag: 'false' is not a valid bool"),
    ("flag: 1\n", "flag: 1 is not a valid bool"),
    ("name: 123\n", "name: 123 is not a valid str"),
    ("eval_path: 3\n", "eval_path: 3 is not a valid str | None"),
    ("lora_target_modules: q_proj\n", "lora_target_modules: 'q_proj' is not a valid list[str]"),
    ("lora_target_modules: [q_proj, 7]\n", "lora_target_modules: ['q_proj', 7] is not a valid list[str]"),
])
def test_wrong_yaml_type_names_the_key(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    assert fails(capsys, Small, ["--config", str(path)]) == f"error: {path}: {message}\n"


def test_yaml_1e3_is_text_and_the_error_says_how_to_write_it(tmp_path, capsys):
    path = write(tmp_path, "learning_rate: 1e-3\n")  # YAML 1.1 (PyYAML): no dot -> a string
    err = fails(capsys, Small, ["--config", str(path)])
    assert err == (f"error: {path}: learning_rate: '1e-3' is not a valid float "
                   "(YAML reads a number like 1e-3 as text; write it with a dot: 1.0e-3)\n")


# ---- broken config files ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["- name\n- max_length\n", "just text\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, capsys, text):
    path = write(tmp_path, text)
    assert fails(capsys, Small, ["--config", str(path)]) == f"error: {path}: must be a mapping of option: value\n"


def test_missing_config_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert fails(capsys, Small, ["--config", str(path)]) == f"error: --config {path}: no such file\n"
    assert fails(capsys, Small, ["--config", str(tmp_path)]) == f"error: --config {tmp_path}: no such file\n"


@pytest.mark.parametrize("text, line, problem", [
    ("name: a\nmax_length: 3\n  flag: x\n", 3, "mapping values are not allowed here"),
    ("name: a\nlora_target_modules: [q_proj, v_proj\nflag: true\n", 3, "expected ',' or ']', but got ':'"),
])
def test_invalid_yaml_names_file_and_line(tmp_path, capsys, text, line, problem):
    path = write(tmp_path, text)
    assert fails(capsys, Small, ["--config", str(path)]) == f"error: {path}:{line}: not valid YAML ({problem})\n"


def test_config_flag_without_value(capsys):
    err = fails(capsys, Small, ["--config"])
    assert err == "error: --config: expected one argument; `--help` lists the valid options\n"


# ---- --help ----------------------------------------------------------------------------------------
def test_help_lists_every_field_and_skips_the_config(tmp_path, capsys):
    broken = write(tmp_path, "learnin_rate: [\n")  # --help must work even with a broken config
    with pytest.raises(SystemExit) as e:
        parse_config(Small, ["--config", str(broken), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in fields(Small):
        assert f"--{f.name}" in out
        assert f.metadata["help"] in out
    assert "--config" in out


# ---- the real recipe Config ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_config():
    spec = importlib.util.spec_from_file_location("sft_memory_diet_under_test", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses needs the module registered
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module.CONFIGS


class Merged:
    """The recipe's Config and TrainingArguments as one namespace (a recipe's options are the union)."""

    def __init__(self, parsed):
        self.parts = parsed if isinstance(parsed, tuple) else (parsed,)

    def __getattr__(self, name):
        for part in self.parts:
            if name in {f.name for f in fields(part)}:
                return getattr(part, name)
        raise AttributeError(name)


def parse(classes, argv):
    return Merged(parse_config(classes, argv))


def as_value(v):
    return getattr(v, "value", v)


def test_recipe_yaml_loads_exactly(recipe_config):
    raw = yaml.safe_load(RECIPE_YAML.read_text())
    cfg = parse(recipe_config, ["--config", str(RECIPE_YAML)])
    assert {k: as_value(getattr(cfg, k)) for k in raw if k != "report_to"} == {k: v for k, v in raw.items() if k != "report_to"}
    assert cfg.report_to == []  # TrainingArguments' spelling of `none`
    own, _ = recipe_config
    resolved, defaults = asdict(cfg.parts[0]), asdict(own())
    assert {k: v for k, v in resolved.items() if k not in raw} == {k: v for k, v in defaults.items() if k not in raw}
    assert type(cfg.num_train_epochs) is float  # YAML says 8


def test_recipe_cli_overrides(recipe_config):
    cfg = parse(recipe_config, ["--config", str(RECIPE_YAML), "--learning_rate", "5e-4",
                                "--lora_target_modules", "q_proj", "v_proj", "--gradient_checkpointing", "true",
                                "--resume", "false", "--save_total_limit", "2", "--eval_dataset_path", "x.jsonl"])
    assert (cfg.learning_rate, cfg.lora_target_modules, cfg.gradient_checkpointing, cfg.resume,
            cfg.save_total_limit, cfg.eval_dataset_path) == (5e-4, ["q_proj", "v_proj"], "true", False, 2, "x.jsonl")
    assert cfg.per_device_train_batch_size == 4  # still from the YAML


def test_recipe_wrong_yaml_type(recipe_config, tmp_path, capsys):
    path = write(tmp_path, "max_length: long\n")
    assert fails(capsys, recipe_config, ["--config", str(path)]) == f"error: {path}: max_length: 'long' is not a valid int\n"
    path = write(tmp_path, "save_total_limit: three\n")
    assert fails(capsys, recipe_config, ["--config", str(path)]) == (
        f"error: {path}: save_total_limit: 'three' is not a valid int | None\n")


@pytest.fixture(scope="module", autouse=True)
def typo_run(tmp_path_factory):
    """The recipe as a real subprocess with a typo in its YAML; started when this module starts so its
    imports (torch, transformers: seconds) overlap with the in-process tests."""
    tmp = tmp_path_factory.mktemp("recipe_cli")
    out_dir = tmp / "run_out"
    typo = tmp / "typo.yaml"
    typo.write_text(f"output_dir: {out_dir}\nmodel_name_or_path: asset:tiny\nlearnin_rate: 1.0e-3\nmax_steps: 1\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([sys.executable, str(RECIPE), "--config", str(typo), "--max_steps", "2"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, typo, out_dir
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_recipe_help_lists_every_option(recipe_config, monkeypatch, capsys):
    """`python recipes/sft_memory_diet.py --help`, run in this process (its imports are already loaded)."""
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(RECIPE), run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sft_memory_diet.py")
    for f in fields(recipe_config[0]):
        assert f"--{f.name} " in out or f"--{f.name}\n" in out, f"--{f.name} missing from --help"
    assert "--config CONFIG" in out


def test_recipe_unknown_yaml_key_exits_2_before_anything(typo_run):
    proc, typo, out_dir = typo_run
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert (f"error: {typo}: unknown key 'learnin_rate' (did you mean 'learning_rate'?); "
            "`--help` lists the valid options") in err.splitlines()
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_null_on_the_command_line_means_none_for_optional_fields():
    from dataclasses import dataclass

    from common.config import parse_config

    @dataclass
    class Opts:
        eval_dataset_path: str | None = "data/x.jsonl"
        model_name_or_path: str = "asset:tiny"

    assert parse_config(Opts, ["--eval_dataset_path", "null"]).eval_dataset_path is None
    assert parse_config(Opts, ["--eval_dataset_path", "None"]).eval_dataset_path is None
    assert parse_config(Opts, ["--model_name_or_path", "null"]).model_name_or_path == "null"  # not optional


# ---- values out of range: one `error:` line, exit 2, before anything is loaded or written ----------
SFT_BAD_VALUES = [
    (["--learning_rate", "-1"], "--learning_rate -1: must be > 0 (peak learning rate)"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number (peak learning rate)"),
    (["--lora_r", "0"], "--lora_r 0: must be >= 1 (LoRA rank)"),
    (["--gradient_accumulation_steps", "0"],
     "--gradient_accumulation_steps 0: must be >= 1 (micro-batches per optimizer step)"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be >= 1 (micro-batch size)"),
    (["--max_steps", "-2"], "--max_steps -2: must be >= -1 (optimizer steps; -1 trains for num_train_epochs)"),
    (["--num_train_epochs", "0"],
     "--num_train_epochs 0: must be > 0 when --max_steps is -1 (epochs; or set --max_steps N > 0)"),
    (["--save_steps", "0"], "--save_steps 0: must be >= 1 (checkpoint every N optimizer steps)"),
    (["--lora_alpha", "0"], "--lora_alpha 0: must be > 0 (LoRA alpha)"),
    (["--lora_dropout", "1.0"], "--lora_dropout 1.0: must be >= 0 and < 1 (LoRA dropout)"),
    (["--lora_dropout", "-0.1"], "--lora_dropout -0.1: must be >= 0 and < 1 (LoRA dropout)"),
    (["--max_length", "8"],
     "--max_length 8: must be >= 16 (tokens per example; a chat template alone takes more tokens than that)"),
    (["--warmup_steps", "-1"], "--warmup_steps -1: must be >= 0 (warmup)"),
    (["--eval_split", "1.5"], "--eval_split 1.5: must be >= 0 and < 1 (0 < x < 1; the fraction of the training "
                              "file held out; 0: no split)"),
    (["--seed", "-1"], "--seed -1: must be >= 0 and <= 4294967295 (random seed)"),
]


@pytest.mark.parametrize("argv, line", SFT_BAD_VALUES, ids=[a[0] + "=" + a[1] for a, _ in SFT_BAD_VALUES])
def test_out_of_range_value_is_one_line_exit_2(recipe_config, capsys, argv, line):
    assert fails(capsys, recipe_config, ["--max_steps", "4"] * (argv[0] != "--num_train_epochs") + argv) \
        == f"error: {line}\n"


def test_epochs_may_be_anything_when_max_steps_is_set(recipe_config):
    assert parse(recipe_config, ["--num_train_epochs", "0", "--max_steps", "3"]).max_steps == 3


def test_out_of_range_value_in_yaml_names_file_line_and_the_flag(recipe_config, tmp_path, capsys):
    path = write(tmp_path, "max_steps: 4\n# the rank\nlora_r: 0      # too small\n")
    assert fails(capsys, recipe_config, ["--config", str(path)]) == (
        f"error: {path}:3: lora_r: 0 must be >= 1 (LoRA rank); fix it there or override it with --lora_r\n")
    assert parse(recipe_config, ["--config", str(path), "--lora_r", "8"]).lora_r == 8  # the CLI wins


@dataclass
class Bounded:
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps; 0 = never", "min": 0})
    temperature_floor: float = field(default=0.5, metadata={"help": "a recipe's own option", "gt": 0, "max": 1})
    lora_r: int = field(default=8, metadata={"help": "rank"})


def test_field_metadata_bounds_override_and_extend_the_standard_ones(capsys):
    assert parse_config(Bounded, ["--save_steps", "0"]).save_steps == 0  # the standard rule says >= 1
    assert fails(capsys, Bounded, ["--save_steps", "-1"]) == "error: --save_steps -1: must be >= 0 (checkpoint every N steps)\n"
    assert fails(capsys, Bounded, ["--temperature_floor", "1.5"]) == (
        "error: --temperature_floor 1.5: must be > 0 and <= 1 (a recipe's own option)\n")
    assert fails(capsys, Bounded, ["--lora_r", "0"]) == "error: --lora_r 0: must be >= 1 (rank)\n"  # by name


def test_a_bad_default_names_the_dataclass(capsys):
    @dataclass
    class BadDefault:
        lora_r: int = 0

    assert fails(capsys, BadDefault, []) == "error: the default lora_r = 0 of BadDefault must be >= 1; pass --lora_r\n"


def finished_run(out):
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)))
    (out / "metrics.json").write_text('{"final_train_loss": 1.25}\n')
    (out / "manifest.json").write_text('{"status": "finished", "config": {"seed": 42}}\n')


def digest(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("state", ["absent", "finished run"])
def test_recipe_with_a_bad_value_writes_nothing(tmp_path, monkeypatch, capsys, state):
    """The real script as __main__: exit 2 before the output dir is touched (a failed start used to leave a
    "running" manifest that refused the corrected rerun as "a different config")."""
    out = tmp_path / "out"
    if state == "finished run":
        finished_run(out)
    before = digest(out) if out.exists() else None
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--model_name_or_path", "asset:tiny", "--output_dir", str(out),
                                      "--gradient_accumulation_steps", "0"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(RECIPE), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: --gradient_accumulation_steps 0: must be >= 1 (micro-batches per optimizer step)"]
    assert (digest(out) == before) if before is not None else not out.exists()


# ---- one source of defaults: the recipe's own YAML -------------------------------------------------
def load_recipe(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered: dataclasses, and parse_config finding the recipe's file
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def every_recipe():
    paths = {p.stem: p for folder in ("recipes", "harnesses") for p in sorted((REPO / folder).glob("*.py"))
             if p.stem not in ("__init__", "compare", "adapters", "pruning")}  # modules the harnesses import
    names = sorted(paths)
    modules = {n: load_recipe(paths[n], f"_every_recipe_{n}") for n in names}
    yield modules
    for n in names:
        sys.modules.pop(f"_every_recipe_{n}", None)


def test_every_recipe_without_config_runs_its_yaml_and_checks_values(every_recipe, capsys):
    """`python recipes/x.py` == `bash launch/x.sh` (which passes --config recipes/configs/x.yaml), the YAML and
    the dataclass defaults are within bounds, and each recipe refuses a bad value of the shared options."""
    checked = 0
    for name, module in every_recipe.items():
        classes = getattr(module, "CONFIGS", module.Config)
        implicit = parse_config(classes, [])
        yaml_file = Path(module.__file__).parent / "configs" / f"{name}.yaml"
        if yaml_file.is_file():
            assert implicit == parse_config(classes, ["--config", str(yaml_file)]), name
        names = {f.name for c in (classes if isinstance(classes, tuple) else (classes,)) for f in fields(c)}
        for option, bad in (("learning_rate", "-1"), ("lora_r", "0"), ("per_device_train_batch_size", "0"),
                            ("gradient_accumulation_steps", "0"), ("max_length", "8")):
            if option in names:
                err = fails(capsys, classes, [f"--{option}", bad])
                assert err.startswith(f"error: --{option} {bad}: must be ") and err.count("\n") == 1, (name, err)
                checked += 1
    assert checked >= 30


def test_help_shows_the_yaml_defaults_that_will_run(monkeypatch, capsys):
    """`python recipes/sft_memory_diet.py --help` (no --config) shows the YAML's values, not the dataclass's."""
    raw = yaml.safe_load(RECIPE_YAML.read_text())
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(RECIPE), run_name="__main__")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert raw["learning_rate"] == 1e-3
    assert "The initial learning rate for the optimizer. (default: 0.001)" in out  # TrainingArguments own help
    assert f"(default: {raw['lora_target_modules']})" in out and "(default: 8.0)" in out
    assert "Defaults shown: recipes/configs/sft_memory_diet.yaml where it sets an option" in out


def test_help_with_a_broken_config_still_lists_everything_and_says_why(tmp_path, capsys):
    broken = write(tmp_path, "learning_rate: 1.0e-3\nlearnin_rate: 2\n")
    with pytest.raises(SystemExit) as e:
        parse_config(Small, ["--config", str(broken), "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the defaults above are the dataclass's" in out and "unknown key 'learnin_rate'" in out


# ---- the recipe's name follows its file ------------------------------------------------------------
def test_a_copied_recipe_takes_its_name_from_the_file(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "recipes" / "my_run.py"
    copy.parent.mkdir()
    copy.write_text(RECIPE.read_text())
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        module = load_recipe(copy, "my_run_under_test")
        assert module.RECIPE == "my_run"
        assert parse(module.CONFIGS, []).output_dir == "runs/my_run"  # no configs/my_run.yaml: dataclass
        assert parse(module.CONFIGS, ["--config", str(RECIPE_YAML)]).output_dir == "runs/my_run"
        with pytest.raises(SystemExit):
            parse_config(module.CONFIGS, ["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: runs/my_run)" in out and "there is no" in out and "my_run.yaml" in out
    finally:
        sys.modules.pop("my_run_under_test", None)


def test_no_recipe_hard_codes_its_own_name():
    for path in [*(REPO / "recipes").glob("*.py"), *(REPO / "harnesses").glob("*.py")]:
        if path.stem in {"__init__", "compare", "adapters", "pruning"}:  # shared modules, not runnable recipes
            continue
        text = path.read_text()
        for literal in (f'"recipe": "{path.stem}"', f'default="runs/{path.stem}"', f'getLogger("{path.stem}")'):
            assert literal not in text, f"{path.name}: {literal} (use RECIPE = Path(__file__).stem)"
    for path in [*(REPO / "recipes" / "configs").glob("*.yaml"), *(REPO / "harnesses" / "configs").glob("*.yaml")]:
        assert f"output_dir: runs/{path.stem}\n" not in path.read_text() or path.stem not in {
            p.stem for p in path.parent.parent.glob("*.py")}, f"{path.name} pins output_dir to the recipe's name"


def test_manifest_config_keeps_the_recipes_value_of_a_redeclared_library_option(tmp_path):
    """sft_memory_diet redeclares gradient_checkpointing / torch_compile as auto|true|false: the manifest shows
    the user's choice, not TrainingArguments' bool placeholder."""
    from dataclasses import dataclass

    from transformers import TrainingArguments

    from common.run import config_dict

    @dataclass
    class Recipe:
        gradient_checkpointing: str = "auto"
        torch_compile: str = "auto"

    merged = config_dict(Recipe(), TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    assert merged["gradient_checkpointing"] == "auto" and merged["torch_compile"] == "auto"
    assert merged["learning_rate"] == 5e-05  # the library's own options are still there
