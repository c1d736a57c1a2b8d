"""The SFT recipe's speed-ups change the speed, not the numbers.

- `sdpa_packed` (common/attention.py): per-example attention on packed rows gives the logits of sdpa's
  block-diagonal mask, never builds a [T, T] mask, and leaves padded batches and generation to sdpa.
- labelled-only logits (common/trainer.py): the same loss and LoRA gradients as full logits, with the LM
  head evaluated only where a label follows.
- training steps skip peft's fp32 cast of adapter inputs under autocast: bit-identical loss and gradients.
- the glibc allocator settings (common/models.py) apply on this Linux machine.
"""
from __future__ import annotations

import pytest
import torch

from common.attention import NAME, register, sequence_boundaries
from common.collator import CausalLMCollator, PaddingFreeCollator, packed_attention_leak, tokenize_sft
from common.data import load_dataset_file, to_messages
from common.trainer import accepts_logits_to_keep, labelled_logits_inputs
from conftest import REPO


@pytest.fixture(scope="module")
def features(tiny_tokenizer):
    records, fmt = load_dataset_file(REPO / "data/persona/train.jsonl")
    feats, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tiny_tokenizer, 256)
    return feats


def load(tiny_dir, attn, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn, dtype=dtype)
    model.config.use_cache = False
    return model.train()


def lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                        task_type="CAUSAL_LM", init_lora_weights=False)  # B != 0: the adapter changes the output
    return get_peft_model(model, config)


# ---- sdpa_packed ------------------------------------------------------------------------------------
def test_sequence_boundaries_from_position_ids_and_cu_seq_lens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sequence_boundaries(pos, None, 9) == [0, 3, 5, 9]
    assert sequence_boundaries(None, torch.tensor([0, 3, 5, 9], dtype=torch.int32), 9) == [0, 3, 5, 9]
    assert sequence_boundaries(None, None, 9) == [0, 9]
    assert sequence_boundaries(torch.tensor([[2, 3, 0, 1]]), None, 4) == [0, 2, 4]  # a row starting mid-example
    with pytest.raises(ValueError, match="do not cover the 9-token row"):
        sequence_boundaries(None, torch.tensor([0, 3, 5]), 9)
    with pytest.raises(ValueError, match="position_ids has 4 entries for a 9-token packed row"):
        sequence_boundaries(torch.tensor([[0, 1, 0, 1]]), None, 9)


def test_sdpa_packed_matches_sdpa_on_packed_and_padded_batches(tiny_dir, features, monkeypatch):
    register()
    feats = features[:4]
    sdpa, packed_impl = load(tiny_dir, "sdpa"), load(tiny_dir, NAME)
    assert packed_impl.config._attn_implementation == NAME
    packed = PaddingFreeCollator()(feats)
    padded = CausalLMCollator(0)(feats)
    with torch.no_grad():
        want = sdpa(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        want_padded = sdpa(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        # the packed row never gets a [T, T] mask: the mask function returns None
        import transformers.masking_utils as masking

        calls = []
        real = masking.sdpa_mask
        monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: calls.append(k.get("attention_mask")) or real(*a, **k))
        got = packed_impl(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        assert calls == []
        got_padded = packed_impl(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert len(calls) >= 1 and calls[0] is not None  # padded batches: sdpa's own mask
    assert (got - want).abs().max() < 1e-5
    assert (got_padded - want_padded).abs().max() == 0  # the very same sdpa call
    assert packed_attention_leak(packed_impl, feats[:2], PaddingFreeCollator()) == 0.0
    # boundaries from the collator's cu_seq_lens give the same result as from position_ids
    with_cu = PaddingFreeCollator(flash_attn_kwargs=True)(feats)
    with torch.no_grad():
        got_cu = packed_impl(**{k: v for k, v in with_cu.items() if k != "labels"}).logits
    assert torch.equal(got_cu, got)


def test_sdpa_packed_gradients_and_generation_match_sdpa(tiny_dir, tiny_tokenizer, features):
    register()
    feats = features[:3]
    batch = PaddingFreeCollator()(feats)
    grads = []
    for attn in ("sdpa", NAME):
        model = load(tiny_dir, attn)
        model(**batch).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert (grads[0] - grads[1]).abs().max() < 1e-5 and grads[0].abs().max() > 0
    prompt = tiny_tokenizer(["hello there", "a longer prompt than the other"], return_tensors="pt", padding=True)
    outs = []
    for attn in ("sdpa", NAME):
        model = load(tiny_dir, attn).eval()
        model.config.use_cache = True
        outs.append(model.generate(**prompt, max_new_tokens=6, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_sdpa_packed_boundaries_are_not_reused_across_batches(tiny_dir, features):
    """The per-forward boundary cache keys on the tensor object: the next batch, even of the same length,
    is split where its own examples are."""
    register()
    model = load(tiny_dir, NAME)
    sdpa = load(tiny_dir, "sdpa")
    a = PaddingFreeCollator()(features[:2])
    t = a["input_ids"].shape[1]
    b_pos = torch.cat([torch.arange(5), torch.arange(t - 5)])[None]  # same length, different split
    with torch.no_grad():
        model(input_ids=a["input_ids"], position_ids=a["position_ids"])
        got = model(input_ids=a["input_ids"], position_ids=b_pos).logits
        want = sdpa(input_ids=a["input_ids"], position_ids=b_pos).logits
    assert (got - want).abs().max() < 1e-5


# ---- labelled-only logits ---------------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_labelled_logits_only_gives_the_same_loss_and_gradients(tiny_dir, features, batching):
    feats = features[:4]
    batch = PaddingFreeCollator()(feats) if batching == "packed" else CausalLMCollator(0)(feats)
    model = lora(load(tiny_dir, "sdpa"))
    assert accepts_logits_to_keep(model)
    results = []
    for inputs in (batch, labelled_logits_inputs(batch)):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.shape,
                        [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]))
    (full_loss, full_shape, full_grads), (kept_loss, kept_shape, kept_grads) = results
    labelled_next = int((batch["labels"][..., 1:] != -100).sum())
    assert kept_shape[0] == labelled_next < full_shape[-2] * full_shape[0]  # the head ran on labelled positions only
    assert abs(float(full_loss) - float(kept_loss)) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(full_grads, kept_grads)) < 1e-5
    assert all(g.abs().max() > 0 for g in kept_grads)


def test_labelled_logits_inputs_leaves_inputs_without_labels_alone():
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    assert labelled_logits_inputs(batch) is batch
    labels = torch.tensor([[-100, 5, 6, -100]])
    out = labelled_logits_inputs({"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": labels})
    assert out["logits_to_keep"].tolist() == [[True, True, False, False]]  # position i predicts label i+1
    assert out["shift_labels"].tolist() == [5, 6]


def test_accepts_logits_to_keep_is_false_for_a_model_without_it():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(2, 2)

        def forward(self, input_ids, labels=None):
            return None

    assert not accepts_logits_to_keep(Head())
    assert not accepts_logits_to_keep(torch.nn.Linear(2, 2))


# ---- adapter input cast under autocast --------------------------------------------------------------
def test_skipping_peft_input_cast_under_autocast_is_bit_identical(tiny_dir, features):
    from peft.helpers import disable_input_dtype_casting

    batch = PaddingFreeCollator()(features[:3])
    model = lora(load(tiny_dir, "sdpa", dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # peft keeps adapters fp32
    results = []
    for skip in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if skip:
                with disable_input_dtype_casting(model):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


# ---- allocator ------------------------------------------------------------------------------------
def test_the_warm_allocator_only_where_the_budget_has_room_for_its_fragmentation(caplog):
    from common.fast_path import TUNED_ALLOCATOR_HEADROOM, allocator_headroom

    given = {"budget_gb": 3.81, "budget_source": "--memory_budget_gb", "fits": True}
    with caplog.at_level("INFO", logger="common.fast_path"):
        # the benchmark's recipe_at_peer_memory: 3.80 GiB planned in a 3.81 GiB budget peaked at 4.13 GiB warm
        assert allocator_headroom({**given, "required_gb": 3.80}) is False
    assert "glibc's defaults kept" in caplog.text and "3.80 GiB of the 3.81 GiB" in caplog.text
    assert allocator_headroom({**given, "required_gb": 3.81 / TUNED_ALLOCATOR_HEADROOM}) is True
    assert allocator_headroom({**given, "required_gb": 3.81 / TUNED_ALLOCATOR_HEADROOM + 0.01}) is False
    assert allocator_headroom({**given, "fits": False, "required_gb": None}) is False  # pinned, run anyway
    # the planner could not plan: warm only when nobody set a budget
    assert allocator_headroom({**given, "fits": None}) is False
    assert allocator_headroom({**given, "fits": None, "budget_source": "MemAvailable"}) is True


def test_tune_cpu_allocator_applies_on_glibc_linux():
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc-only settings")
    code = ("import torch; from common.models import tune_cpu_allocator; assert tune_cpu_allocator() is True; "
            "print(int(torch.ones(256 << 20, dtype=torch.uint8).sum()))")  # in its own process: settings are global
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(256 << 20)  # large allocations still work from the heap


# ---- --profile_steps -----------------------------------------------------------------------------
def test_step_profiler_writes_the_matmul_share_of_the_profiled_steps(tmp_path):
    """StepProfiler traces the requested optimizer steps only (step 1 is warm-up) and writes its tables."""
    from transformers import TrainerControl, TrainerState

    from common.trainer import StepProfiler

    out = tmp_path / "profile.txt"
    prof, state, a, b = StepProfiler(2, out), TrainerState(), torch.randn(64, 64), torch.randn(64, 64)
    for step in range(4):
        state.global_step = step
        prof.on_step_begin(None, state, TrainerControl())
        a @ b
        state.global_step = step + 1
        prof.on_step_end(None, state, TrainerControl())
        if step == 0:
            assert prof.prof is None  # step 1 not profiled
    text = out.read_text()
    assert text.startswith("profiled optimizer steps 2-3:")
    assert "aten::mm" in text and "share of that time: aten::mm" in text
    assert prof.done and prof.prof is None
