"""Bottleneck adapters (Houlsby et al. 2019, seed 001): serial adapters after attention and after the MLP.

Each adapter maps a sublayer's output y to  y + W_up . gelu(W_down . y + b_down) + b_up, with a
bottleneck of `size` units: d*size + size + size*d + d parameters for hidden size d. Two per decoder
layer (after self-attention and after the MLP, before the residual add), base model frozen.

W_up and b_up start at zero, so the adapted model computes exactly what the base does until the
first optimizer step (the test checks the logits are equal). That makes W_down's first gradient
exactly zero, like LoRA's A (common.checks.check_gradient_flow knows both).

peft has no serial bottleneck adapter. This one is attached with forward hooks, so the base's
parameter names and state_dict keys do not change; the adapters live at
`<layer>.attn_adapter.*` and `<layer>.mlp_adapter.*`. They are kept in fp32 (as peft keeps LoRA)
and cast the sublayer output to fp32 and back.
"""
from __future__ import annotations

import torch
from torch import nn

from common.checks import CheckFailed


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.adapter_down = nn.Linear(hidden_size, size)       # default (Kaiming-uniform) init
        self.act = nn.GELU()
        self.adapter_up = nn.Linear(size, hidden_size)
        nn.init.zeros_(self.adapter_up.weight)                 # starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        delta = self.adapter_up(self.act(self.adapter_down(y.to(self.adapter_down.weight.dtype))))
        return y + delta.to(y.dtype)


def _after(adapter: BottleneckAdapter):
    """Forward hook: run `adapter` on the sublayer's output (attention returns (output, weights))."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)
    return hook


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers: the first ModuleList whose entries have `self_attn` and `mlp` (Llama, Mistral, Qwen...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                hasattr(m, "self_attn") and hasattr(m, "mlp") for m in module):
            return list(module)
    raise CheckFailed("bottleneck adapters: no decoder layers with `self_attn` and `mlp` found in "
                      f"{type(model).__name__}; this implementation supports Llama-style blocks")


def attach_bottleneck_adapters(model, size: int) -> int:
    """Freeze `model`, add an adapter after every attention and MLP sublayer; returns the adapter count."""
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = model.config.get_text_config().hidden_size
    device = next(model.parameters()).device
    count = 0
    for layer in decoder_layers(model):
        for where in ("self_attn", "mlp"):
            adapter = BottleneckAdapter(hidden, size).to(device=device, dtype=torch.float32)
            layer.add_module("attn_adapter" if where == "self_attn" else "mlp_adapter", adapter)
            getattr(layer, where).register_forward_hook(_after(adapter))
            count += 1
    return count
