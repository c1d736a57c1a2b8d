"""`--torch_compile auto|true|false`: inductor on each decoder layer, when the planned run pays for the compile.

What is compiled: every decoder layer (`transformers.modeling_layers.GradientCheckpointingLayer`) on its own,
`nn.Module.compile(dynamic=True)` ("regional" compilation). The layers share one code object, so the compile
cost is about one layer's, not the model's; dynamic shapes mean one compile for every packed-row or padded
length instead of a recompile per new length. The embedding, LM head and loss stay eager (the loss keeps only
labelled positions, a data-dependent shape). Attention implementations that split a packed row by its
boundaries in Python (`sdpa_packed`, flash-attn's varlen path) run eagerly inside the compiled layer (one
graph break per layer); `sdpa` and `eager` are compiled with the rest. The layers go back to eager when
training ends, so evaluation and generation after training (KV cache, one token at a time) never recompile.
The Trainer's own `torch_compile` (accelerate compiling the whole PeftModel) stays off; its
`--torch_compile_backend` / `--torch_compile_mode` are used for the layers when given.

`auto` times optimizer steps 2..1+MEASURED_STEPS eagerly (step 1 pays one-off warm-up), then compiles only when

    remaining steps x eager step seconds x (1 - 1 / SPEEDUP) > COMPILE_SECONDS

with COMPILE_SECONDS and SPEEDUP measured on this project's machine by harnesses/compile_breakeven.py (BREAK_EVEN
below, with its command). Where no break-even was measured (CUDA, 4-bit weights, MoE routing), `auto` stays
eager and says why; `true` compiles anyway where it can work, and fails before the model loads where it cannot
(no C++ compiler for inductor on CPU, no Triton on CUDA, bitsandbytes 4-bit weights on CPU).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from common import checks

log = logging.getLogger(__name__)
CHOICES = ("auto", "true", "false")
MEASURED_STEPS = 2  # eager optimizer steps timed by `auto` (after step 1)
# Measured by `python harnesses/compile_breakeven.py --steps 110` (and --steps 80) on a 2-core AMD EPYC (avx512_bf16),
# torch 2.13 inductor: SmolLM2-135M-Instruct with the recipe's default YAML (LoRA r16 on all 7 projections, packed
# bf16 micro-batches, 4 x 4 accumulation), eager vs --torch_compile true, each run with an empty inductor cache.
# compile_seconds: the compiled run's first steps beyond its steady step (26.6 s and 27.9 s in the two runs);
# speedup: eager / compiled steady step seconds, the mean of x1.24 (110 steps) and x1.01 (80 steps): the step is
# mostly oneDNN matmuls either way, and on this shared VM the figure moved that much from run to run.
# Figures, load and the JSON: docs/performance.md, "When torch.compile pays".
BREAK_EVEN = {
    "cpu": {"compile_seconds": 28.0, "speedup": 1.12,
            "measured": "2-core AMD EPYC (avx512_bf16), torch 2.13 inductor, SmolLM2-135M LoRA, packed bf16"},
}
ATTENTION_COMPILED = ("sdpa", "eager")  # attention functions traced into the layer's graph; others run eagerly


@dataclass
class Decision:
    """What `auto` (or the user) decided, with the figures it was decided from (metrics.json "torch_compile")."""
    compile: bool
    reason: str
    planned_steps: int | None = None
    eager_step_seconds: float | None = None
    compile_seconds: float | None = None
    saving_seconds: float | None = None

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def cannot_compile(device: torch.device, quantized: bool) -> str | None:
    """Why inductor cannot work for this run, or None."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if not cxx or not shutil.which(cxx.split()[0]):
            return "inductor on CPU needs a C++ compiler (g++ or clang++) and none is on PATH"
        if quantized:
            return "bitsandbytes 4-bit weights on CPU are not traceable by torch.compile (QLoRA on CPU)"
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "inductor on CUDA needs Triton and it is not installed"
    elif device.type not in ("cpu", "cuda"):
        return f"no inductor break-even for device {device.type}"
    return None


def decide(planned_steps: int, eager_step_seconds: float, device_type: str,
           break_even: dict | None = None) -> Decision:
    """`auto`'s arithmetic: compile when the planned steps save more than the compile costs."""
    table = BREAK_EVEN if break_even is None else break_even
    known = table.get(device_type)
    if known is None:
        return Decision(False, f"no compile break-even measured on {device_type} (harnesses/compile_breakeven.py); "
                               "--torch_compile true compiles anyway", planned_steps, eager_step_seconds)
    cost, speedup = float(known["compile_seconds"]), float(known["speedup"])
    saving = planned_steps * eager_step_seconds * (1 - 1 / speedup) if speedup > 0 else 0.0
    if speedup <= 1:
        reason = f"compiled steps were measured no faster on {device_type} (speed-up x{speedup:.2f})"
    elif saving > cost:
        reason = "the planned steps save more than the compile costs"
    else:
        steps = cost / (eager_step_seconds * (1 - 1 / speedup))
        reason = f"too short to pay for the compile (break-even ~{steps:.0f} steps at x{speedup:.2f})"
    return Decision(saving > cost and speedup > 1, reason, planned_steps, eager_step_seconds, cost, saving)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The outermost decoder (and vision) layers: the repeated blocks worth compiling one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, GradientCheckpointingLayer):
            layers.append(module)
            inside.add(name)
    return layers


def _model_config(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "config", None)


@dataclass
class CompileWhenItPays(TrainerCallback):
    """The Trainer callback behind --torch_compile: build it with `plan_compile` (which fails fast)."""
    requested: str
    device: torch.device
    backend: str = "inductor"
    mode: str | None = None
    not_measured: str | None = None  # auto stays eager for this reason (4-bit weights, MoE, ...)
    decision: Decision | None = None
    step_seconds: list = field(default_factory=list)
    compiled_from_step: int | None = None
    _layers: list = field(default_factory=list)
    _attention: tuple | None = None
    _started: float | None = None

    # Trainer kwargs that keep transformers/accelerate from compiling the whole model as well
    library_args = {"torch_compile": False, "torch_compile_backend": None, "torch_compile_mode": None}

    def compile(self, model, step: int) -> None:
        config = _model_config(model)
        attn = getattr(config, "_attn_implementation", None)
        if attn and attn not in ATTENTION_COMPILED:  # boundaries in Python, .tolist(), cu_seqlens: keep eager
            from transformers import AttentionInterface
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            original = ALL_ATTENTION_FUNCTIONS.get(attn)
            # a run that crashed before on_train_end left its wrapper registered: wrap the function itself
            original = getattr(original, "_torchdynamo_orig_callable", original)
            if original is not None:
                AttentionInterface.register(attn, torch.compiler.disable(original))
                self._attention = (attn, original)
        self._layers = decoder_layers(model)
        if not self._layers:
            log.warning("torch_compile: no decoder layers (GradientCheckpointingLayer) found; training eagerly")
            return
        for layer in self._layers:
            layer.compile(backend=self.backend, mode=self.mode, dynamic=True)
        self.compiled_from_step = step
        log.info("torch_compile: %d decoder layers compiled (%s%s, dynamic shapes) from optimizer step %d; "
                 "attention %s", len(self._layers), self.backend, f", mode {self.mode}" if self.mode else "", step + 1,
                 "compiled" if self._attention is None else f"{attn} eager inside the compiled layers")

    def restore(self) -> None:
        for layer in self._layers:
            layer._compiled_call_impl = None
        if self._attention is not None:
            from transformers import AttentionInterface

            AttentionInterface.register(*self._attention)
        self._layers, self._attention = [], None

    # ---- TrainerCallback --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        planned = state.max_steps - state.global_step
        if self.requested in ("true", "false"):
            self.decision = Decision(self.requested == "true", f"--torch_compile {self.requested}", planned)
        elif self.not_measured:
            self.decision = Decision(False, self.not_measured, planned)
        elif self.requested == "auto" and planned <= 1 + MEASURED_STEPS:
            self.decision = Decision(False, f"too short to measure ({planned} steps planned)", planned)
        if self.decision is not None:
            self._announce()
            if self.decision.compile:
                self.compile(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._started is not None:
            self.step_seconds.append(time.perf_counter() - self._started)
        if self.decision is None and self.requested == "auto" and len(self.step_seconds) == 1 + MEASURED_STEPS:
            eager = statistics.mean(self.step_seconds[1:])
            self.decision = decide(state.max_steps - state.global_step, eager, self.device.type)
            self._announce()
            if self.decision.compile:
                self.compile(model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def _announce(self) -> None:
        d = self.decision
        figures = ", ".join(f"{name} {value}" for name, value in (
            ("steps left", d.planned_steps),
            ("eager step", f"{d.eager_step_seconds:.2f} s" if d.eager_step_seconds is not None else None),
            ("estimated compile", f"{d.compile_seconds:.0f} s" if d.compile_seconds is not None else None),
            ("estimated saving", f"{d.saving_seconds:.0f} s" if d.saving_seconds is not None else None))
            if value is not None)
        log.info("torch_compile %s: %s (%s; %s)", self.requested, "compile" if d.compile else "eager", d.reason, figures)

    def report(self) -> dict:
        """metrics.json "torch_compile": the decision, its figures, and the step times of this segment."""
        out = {"requested": self.requested, "backend": self.backend, "compiled_from_step": self.compiled_from_step,
               **(self.decision.as_dict() if self.decision else {"compile": False})}
        out["step_seconds"] = [round(s, 4) for s in self.step_seconds]
        return out


def plan_compile(requested: str, args, device: torch.device, quantized: bool, model_path: str | None = None) -> \
        CompileWhenItPays:
    """--torch_compile checked before the model loads: a bad value, or `true` where inductor cannot work, is
    CheckFailed. TrainingArguments' --torch_compile_backend / --torch_compile_mode pick the backend and mode."""
    if requested not in CHOICES:
        raise checks.CheckFailed(f"--torch_compile {requested!r}: choose auto, true or false")
    backend = getattr(args, "torch_compile_backend", None) or "inductor"
    blocked = cannot_compile(device, quantized) if backend == "inductor" else None
    if blocked and requested == "true":
        raise checks.CheckFailed(f"--torch_compile true: {blocked}. Use --torch_compile false (or auto)")
    not_measured = blocked
    if not_measured is None and quantized:
        not_measured = "no compile break-even measured with 4-bit (QLoRA) weights"
    if not_measured is None and model_path and _is_moe(model_path):
        not_measured = "MoE expert routing is data-dependent (graph breaks per layer); no break-even measured"
    if not_measured is None and backend != "inductor":
        not_measured = f"no compile break-even measured for --torch_compile_backend {backend}"
    return CompileWhenItPays(requested, device, backend, getattr(args, "torch_compile_mode", None), not_measured)


def _is_moe(model_path: str) -> bool:
    from common.memory import load_config

    try:
        config = load_config(model_path)
    except (OSError, ValueError):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
