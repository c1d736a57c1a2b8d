"""Two costs peft's LoRA layer adds to every training step, removed with the same maths.

**The output scale, a full pass over every adapted layer's output.** peft computes
`result + lora_B(lora_A(dropout(x))) * scaling`: the [tokens x out] product is multiplied by the scale and
then added to the base output, two elementwise passes forward and one more backward, over outputs as wide as
the base layer's (1536 for SmolLM2's MLP). `FusedLoraLinear` scales the rank-r intermediate instead and lets
the matmul add into the base output: `addmm(result, (A x) * scaling, B^T)`, the same sum with one rounding
less (bf16 outputs agree to one ulp). It takes this path only for plain LoRA on one active adapter, unmerged,
without DoRA or other variants, lora_bias, fan_in_fan_out, mixed-adapter batches or extra arguments; every
other call is peft's own forward. Under autocast peft's cast of the input to the adapter's fp32 is skipped
(autocast casts it straight back for the matmul, so the result is bit-identical, CHRONICLES 50).

**The dropout mask.** peft puts an `nn.Dropout` in front of every adapter (`lora_dropout`). On CPU its mask comes from
`bernoulli_`, one Mersenne-Twister draw per element: 3.7-5.4 ms for one [1272 x 576] activation on this repo's
2-core CPU, against 0.4-0.7 ms for the multiply that applies it; with 7 adapted projections in 30 layers that was
about a third of SmolLM2-135M's LoRA step (CHRONICLES 99). `CpuDropout` draws one 64-bit number per four
elements instead and compares each 16-bit quarter with a threshold: the same Bernoulli mask in distribution,
four times fewer draws (1.0 ms; `python -m common.lora_fast` prints these three), still from torch's seeded default generator, so a run stays reproducible.
The drop probability is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031).

On CUDA (Philox, fast), in eval mode or at p = 0 it is plain `nn.Dropout`. `use_cpu_dropout(model)` swaps it
into every LoRA layer of a peft model; nothing is saved with it (dropout has no weights), so the adapter and
its config are those peft writes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16  # one 16-bit quarter of a 64-bit draw per element


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale, keeping only the bool mask for backward (as torch's native dropout does)."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None, None


def keep_mask(shape, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - round(p * 65536) / 65536."""
    numel = math.prod(shape)
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    quarters = draws.view(torch.int16)[:numel]  # four independent uniform 16-bit values per draw
    threshold = -(LEVELS // 2) + round(p * LEVELS)  # int16 runs from -32768: P(value < threshold) = dropped share
    return quarters.ge(threshold).view(shape)


class CpuDropout(nn.Dropout):
    """nn.Dropout with a 4x cheaper mask on CPU (module docstring); identical elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p >= 1:
            return x.mul(0)  # all dropped, still in the graph (as nn.Dropout)
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))


def use_cpu_dropout(model) -> int:
    """Swap every LoRA layer's nn.Dropout (p > 0) for CpuDropout with the same p; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                replacement = CpuDropout(dropout.p, dropout.inplace)
                replacement.train(dropout.training)
                dropouts[name] = replacement
                swapped += 1
    return swapped


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


class FusedLoraLinear(_lora_linear_class()):
    """peft's lora.Linear with the output scale folded into the rank-r intermediate (module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        if (args or kwargs or name is None or self.disable_adapters or self.merged or self.fan_in_fan_out
                or name not in self.lora_A or name in self.lora_variant or self.lora_bias.get(name)):
            return super().forward(x, *args, **kwargs)
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        base_weight = getattr(self.get_base_layer(), "weight", None)
        if not torch.is_autocast_enabled(x.device.type) and not (
                base_weight is not None and x.dtype == weight_a.dtype == weight_b.dtype == base_weight.dtype):
            return super().forward(x, *args, **kwargs)  # mixed dtypes without autocast: peft's casts
        result = self.base_layer(x)
        low_rank = F.linear(self.lora_dropout[name](x), weight_a) * self.scaling[name]
        shape = result.shape
        return torch.addmm(result.reshape(-1, shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                           weight_b.t()).view(shape)


def speed_up_lora(model) -> dict[str, int]:
    """FusedLoraLinear for every plain peft lora.Linear and CpuDropout for every LoRA dropout with p > 0, in
    place; returns how many layers each reached. Weights, state_dict keys and the saved adapter are unchanged."""
    plain = _lora_linear_class()
    fused = 0
    for module in model.modules():
        if type(module) is plain:
            module.__class__ = FusedLoraLinear
            fused += 1
    return {"fused_lora_linear": fused, "cpu_dropout": use_cpu_dropout(model)}


def _time_layers(tokens: int = 1272, repeats: int = 10) -> None:
    """`python -m common.lora_fast`: ms per forward+backward of one SmolLM2-sized LoRA layer, peft's against
    this module's (bf16 autocast, r=16), and of its dropout mask, nn.Dropout against CpuDropout."""
    import time

    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    def ms(fn):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - start) / repeats

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {tokens} tokens, bf16")
    activation = torch.randn(tokens, 576, dtype=torch.bfloat16)
    mask = keep_mask(activation.shape, 0.05)
    print(f"one [{tokens} x 576] mask, ms: bernoulli_ {ms(lambda: torch.empty_like(activation).bernoulli_(0.95)):.2f}  "
          f"keep_mask {ms(lambda: keep_mask(activation.shape, 0.05)):.2f}  applying it {ms(lambda: activation * mask):.2f}")
    print("ms per forward+backward:")
    for width, out in ((576, 1536), (1536, 576)):
        x = torch.randn(1, tokens, width, dtype=torch.bfloat16, requires_grad=True)
        x_drop = x.detach().reshape(tokens, width).requires_grad_()
        native, cpu = nn.Dropout(0.05), CpuDropout(0.05)
        drop = [ms(lambda d=d: d(x_drop).sum().backward()) for d in (native, cpu)]
        layer = get_peft_model(nn.Sequential(nn.Linear(width, out, bias=False)).to(torch.bfloat16),
                               LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
        fused = get_peft_model(nn.Sequential(nn.Linear(width, out, bias=False)).to(torch.bfloat16),
                               LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
        speed_up_lora(fused)

        def step(model):
            with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model):
                model(x).sum().backward()

        linear = [ms(lambda m=m: step(m)) for m in (layer, fused)]
        print(f"{width:5d} -> {out:5d}  LoRA layer: peft {linear[0]:6.2f}  fused {linear[1]:6.2f}   "
              f"dropout 0.05 on its input: nn.Dropout {drop[0]:6.2f}  CpuDropout {drop[1]:6.2f}")


if __name__ == "__main__":
    _time_layers()
