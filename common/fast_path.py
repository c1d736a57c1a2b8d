"""Fast by default: what packing, gradient checkpointing, micro-batch and kernels an SFT run uses.

- plan_memory: common.memory's planner decides gradient checkpointing (when `auto`) and the micro-batch /
  accumulation split (when the user pinned neither), against the memory the run may use; nothing that
  fits means the run stops before the model loads.
- resolve_packing: padding-free packed micro-batches only where the attention implementation is verified to
  keep packed examples apart (the recipe also measures it on its own model before step 1).
- resolve_liger: Liger's Triton kernels on CUDA when installed.
- choose_fast_path: all of the above for one run, as a FastPath (which also measures packing on the model).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from common import checks
from common.memory import GB, PlanError, Settings, load_config, ordinal, recommend

log = logging.getLogger(__name__)
AUTO_TRUE_FALSE = ("auto", "true", "false")
BATCH_OPTIONS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def memory_budget_bytes(budget_gb: float | None, device: torch.device) -> tuple[int, str]:
    """The memory a run may use, and where that figure came from."""
    if budget_gb is not None:
        return int(budget_gb * GB), "--memory_budget_gb"
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), "free GPU memory (torch.cuda.mem_get_info)"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = int(meminfo["MemAvailable"].split()[0]) + int(status["VmRSS"].split()[0])  # the plan counts this process
    return kib * 1024, "MemAvailable (/proc/meminfo) + this process's RSS"


def plan_memory(cfg, device: torch.device, precision: str, optim: str, model_path: str, batch_pinned: bool,
                micro_batch: int, accumulation: int) -> dict:
    """common.memory.recommend for this run. It decides gradient checkpointing when it is auto, and the
    micro-batch / accumulation when the user pinned neither; method, optimizer, LoRA and max_length stay
    as given. With something to decide and nothing that fits, the run stops here, before the model loads."""
    if cfg.gradient_checkpointing not in AUTO_TRUE_FALSE:
        raise checks.CheckFailed(f"--gradient_checkpointing {cfg.gradient_checkpointing!r}: choose auto, true or false")
    budget, source = memory_budget_bytes(cfg.memory_budget_gb, device)
    given = {"gradient_checkpointing": cfg.gradient_checkpointing == "true",
             "per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": accumulation}
    decides = (["gradient_checkpointing"] if cfg.gradient_checkpointing == "auto" else []) + \
              ([] if batch_pinned else list(BATCH_OPTIONS))
    pinned = ("optim", "method") + (("grad_ckpt",) if cfg.gradient_checkpointing != "auto" else ()) + \
             (("batch_size",) if batch_pinned else ())
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else ",".join(cfg.lora_target_modules)
    settings = Settings(method=cfg.method, lora_r=cfg.lora_r, lora_targets=targets, lora_dropout=cfg.lora_dropout,
                        use_dora=cfg.use_dora, lora_train_router=getattr(cfg, "lora_train_router", False),
                        seq_len=cfg.max_length, batch_size=micro_batch,
                        gradient_accumulation_steps=accumulation, optim=optim, dtype=precision,
                        grad_ckpt=given["gradient_checkpointing"], device=device.type)
    out = {"budget_gb": round(budget / GB, 2), "budget_source": source, "decided_by_planner": decides}
    try:
        rec = recommend(model_path, budget, settings, config=load_config(model_path), pinned=pinned)
    except (PlanError, OSError, ValueError) as e:
        log.warning("memory planner cannot plan this run (%s): gradient checkpointing %s, batch as given", e,
                    "off" if cfg.gradient_checkpointing == "auto" else cfg.gradient_checkpointing)
        return {**out, **given, "fits": None, "reason": f"planner error: {e}"}
    if not rec["fits"]:
        if decides:
            raise checks.CheckFailed(f"memory plan: {rec['reason']} (the recipe keeps --method {cfg.method} and "
                                     f"--optim {optim}; --method qlora or --optim adamw_bnb_8bit need less)")
        log.warning("memory plan: %s Running the pinned settings anyway.", rec["reason"])
        return {**out, **given, "fits": False, "reason": rec["reason"]}
    chosen = rec["settings"]
    every_n = chosen["ckpt_every_n"] if chosen["grad_ckpt"] else 1
    result = {**out, "fits": True, "gradient_checkpointing": chosen["grad_ckpt"],
              "checkpoint_every_n_layers": every_n,
              "per_device_train_batch_size": chosen["batch_size"],
              "gradient_accumulation_steps": chosen["gradient_accumulation_steps"],
              "required_gb": round(rec["plan"]["required_bytes"] / GB, 2), "reason": rec["reason"]}
    log.info("memory plan (%s: %.1f GiB; planner decides %s): gradient checkpointing %s, micro-batch %d x %d "
             "accumulation. %s", source, budget / GB, ", ".join(decides) or "nothing, all pinned",
             ("on" + (f" every {ordinal(every_n)} layer" if every_n > 1 else "")) if result["gradient_checkpointing"] else "off",
             result["per_device_train_batch_size"],
             result["gradient_accumulation_steps"], rec["reason"])
    return result


# The kept-warm glibc allocator (common.models.tune_cpu_allocator) reuses freed blocks instead of returning them, so
# the heap fragments and its peak RSS grows past what the planner models (glibc's defaults, CPU_HEAP_RETENTION).
# Measured on the benchmark's packed SmolLM2 runs (2-core AVX512-BF16 VM): 1.14-1.26x the same run's peak untuned,
# up to 1.09x the plan's required_bytes; the step time the same within the run-to-run noise (+-5%).
TUNED_ALLOCATOR_HEADROOM = 1.25


def allocator_headroom(plan: dict) -> bool:
    """Keep freed memory warm only where the budget leaves room for the fragmentation it costs (the plan x 1.25)."""
    required, budget = plan.get("required_gb"), plan["budget_gb"]
    if plan.get("fits") is False:
        room = False
    elif required is None:
        room = plan["budget_source"] != "--memory_budget_gb"
    else:
        room = budget >= TUNED_ALLOCATOR_HEADROOM * required
    if not room:
        log.info("allocator: glibc's defaults kept, which the memory plan models: the plan needs %s of the %.2f GiB "
                 "budget, under the %.2fx headroom that keeping freed memory warm needs (it fragments the heap)",
                 f"{required:.2f} GiB" if required else "an unknown share", budget, TUNED_ALLOCATOR_HEADROOM)
    return room


PACKING_LEAK_TOLERANCE = 1e-3  # isolated: exactly 0 (tests/recipes/test_packing.py); a leak: ~0.3 (tiny) to ~25 (SmolLM2)


def resolve_liger(requested: str, device: torch.device) -> bool:
    """Liger kernels (fused RMSNorm/RoPE/SwiGLU/linear+cross-entropy, Triton) on CUDA when installed."""
    import importlib.util

    if requested not in AUTO_TRUE_FALSE:
        raise checks.CheckFailed(f"--use_liger_kernel {requested!r}: choose auto, true or false")
    if requested == "false":
        return False
    if device.type != "cuda":
        if requested == "true":
            raise checks.CheckFailed("--use_liger_kernel true: Liger's kernels are Triton GPU kernels and need CUDA; "
                                     "use auto or false on CPU")
        log.info("Liger kernels skipped: they need CUDA (this run is on %s)", device.type)
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        if requested == "true":
            raise checks.CheckFailed("--use_liger_kernel true but liger_kernel is not installed (pip install liger-kernel)")
        log.info("liger_kernel is not installed: no Liger kernels (pip install liger-kernel)")
        return False
    log.info("Liger kernels on (liger_kernel installed, CUDA)")
    return True


def packing_supported(attn: str, device: torch.device) -> bool:
    """Attention implementations whose packed-sequence masking is verified: sdpa and eager build a
    block-diagonal mask from restarting position_ids (tests/recipes/test_packing.py checks it numerically on CPU),
    flash-attn uses varlen cu_seqlens (CUDA). The run also measures it on its own model before step 1."""
    return attn in ("sdpa", "eager", "sdpa_packed") or (device.type == "cuda" and attn in ("flash_attention_2", "flash_attention_3"))


def resolve_packing(requested: str, attn: str, device: torch.device) -> bool:
    if requested not in AUTO_TRUE_FALSE:
        raise checks.CheckFailed(f"--packing {requested!r}: choose auto, true or false")
    if requested == "false":
        return False
    if packing_supported(attn, device):
        return True
    if requested == "true":
        raise checks.CheckFailed(f"--packing true with attn_implementation {attn} on {device.type}: not verified to keep "
                                 "packed examples apart, so they could attend to each other. Use --attn_implementation "
                                 "sdpa or eager (flash_attention_2 on CUDA), or --packing false")
    log.info("packing auto: %s on %s is not verified to keep packed examples apart; using length-grouped padded "
             "batches", attn, device.type)
    return False


@dataclass
class FastPath:
    """What an SFT run decided about its batches and kernels (the metrics.json figures of the same names)."""
    attn: str
    packing: bool
    collator: object
    padded_collator: object
    optim: str
    plan: dict
    liger: bool
    allocator_tuned: bool
    leak: float | None = None

    @property
    def micro_batch(self) -> int:
        return self.plan["per_device_train_batch_size"]

    @property
    def accumulation(self) -> int:
        return self.plan["gradient_accumulation_steps"]

    @property
    def gradient_checkpointing(self) -> bool:
        return self.plan["gradient_checkpointing"]

    @property
    def checkpoint_every_n_layers(self) -> int:
        """1: every layer recomputes (or none, without checkpointing); n: layers 0, n, 2n, ... (planner's choice)."""
        return self.plan.get("checkpoint_every_n_layers", 1)

    def batching(self, sampling_strategy: str) -> str:
        if self.packing:
            return "packed"
        return "length_grouped" if sampling_strategy == "group_by_length" and self.micro_batch > 1 else "padded"

    def keep_plan_on_resume(self, plan_file: Path, resume_from) -> None:
        """A resumed run keeps its batch shape, whatever memory is free now."""
        if resume_from and plan_file.is_file():
            self.plan = {**json.loads(plan_file.read_text()), "resumed": True}
            log.info("resuming with the interrupted run's memory plan (micro-batch %d x %d)", self.micro_batch,
                     self.accumulation)

    def check_packing(self, model, features: list[dict], requested: str) -> None:
        """Measured, not assumed: packed examples that attend to each other would corrupt every step."""
        from common.collator import packed_attention_leak

        if not self.packing or len(features) < 2:
            return
        self.leak = packed_attention_leak(model, features[:2], self.collator)
        if self.leak <= PACKING_LEAK_TOLERANCE:
            log.info("packing: padding-free micro-batches, checked isolated with %s (logit change %.3g)", self.attn,
                     self.leak)
            return
        what = (f"packed examples attend to each other with attn_implementation {self.attn} (the 2nd example's "
                f"logits moved by {self.leak:.3g} when the 1st example's tokens changed)")
        if requested == "true":
            raise checks.CheckFailed(f"{what}. Use --packing false (length-grouped padded batches) or another "
                                     "--attn_implementation")
        log.warning("%s: using length-grouped padded batches instead", what)
        self.packing, self.collator = False, self.padded_collator


def choose_fast_path(cfg, args, device: torch.device, precision: str, model_path: str, pad_token_id: int,
                     batch_pinned: bool) -> FastPath:
    """Attention, packing, collator, optimizer, memory plan and kernels for an SFT run, before the model loads."""
    from common.attention import register as register_packed_attention
    from common.collator import CausalLMCollator, PaddingFreeCollator
    from common.models import pick_attn_implementation, tune_cpu_allocator

    attn = pick_attn_implementation(cfg.attn_implementation, device)
    packing = resolve_packing(cfg.packing, attn, device)
    padded = collator = CausalLMCollator(pad_token_id, pad_to_multiple_of=8)
    if packing and (attn == "sdpa_packed" or (attn == "sdpa" and cfg.attn_implementation == "auto")):
        attn = register_packed_attention()  # per-example attention, no [T, T] mask over the row
    elif attn == "sdpa_packed":
        attn = "sdpa"
    if packing:
        collator = PaddingFreeCollator(flash_attn_kwargs=attn.startswith("flash_attention"))
    optim = requested = str(getattr(args.optim, "value", args.optim))
    if device.type == "cpu" and optim.startswith("paged_"):
        optim = optim.replace("paged_", "", 1)
        log.info("paged optimizers page GPU memory to the CPU; on CPU %s runs as %s", requested, optim)
    plan = plan_memory(cfg, device, precision, optim, model_path, batch_pinned, args.per_device_train_batch_size,
                       args.gradient_accumulation_steps)
    allocator_tuned = device.type == "cpu" and allocator_headroom(plan) and tune_cpu_allocator()
    return FastPath(attn, packing, collator, padded, optim, plan, resolve_liger(cfg.use_liger_kernel, device),
                    allocator_tuned)
