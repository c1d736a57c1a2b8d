"""Loading a base model for LoRA/QLoRA training, with the precision and placement rules spelled out.

- precision: bf16 where the hardware has it (CUDA compute capability >= 8, or a CPU with native
  bf16 such as AVX512-BF16/AMX), else fp32; fp16 only on CUDA (on CPU it runs at a few GFLOP/s).
- QLoRA: bitsandbytes NF4 with double quantization, compute dtype = the training precision; the
  whole quantized model goes to this process's device (`device_map={"": device}`), never "auto".
- LoRA via peft's `get_peft_model`, then the input-grad fix (common.checks.enable_input_grads).
- The LoRA variants peft already has, as LoraOptions: DoRA, rsLoRA, PiSSA/OLoRA/gaussian init, and the LoRA+
  learning-rate ratio (built as the optimizer by common.trainer.TokenCountingTrainer).
- Mixture-of-Experts: `experts` in --lora_target_modules puts LoRA on the routed experts' fused parameters, the
  router only with --lora_train_router (common/moe.py resolves the targets against the loaded model).
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
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (on CPU 15-40%% of a step even with common/lora_fast.py's cheaper mask)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layer names, or all-linear; `experts`: the routed experts of an MoE model (fused "
                          "parameters no Linear name reaches; docs/moe.md)"})
    lora_train_router: bool = field(default=False, metadata={"help": "MoE: LoRA on the router (top-k gate) too; frozen by default"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: a trainable magnitude per output feature on top of LoRA's direction (slower steps)"})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale = alpha / sqrt(r), so higher ranks still learn"})
    lora_init: str = field(default="default", metadata={"help": "default | gaussian | pissa | pissa_niter_N | olora: how the adapter starts (pissa/olora move the principal part of each base weight into it)"})
    loraplus_lr_ratio: float = field(default=0.0, metadata={"help": "LoRA+: lora_B learns at this multiple of --learning_rate (16 in the paper); 0 = off"})

    @property
    def lora_targets(self) -> list[str] | str:
        return "all-linear" if self.lora_target_modules == ["all-linear"] else self.lora_target_modules

    def check_lora_variants(self, quantized: bool = False) -> None:
        """The variant options, each refusal with the option to change."""
        init = self.lora_init
        if not (init in LORA_INITS or (init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit())):
            import difflib

            close = difflib.get_close_matches(init, LORA_INITS, n=1)
            raise CheckFailed(f"--lora_init {init!r}: choose {', '.join(LORA_INITS)} or pissa_niter_N (fast SVD)"
                              + (f"; did you mean {close[0]}?" if close else ""))
        if quantized and init.startswith(("pissa", "olora")):
            raise CheckFailed(f"--lora_init {init} with --method qlora: it rewrites the base weights (base minus their "
                              "principal part), which needs them in full precision; use --method lora, or --lora_init default")
        if "experts" in self.lora_target_modules or self.lora_train_router:
            what = "`experts` in --lora_target_modules" if "experts" in self.lora_target_modules else "--lora_train_router"
            if self.lora_dropout:
                raise CheckFailed(f"--lora_dropout {self.lora_dropout} with {what}: peft's LoRA on fused expert "
                                  "parameters (ParamWrapper) has no dropout; use --lora_dropout 0")
            if self.use_dora:
                raise CheckFailed(f"--use_dora with {what}: peft's ParamWrapper has no DoRA; drop one of them")
        if self.loraplus_lr_ratio < 0:
            raise CheckFailed(f"--loraplus_lr_ratio {self.loraplus_lr_ratio}: lora_B's learning rate is this multiple of "
                              "--learning_rate; use a value >= 1 (16 in the LoRA+ paper), or 0 for off")

    def lora_config(self, task_type: str = "CAUSAL_LM", quantized: bool = False, loraplus_built: bool = False,
                    moe_resolved: bool = False):
        """`loraplus_built`: the caller's trainer builds the LoRA+ optimizer (TokenCountingTrainer); else it is refused.
        `moe_resolved`: the caller resolves `experts` / the router against the model (attach_lora); else refused."""
        from peft import LoraConfig

        self.check_lora_variants(quantized)
        if self.loraplus_lr_ratio and not loraplus_built:
            raise CheckFailed(f"--loraplus_lr_ratio {self.loraplus_lr_ratio}: this recipe's trainer builds its own "
                              "optimizer without LoRA+ groups; use 0 here (recipes/sft_memory_diet.py has LoRA+)")
        if ("experts" in self.lora_target_modules or self.lora_train_router) and not moe_resolved:
            raise CheckFailed("`experts` in --lora_target_modules / --lora_train_router: this recipe attaches LoRA "
                              "without resolving MoE targets; drop them here (recipes/sft_memory_diet.py has them, "
                              "docs/moe.md)")
        init = {"default": True}.get(self.lora_init, self.lora_init)
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_targets, bias="none", task_type=task_type,
                          use_dora=self.use_dora, use_rslora=self.use_rslora, init_lora_weights=init)


LORA_INITS = ("default", "gaussian", "pissa", "olora")


def attach_lora(model, r: "int | LoraOptions", alpha: int | None = None, dropout: float | None = None,
                target_modules: list[str] | str | None = None, quantized: bool = False,
                gradient_checkpointing: bool = False, checkpoint_every_n_layers: int = 1):
    """peft LoRA on `target_modules` ('all-linear' or names); returns the PeftModel, ready to train.
    `r` may be the recipe's LoraOptions (its Config): then every option, the variants included, comes from it.
    `checkpoint_every_n_layers` n > 1: only decoder layers 0, n, 2n, ... recompute (transformers' every_n_layers)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from common.lora_fast import speed_up_lora
    from common.moe import apply_lora_targets

    if quantized:  # casts norms/head to fp32 for stability; its checkpointing (non-reentrant) is the call below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            every_n_layers=checkpoint_every_n_layers)
    if isinstance(r, LoraOptions):
        config = r.lora_config(quantized=quantized, loraplus_built=True, moe_resolved=True)
        targets, train_router = r.lora_targets, r.lora_train_router
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            bias="none", task_type="CAUSAL_LM")
        targets, train_router = target_modules, False
    apply_lora_targets(config, model, targets, train_router)  # dense: unchanged; MoE: experts/router as asked
    if train_router:  # a router that learns keeps the load-balancing loss it was trained with in the loss
        model.config.output_router_logits = True
    model = get_peft_model(model, config)
    model.lora_fast = speed_up_lora(model)  # same maths as peft's layer, fewer passes (common/lora_fast.py)
    if str(config.init_lora_weights).startswith(("pissa", "olora")):
        keep_initial_adapter(model)
    enable_input_grads(model)
    return model


def keep_initial_adapter(model) -> None:
    """PiSSA/OLoRA moved each base weight's principal part into the adapter: save that starting adapter (in a
    temporary folder) so save_adapter can write the trained one as the plain LoRA it amounts to."""
    import tempfile

    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # how peft marks a plain-LoRA starting point
    model.initial_adapter_dir = tempfile.mkdtemp(prefix="lora_initial_")
    model.save_pretrained(model.initial_adapter_dir)
    config.init_lora_weights = init


def save_adapter(model, path) -> None:
    """model.save_pretrained(path), except that a PiSSA/OLoRA adapter is written as the plain LoRA (rank 2r) it
    amounts to on the stock base (peft's documented conversion): loading repeats no SVD/QR of the base and it
    combines with other LoRA adapters (PeftModel.from_pretrained, recipes/merge_export.py)."""
    initial = getattr(model, "initial_adapter_dir", None)
    model.save_pretrained(path, **({"path_initial_model_for_weight_conversion": initial} if initial else {}))


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
