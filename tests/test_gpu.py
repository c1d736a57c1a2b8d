"""GPU paths: QLoRA with CUDA bitsandbytes kernels, bf16 on GPU, flash-attn selection.

Run on a CUDA machine:  .venv/bin/python -m pytest -m gpu
(pip install -r requirements-gpu.txt --no-build-isolation first for the flash-attn test).
"""
import importlib.util
import json

import pytest
import torch

from conftest import REPO, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_qlora_recipe_on_cuda_bf16(tiny_dir, tmp_path):
    out = tmp_path / "qlora_cuda"
    proc = run(["bash", str(REPO / "launch" / "memory_diet.sh"), "--model_name_or_path", str(tiny_dir),
                "--output_dir", str(out), "--device", "cuda", "--method", "qlora", "--precision", "auto",
                "--max_steps", "8", "--learning_rate", "3e-3", "--optim", "paged_adamw_8bit",
                "--gradient_checkpointing", "true"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["device_type"] == "cuda" and m["method"] == "qlora"
    assert m["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert m["optimizer"] == "paged_adamw_8bit"  # paging is real on a GPU
    assert m["peak_memory_method"].startswith("torch.cuda.max_memory_allocated")
    # on CUDA an eval forward does not repack 4-bit weights, so evaluation runs before training too
    assert m["eval_loss_before"] is not None and m["eval_loss_after"] < m["eval_loss_before"]


def test_quantized_model_lives_on_this_rank_device(tiny_dir):
    from bitsandbytes.nn import Linear4bit

    from common.models import load_base_model

    device = torch.device("cuda", torch.cuda.current_device())
    model = load_base_model(str(tiny_dir), device, "bf16" if torch.cuda.is_bf16_supported() else "fp16",
                            quantize_4bit=True)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    assert {m.weight.device for m in layers} == {device}
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)  # double quant


def test_attention_picks_flash_attn_when_installed():
    from common.models import pick_attn_implementation

    want = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert pick_attn_implementation("auto", torch.device("cuda")) == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "zero2", "zero3"])
def test_multigpu_qlora_on_two_gpus(tiny_dir, tmp_path, sharding):
    """QLoRA on 2 GPUs: DDP, FSDP2 (bnb_4bit_quant_storage = bf16, LoRA cast), ZeRO-2, ZeRO-3."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / sharding
    proc = run(["bash", str(REPO / "launch" / "multigpu_qlora.sh"), "--model_name_or_path", str(tiny_dir),
                "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "3e-3"],
               env={"NPROC": "2", "SHARDING": sharding, "MASTER_PORT": port})
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["device_type"] == "cuda" and m["replicas_in_sync"]
    assert {r["device"] for r in m["per_rank"]} == {"cuda:0", "cuda:1"}  # one full copy per rank, own GPU
    assert m["eval_loss_after"] < m["eval_loss_before"]
