"""Loading a base model for LoRA/QLoRA training, with the precision and placement rules spelled out.

- precision: bf16 where the hardware has it (CUDA compute capability >= 8, or a CPU with native
  bf16 such as AVX512-BF16/AMX), else fp32; fp16 only on CUDA (on CPU it runs at a few GFLOP/s).
- QLoRA: bitsandbytes NF4 with double quantization, compute dtype = the training precision; the
  whole quantized model goes to this process's device (`device_map={"": device}`), never "auto".
- LoRA via peft's `get_peft_model`, then the input-grad fix (common.checks.enable_input_grads).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import logging

import torch

from common.checks import CheckFailed, enable_input_grads

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' | 'bf16' | 'fp16' | 'fp32' -> what this hardware runs; refuses what it cannot."""
    if device.type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported()
    else:
        has_bf16 = cpu_has_bf16()
    if requested == "auto":
        chosen = "bf16" if has_bf16 else ("fp16" if device.type == "cuda" else "fp32")
        log.info("precision auto -> %s on %s", chosen, device.type)
        return chosen
    if requested == "bf16" and not has_bf16:
        raise CheckFailed(f"--precision bf16 requested but this {device.type} has no bf16 support "
                          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU without AVX512-BF16/AMX'}). "
                          "Use --precision fp16 on older GPUs, fp32 on CPU, or auto")
    if requested == "fp16" and device.type != "cuda":
        raise CheckFailed("--precision fp16 on CPU runs at a few GFLOP/s and is not supported here; use bf16 or fp32 "
                          "(or auto)")
    if requested not in ("bf16", "fp16", "fp32"):
        raise CheckFailed(f"--precision {requested!r}: choose auto, bf16, fp16 or fp32")
    return requested


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel after every tensor (glibc).

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
    free, so a training step that creates and frees the same large activations (a 125 MB logits tensor, every
    [tokens x 1536] MLP activation) pays the kernel's page faults and zeroing again on every step. Measured on
    this repo's 2-core CPU: a bf16->fp32 cast of SmolLM2's logits went from 45 to 8 ms, an MLP activation
    cast from 1.5 to 0.15 ms (`python -m common.models`). `mallopt`: large blocks from the heap too
    (M_MMAP_MAX=0), freed memory never handed back (M_TRIM_THRESHOLD=-1), growth in 256 MiB steps. The cost:
    freed blocks are reused rather than returned, so fragmentation can raise the peak RSS.
    Returns False (and changes nothing) where libc is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("allocator: not glibc, left as it is")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
        ok = all(libc.mallopt(option, value) == 1 for option, value in
                 ((m_mmap_max, 0), (m_trim_threshold, -1), (m_top_pad, 256 << 20)))
    except (OSError, AttributeError) as err:
        log.info("allocator: glibc mallopt unavailable (%s), left as it is", err)
        return False
    log.info("allocator: glibc keeps freed memory for reuse (no per-tensor mmap/munmap page faults)%s",
             "" if ok else " (some mallopt settings refused)")
    return ok


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_base_model(path: str, device: torch.device, precision: str, quantize_4bit: bool,
                    attn_implementation: str | None = None, quant_storage: torch.dtype = torch.uint8):
    """The frozen base in the training precision (LoRA) or NF4 (QLoRA), placed on `device`.

    `quant_storage`: the dtype the packed 4-bit weights are stored in. FSDP and ZeRO-3 flatten
    parameters per dtype, so for sharded QLoRA it must equal the compute dtype (bf16), not uint8.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": DTYPES[precision], "device_map": {"": str(device)}}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[precision], bnb_4bit_quant_storage=quant_storage)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    """'auto' -> flash_attention_2 on CUDA when flash-attn is installed, else sdpa (logged)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        log.info("flash-attn is not installed: using sdpa attention (pip install -r requirements-gpu.txt)")
        return "sdpa"
    log.info("attention: sdpa on CPU (flash-attn needs CUDA)")
    return "sdpa"


@dataclass
class LoraOptions:
    """The LoRA knobs of every adapter recipe: its Config inherits them (names as the recipes' YAMLs use)."""
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (on CPU dropout masks cost about a third of a step)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layer names, or all-linear"})

    @property
    def lora_targets(self) -> list[str] | str:
        return "all-linear" if self.lora_target_modules == ["all-linear"] else self.lora_target_modules

    def lora_config(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_targets, bias="none", task_type=task_type)


def attach_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str] | str, quantized: bool,
                gradient_checkpointing: bool):
    """peft LoRA on `target_modules` ('all-linear' or names); returns the PeftModel, ready to train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # casts norms/head to fp32 for stability and turns on checkpointing (non-reentrant) if asked
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    enable_input_grads(model)
    return model


def _time_casts(repeats: int = 10) -> None:
    """`python -m common.models`: a logits-sized and an MLP-sized bf16->fp32 cast, before and after tune_cpu_allocator."""
    import time

    logits, activation = torch.randn(635, 49152).bfloat16(), torch.randn(1270, 1536).bfloat16()

    def ms(tensor):
        tensor.float()
        start = time.perf_counter()
        for _ in range(repeats):
            tensor.float()
        return 1000 * (time.perf_counter() - start) / repeats

    before = ms(logits), ms(activation)
    tuned = tune_cpu_allocator()
    after = ms(logits), ms(activation)
    print(f"bf16->fp32 cast, ms: logits [635 x 49152] {before[0]:.1f} -> {after[0]:.1f}, "
          f"MLP activation [1270 x 1536] {before[1]:.2f} -> {after[1]:.2f} (allocator tuned: {tuned})")


if __name__ == "__main__":
    _time_casts()
