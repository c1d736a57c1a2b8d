"""launch/lib.sh and the launchers built on it, with a stub interpreter (milliseconds, no torch): what each
launcher runs, its guards and --help; and the accelerate path of launch/multigpu_qlora.sh, whose command and
YAMLs go through accelerate's own parser and config loader."""
import os
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO

# Prints what it was asked to run; `-c` is the launcher's GPU probe, answered with $STUB_GPUS.
STUB_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == -c ]]; then echo "${STUB_GPUS:-0}"; exit 0; fi
echo "STUB $* HF_HUB_OFFLINE=$HF_HUB_OFFLINE TOKENIZERS_PARALLELISM=$TOKENIZERS_PARALLELISM"
"""

# launcher, the script it runs, its default config, whether it says that only the first GPU is used
SINGLE_DEVICE = [
    ("memory_diet.sh", "recipes/sft_memory_diet.py", "recipes/configs/sft_memory_diet.yaml", True),
    ("sft_vlm.sh", "recipes/sft_vlm.py", "recipes/configs/sft_vlm.yaml", True),
    ("dpo.sh", "recipes/dpo.py", "recipes/configs/dpo.yaml", True),
    ("ppo.sh", "recipes/ppo.py", "recipes/configs/ppo.yaml", True),
    ("reward_model.sh", "recipes/reward_model.py", "recipes/configs/reward_model.yaml", True),
    ("evaluate.sh", "recipes/evaluate.py", "recipes/configs/evaluate.yaml", False),
    ("merge_export.sh", "recipes/merge_export.py", "recipes/configs/merge_export.yaml", False),
    ("adapter_vs_full.sh", "harnesses/adapter_vs_full.py", "harnesses/configs/adapter_vs_full.yaml", True),
    ("memory_ladder.sh", "harnesses/memory_ladder.py", "harnesses/configs/memory_ladder.yaml", True),
    ("benchmark.sh", "harnesses/benchmark.py", "harnesses/configs/benchmark.yaml", False),
    ("sweep.sh", "harnesses/sweep.py", "harnesses/configs/sweep.yaml", False),
]
# SHARDING -> the accelerate YAML that LAUNCHER=accelerate uses, and what accelerate makes of it
ACCELERATE = {"ddp": ("accelerate_ddp.yaml", "multi_gpu"), "fsdp": ("accelerate_fsdp2.yaml", "use_fsdp"),
              "zero2": ("accelerate_zero2.yaml", "use_deepspeed"),
              "zero3": ("accelerate_zero3_offload.yaml", "use_deepspeed")}


def python_sources():
    """The code that may hand a launch/configs JSON to the Trainer (recipes and the shared module)."""
    return "".join(p.read_text() for d in ("recipes", "common", "harnesses") for p in sorted((REPO / d).glob("*.py")))


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    path = tmp_path_factory.mktemp("stub") / "python"
    path.write_text(STUB_PYTHON)
    path.chmod(0o755)
    return path


def launch(script, *args, env=None, repo=REPO, python=None):
    full = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "DRY_RUN",
                                                              "LAUNCHER", "ACCELERATE_CONFIG", "SHARDING", "NPROC")}
    if python:
        full["PYTHON"] = str(python)
    full.update(env or {})
    return subprocess.run(["bash", str(repo / "launch" / script), *args], cwd="/", env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("launcher,script,config,first_gpu", SINGLE_DEVICE, ids=[s[0] for s in SINGLE_DEVICE])
def test_single_device_launcher_runs_its_script_with_its_config(stub, launcher, script, config, first_gpu):
    assert (REPO / script).is_file() and (REPO / config).is_file()
    proc = launch(launcher, "--max_steps", "2", python=stub, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"STUB {script} --config {config} --max_steps 2 HF_HUB_OFFLINE=1 "
                                        "TOKENIZERS_PARALLELISM=false"]
    assert f"+ {stub} {script} --config {config} --max_steps 2" in proc.stderr  # echoed before it runs
    assert ("lists several GPUs; this recipe uses only the first" in proc.stderr) == first_gpu
    proc = launch(launcher, python=stub, env={"CONFIG": "x.yaml", "HF_HUB_OFFLINE": "0"})
    assert f"{script} --config x.yaml HF_HUB_OFFLINE=0" in proc.stdout  # the caller's settings win

    proc = launch(launcher, python=stub, env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and proc.stderr.startswith(f"{launcher}: WORLD_SIZE=2: ") and not proc.stdout
    assert launch(launcher, python=stub, env={"WORLD_SIZE": "1"}).returncode == 0

    proc = launch(launcher, "--help", python=stub)
    header = (REPO / "launch" / launcher).read_text().splitlines()[1][2:]
    assert proc.returncode == 0 and proc.stdout.startswith(header + "\n")
    assert proc.stdout.rstrip().endswith(f"Options of {script} (python {script} --help):\nSTUB {script} --help "
                                         "HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false")
    assert "source " not in proc.stdout and "help_if_asked" not in proc.stdout  # the header only, no code
    assert launch(launcher, "-h", python=stub).stdout == proc.stdout


def test_interpreter_is_python_env_else_the_venv_else_python_on_path(tmp_path, stub):
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for name in ("lib.sh", "dpo.sh"):
        shutil.copy(REPO / "launch" / name, repo / "launch" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(stub, bin_dir / "python")
    path = f"{bin_dir}:/usr/bin:/bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    on_path = subprocess.run(["bash", str(repo / "launch/dpo.sh")], env=dict(env, PATH=path), capture_output=True,
                             text=True, timeout=60)
    assert on_path.returncode == 0 and f"+ {bin_dir}/python recipes/dpo.py" in on_path.stderr
    (repo / ".venv/bin").mkdir(parents=True)
    shutil.copy(stub, repo / ".venv/bin/python")
    venv = subprocess.run(["bash", "launch/dpo.sh"], cwd=repo, env=dict(env, PATH=path), capture_output=True,
                          text=True, timeout=60)
    assert venv.returncode == 0 and "+ .venv/bin/python recipes/dpo.py" in venv.stderr
    explicit = subprocess.run(["bash", str(repo / "launch/dpo.sh")], env=dict(env, PATH=path, PYTHON=str(stub)),
                              capture_output=True, text=True, timeout=60)
    assert explicit.returncode == 0 and f"+ {stub} recipes/dpo.py" in explicit.stderr


def test_multigpu_launcher_builds_the_torchrun_command(stub):
    proc = launch("multigpu_qlora.sh", "--output_dir", "runs/x", python=stub,
                  env={"DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                       "MASTER_PORT": "29600", "NPROC": "3"})
    assert proc.returncode == 0 and not proc.stdout  # DRY_RUN: nothing started
    cmd = shlex.split(proc.stderr.strip().removeprefix("+ "))
    assert cmd[:3] == [str(stub), "-m", "common.distributed"]
    assert " ".join(cmd[3:]) == (
        "--report_as multigpu_qlora.sh --nnodes 2 --nproc_per_node 3 --node_rank 1 --master_addr 10.0.0.1 "
        "--master_port 29600 --shutdown_timeout 600 --log_dir runs/x.logs/node1 --redirects 3 --tee 3 "
        "recipes/sft_multigpu_qlora.py --config recipes/configs/sft_multigpu_qlora.yaml --device cpu "
        "--sharding ddp --expected_world_size 6 --output_dir runs/x")
    proc = launch("multigpu_qlora.sh", python=stub, env={"STUB_GPUS": "2", "NPROC": "4"})
    assert proc.returncode == 1 and "NPROC=4 but only 2 GPU(s) are visible" in proc.stderr and "Fix: NPROC=2" in proc.stderr
    proc = launch("multigpu_qlora.sh", python=stub, env={"LAUNCHER": "mpirun"})
    assert proc.returncode == 2 and "LAUNCHER=mpirun: use torchrun (the default) or accelerate" in proc.stderr


@pytest.mark.parametrize("sharding", list(ACCELERATE))
def test_accelerate_launcher_command_and_yaml_go_through_accelerates_own_parser(stub, monkeypatch, sharding):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    yaml_name, mode = ACCELERATE[sharding]
    proc = launch("multigpu_qlora.sh", "--max_steps", "3", python=stub,
                  env={"DRY_RUN": "1", "LAUNCHER": "accelerate", "SHARDING": sharding, "STUB_GPUS": "4",
                       "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"})
    assert proc.returncode == 0 and not proc.stdout, proc.stderr
    cmd = shlex.split(proc.stderr.strip().removeprefix("+ "))
    assert cmd[:5] == [str(stub), "-m", "accelerate.commands.launch", "--config_file", f"launch/configs/{yaml_name}"]

    monkeypatch.chdir(REPO)  # the YAMLs name the DeepSpeed JSONs relative to the repository root
    config = load_config_from_file(f"launch/configs/{yaml_name}")
    assert config.num_processes == 8  # the YAML's own count, which the launcher overrides:
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert getattr(args, mode) and sum([args.multi_gpu, args.use_fsdp, args.use_deepspeed]) == 1
    assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29600)
    assert args.training_script == "recipes/sft_multigpu_qlora.py"
    assert args.training_script_args == ["--config", "recipes/configs/sft_multigpu_qlora.yaml", "--device", "cuda",
                                         "--sharding", sharding, "--expected_world_size", "8", "--max_steps", "3"]
    if mode == "use_deepspeed":  # the same JSON the recipe hands the Trainer for this SHARDING
        ds_json = config.deepspeed_config["deepspeed_config_file"]
        assert (REPO / ds_json).is_file() and args.deepspeed_config_file == ds_json
        assert os.path.basename(ds_json) in python_sources()
    if mode == "use_fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and str(args.fsdp_version) == "2"


def test_accelerate_config_env_implies_the_accelerate_launcher_and_needs_gpus(stub, tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    proc = launch("multigpu_qlora.sh", python=stub, env={"DRY_RUN": "1", "ACCELERATE_CONFIG": str(own),
                                                          "STUB_GPUS": "2"})
    assert proc.returncode == 0 and f"-m accelerate.commands.launch --config_file {own} " in proc.stderr
    proc = launch("multigpu_qlora.sh", python=stub, env={"LAUNCHER": "accelerate"})  # no GPU
    assert proc.returncode == 1 and "LAUNCHER=accelerate is for GPUs" in proc.stderr and not proc.stdout
    proc = launch("multigpu_qlora.sh", python=stub, env={"LAUNCHER": "accelerate", "SHARDING": "zero9",
                                                          "STUB_GPUS": "2"})
    assert proc.returncode == 2 and "SHARDING=zero9: use ddp, fsdp, zero2 or zero3" in proc.stderr


def test_every_file_in_launch_configs_is_used():
    """Each accelerate YAML is one SHARDING's LAUNCHER=accelerate config; each JSON is named by the recipe."""
    sources = python_sources()
    yamls = {y for y, _ in ACCELERATE.values()}
    for path in sorted((REPO / "launch/configs").iterdir()):
        if path.suffix == ".yaml":
            assert path.name in yamls, f"{path.name}: no SHARDING of launch/multigpu_qlora.sh uses it"
        else:
            assert path.suffix == ".json" and f'"{path.name}"' in sources, f"{path.name}: no recipe uses it"
