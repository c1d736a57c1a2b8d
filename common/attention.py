"""`sdpa_packed`: attention for padding-free (packed) batches that only computes what each example sees.

transformers' own `sdpa` handles a packed row (position_ids restarting at 0, no attention_mask) by
materialising a dense block-diagonal [T, T] mask and running ONE masked attention over the whole
row: every query meets every key of every other example, and the mask throws those scores away.
In a torch.profiler trace of one packed SmolLM2-135M micro-batch (1,270 tokens, 2-core CPU) that
attention was 36% of the step; the benchmark's ablation gives its share of a whole run
(docs/performance.md, "Performance benchmark"; CHRONICLES "Packed attention pays for the whole row squared").

`sdpa_packed` runs `scaled_dot_product_attention(is_causal=True)` once per example instead: the
same result (isolation by construction, and `packed_attention_leak` still checks it on the real
model before step 1), sum(L_i^2) work instead of T^2, and no [T, T] mask at all. Boundaries come
from `cu_seq_lens_q` when the collator provides them, else from the position_ids restarts.
Everything else (a padded batch with an attention_mask, KV-cache decoding in `generate`) falls
through to transformers' `sdpa` unchanged, so one loaded model trains packed and evaluates and
generates as usual.

Register once per process with `register()`, then load with `attn_implementation="sdpa_packed"`.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"
# On CPU, sdpa's fused flash kernel loses to the plain math path (two bmm + softmax) on short examples
# and wins on long ones: fwd+bwd of one SmolLM2 layer (9 heads x 64, GQA 3), bf16, 2 threads:
# L=128 flash 3.3 ms / math 2.6 ms, L=256 7.0 / 8.2, L=512 21.8 / 32.3 (`python -m common.attention`
# prints this table for the machine it runs on)
CPU_MATH_MAX_LEN = 192
_bounds_cache: tuple = (None, None)  # (weakref to the position_ids/cu_seq_lens tensor, its boundaries)


def sequence_boundaries(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None,
                        length: int) -> list[int]:
    """[0, end_1, end_2, ..., length]: where each packed example starts and ends in the row."""
    if cu_seq_lens is not None:
        bounds = [int(b) for b in cu_seq_lens.tolist()]
        if bounds[0] != 0 or bounds[-1] != length:
            raise ValueError(f"cu_seq_lens {bounds[:3]}...{bounds[-1:]} do not cover the {length}-token row")
        return bounds
    if position_ids is None:
        return [0, length]
    pos = position_ids.reshape(-1)
    if pos.numel() != length:
        raise ValueError(f"position_ids has {pos.numel()} entries for a {length}-token packed row")
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return starts + [length]


def cached_boundaries(position_ids, cu_seq_lens, length: int) -> list[int]:
    """`sequence_boundaries`, computed once per forward pass instead of once per layer (a .tolist() each).

    The cache holds a weak reference to the very tensor object it was computed from: a later batch is a new
    tensor, so its boundaries are never taken from a previous one, even at a reused memory address.
    """
    global _bounds_cache
    source = cu_seq_lens if cu_seq_lens is not None else position_ids
    ref, bounds = _bounds_cache
    if source is not None and ref is not None and ref() is source and bounds[-1] == length:
        return bounds
    bounds = sequence_boundaries(position_ids, cu_seq_lens, length)
    _bounds_cache = (weakref.ref(source) if source is not None else None, bounds)
    return bounds


def sdpa_packed_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, q_len, _ = query.shape
    packed = (attention_mask is None and batch == 1 and q_len == key.shape[2] and q_len > 1
              and getattr(module, "is_causal", True)
              and all(kwargs.get(k) is None for k in ("position_bias", "softcap", "s_aux")))  # else sdpa's handling
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cached_boundaries(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), q_len)
    window = getattr(module, "sliding_window", None)
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        mask, causal = None, True
        if window is not None and end - start > window:  # sliding-window models: causal band of width `window`
            i = torch.arange(end - start, device=query.device)
            mask, causal = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window), False
        short_on_cpu = query.device.type == "cpu" and end - start <= CPU_MATH_MAX_LEN
        with sdpa_kernel_math() if short_on_cpu else contextlib.nullcontext():
            outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                          is_causal=causal, enable_gqa=gqa))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def sdpa_kernel_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def sdpa_packed_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No [T, T] mask for a padding-free row (the attention splits it); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `attn_implementation="sdpa_packed"` loadable in this process (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_packed_forward)
    AttentionMaskInterface.register(NAME, sdpa_packed_mask)
    return NAME


def _time_backends(lengths=(32, 64, 128, 256, 512, 1024), heads=9, kv_heads=3, head_dim=64, repeats=10) -> None:
    """`python -m common.attention`: fwd+bwd ms of one causal attention per backend and length (CPU_MATH_MAX_LEN)."""
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, {heads} heads x {head_dim}, "
          f"{kv_heads} kv heads: ms per forward+backward")
    for length in lengths:
        q = torch.randn(1, heads, length, head_dim, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, kv_heads, length, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        row = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            def step():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out.backward(torch.ones_like(out))
            step()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            row.append(1000 * (time.perf_counter() - start) / repeats)
        print(f"L={length:5d}  flash {row[0]:7.2f}  math {row[1]:7.2f}  -> {'math' if row[1] < row[0] else 'flash'}")


if __name__ == "__main__":
    _time_backends()
