"""Padding-free packing, length grouping and auto gradient checkpointing (recipes/sft_memory_diet.py).

Packing is only correct if attention keeps the packed examples apart. These tests check it numerically
on CPU (fp32, tiny Llama) for sdpa and eager: the packed row's logits and per-token losses equal each
example run alone, and the packed batch's loss and gradients equal the padded batch's. They also pin the
two ways it silently breaks (an all-ones attention_mask, config.use_cache=True): CHRONICLES entry 46.
"""
import json
import sys

import pytest
import torch

from common.collator import IGNORE_INDEX, CausalLMCollator, PaddingFreeCollator, packed_attention_leak, tokenize_sft
from common.data import load_dataset_file, to_messages
from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "memory_diet.sh")]
IMPLEMENTATIONS = ["sdpa", "eager"]


@pytest.fixture(scope="module")
def features(tiny_tokenizer):
    records, fmt = load_dataset_file(REPO / "data/persona/train.jsonl")
    feats, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tiny_tokenizer, 256)
    return feats


def load(tiny_dir, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False  # as common.models.load_base_model does; see test_the_two_silent_leaks
    return model.train()


def test_padding_free_collator_contract(features):
    feats = features[:3]
    batch = PaddingFreeCollator()(feats)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: that is what isolates
    lengths = [len(f["input_ids"]) for f in feats]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lengths))
    assert batch["input_ids"][0].tolist() == sum((f["input_ids"] for f in feats), [])
    assert batch["position_ids"][0].tolist() == sum((list(range(n)) for n in lengths), [])
    # labels: the assistant-only labels of the padded collator, -100 at every example's first token
    padded = CausalLMCollator(0)(feats)["labels"]
    want = sum((padded[i, :n].tolist() for i, n in enumerate(lengths)), [])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    for s in starts:
        want[s] = IGNORE_INDEX
    assert batch["labels"][0].tolist() == want
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(sum(f["loss_mask"]) for f in feats)
    flash = PaddingFreeCollator(flash_attn_kwargs=True)(feats)
    assert flash["cu_seq_lens_q"].tolist() == starts + [sum(lengths)] and flash["max_length_q"] == max(lengths)


def test_padding_free_collator_rejects_what_the_padded_one_rejects():
    collate = PaddingFreeCollator()
    with pytest.raises(ValueError, match=r"batch item 1: input_ids has 3 tokens but loss_mask has 2"):
        collate([{"input_ids": [5, 6], "loss_mask": [0, 1]}, {"input_ids": [5, 6, 7], "loss_mask": [0, 1]}])
    with pytest.raises(ValueError, match="no labelled token"):
        collate([{"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]}])


def per_token_loss(logits, labels):
    """Cross-entropy of each position predicting the next label (-100: 0), as the model's loss shifts."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_packed_logits_and_losses_equal_each_example_alone(tiny_dir, features, attn):
    model = load(tiny_dir, attn)
    feats = features[:4]
    packed = PaddingFreeCollator()(feats)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        loss = per_token_loss(logits, packed["labels"][0])
        start = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = CausalLMCollator(0, pad_to_multiple_of=0)([f])
            ref = model(input_ids=alone["input_ids"]).logits[0]
            assert (logits[start:start + n] - ref).abs().max() < 1e-5
            # every position's loss, the last one included (it predicts nothing: 0, not the next example)
            assert torch.allclose(loss[start:start + n], per_token_loss(ref, alone["labels"][0]), atol=1e-5)
            assert loss[start + n - 1] == 0
            start += n
    assert packed_attention_leak(model, feats, PaddingFreeCollator()) == 0.0  # exact: same shapes, same kernels


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_packed_loss_and_gradients_equal_the_padded_batch(tiny_dir, features, attn):
    """Same loss normalisation (sum over labelled tokens / their count) and the same gradients."""
    feats = features[4:8]
    grads = []
    for collate in (CausalLMCollator(0), PaddingFreeCollator()):
        model = load(tiny_dir, attn)
        batch = collate(feats)
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded_loss, padded), (packed_loss, packed) = grads
    assert torch.allclose(packed_loss, padded_loss, atol=1e-6)
    assert padded.keys() == packed.keys() and len(packed) == 21
    for name in padded:
        assert torch.allclose(packed[name], padded[name], atol=1e-6, rtol=1e-4), name
        assert packed[name].abs().sum() > 0, name


def test_the_two_silent_leaks(tiny_dir, features):
    """What breaks isolation without an error: an attention_mask next to the position_ids, or a KV cache
    (config.use_cache=True creates one even in training mode, and packed detection is skipped)."""
    model = load(tiny_dir, "sdpa")
    feats = features[:2]
    packed = PaddingFreeCollator()(feats)
    n = len(feats[0]["input_ids"])
    with torch.no_grad():
        second_alone = model(input_ids=torch.tensor([feats[1]["input_ids"]])).logits[0]
        ok = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, n:]
        masked = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       attention_mask=torch.ones_like(packed["input_ids"])).logits[0, n:]
    assert (ok - second_alone).abs().max() < 1e-5
    assert (masked - second_alone).abs().max() > 0.05  # attends to the first example
    assert packed_attention_leak(model, feats, PaddingFreeCollator()) == 0.0
    model.config.use_cache = True
    assert packed_attention_leak(model, feats, PaddingFreeCollator()) > 0.05


def test_token_counts_of_packed_and_padded_batches(features, monkeypatch):
    """TokenCountingTrainer.training_step counts tokens (no attention_mask in packed batches: every position
    is one), labelled tokens and positions (padding included)."""
    from transformers import Trainer

    from common.trainer import TokenCountingTrainer

    monkeypatch.setattr(Trainer, "training_step", lambda self, model, inputs, num_items_in_batch=None: None)
    feats = features[:6]
    counts = []
    for collate in (CausalLMCollator(0), PaddingFreeCollator()):
        trainer = object.__new__(TokenCountingTrainer)  # only the counting, no Trainer set-up
        for i in (0, 3):
            trainer.training_step(None, collate(feats[i:i + 3]))
        counts.append((trainer.trained_tokens, trainer.trained_labelled_tokens, trainer.trained_positions))
    tokens = sum(len(f["input_ids"]) for f in feats)
    labelled = sum(sum(f["loss_mask"]) for f in feats)
    padded_positions = sum(-(-max(len(f["input_ids"]) for f in feats[i:i + 3]) // 8) * 8 * 3 for i in (0, 3))
    assert padded_positions > tokens
    assert counts == [(tokens, labelled, padded_positions), (tokens, labelled, tokens)]


# ---- the recipe ------------------------------------------------------------------------------------
def recipe(tiny_dir, out, *extra, config=None):
    cmd = LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
                      "--max_steps", "4", "--save_steps", "100", "--logging_steps", "1", "--learning_rate", "3e-3",
                      "--sample_generations", "0", "--max_new_tokens", "2", *extra]
    return run(cmd, env={"OMP_NUM_THREADS": "1", **({"CONFIG": str(config)} if config else {})})


def planner_gib(tiny_dir, batch, accumulation, grad_ckpt, every_n=1):
    from common.memory import GB, Settings, plan

    s = Settings(method="lora", lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", seq_len=256,
                 lora_dropout=0.0,  # as recipes/configs/sft_memory_diet.yaml (dropout masks are planned memory)
                 batch_size=batch, gradient_accumulation_steps=accumulation, dtype="fp32", device="cpu",
                 grad_ckpt=grad_ckpt, ckpt_every_n=every_n)
    return plan(str(tiny_dir), s)["required_bytes"] / GB


@pytest.fixture(scope="module")
def dataset_counts(tiny_tokenizer):
    records, fmt = load_dataset_file(REPO / "data/persona/train.jsonl")
    feats, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tiny_tokenizer, 256)
    return sum(len(f["input_ids"]) for f in feats), sum(sum(f["loss_mask"]) for f in feats), len(feats)


def test_recipe_packed_with_a_huge_budget(tiny_dir, tmp_path, dataset_counts):
    proc = recipe(tiny_dir, tmp_path / "packed", "--packing", "true", "--memory_budget_gb", "1000")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "packed" / "metrics.json").read_text())
    tokens, labelled, examples = dataset_counts
    assert examples == 56 and m["optimizer_steps"] == 4  # 4 steps x 16 examples = one epoch (56)
    assert m["batching"] == "packed" and m["padding_fraction"] == 0.0 and m["packing_leak"] == 0.0
    assert m["attn_implementation"] == "sdpa_packed" and m["labelled_logits_only"] is True
    assert (m["trained_tokens"], m["trained_labelled_tokens"], m["trained_positions"]) == (tokens, labelled, tokens)
    assert m["num_input_tokens_seen"] == tokens  # the Trainer's count agrees (pad == EOS would break "non_padding")
    plan = m["memory_plan"]
    assert plan["budget_gb"] == 1000 and plan["decided_by_planner"] == ["gradient_checkpointing"]
    assert plan["gradient_checkpointing"] is False and m["gradient_checkpointing"] is False
    assert (m["per_device_train_batch_size"], m["gradient_accumulation_steps"]) == (4, 4)  # pinned by the YAML
    assert "memory plan (--memory_budget_gb: 1000.0 GiB" in proc.stderr and "gradient checkpointing off" in proc.stderr
    assert "Liger kernels skipped: they need CUDA" in proc.stderr
    assert m["allocator_tuned"] is True  # 1000 GiB leaves room for the warm allocator's fragmentation
    assert m["lora_fast"]["fused_lora_linear"] == m["lora_modules"]  # every adapted layer (common/lora_fast.py)
    assert m["eval_loss_after"] < m["eval_loss_before"]


def test_recipe_padded_length_grouped_with_a_budget_that_needs_checkpointing(tiny_dir, tmp_path, dataset_counts):
    without, with_ckpt = planner_gib(tiny_dir, 4, 4, False), planner_gib(tiny_dir, 4, 4, True)
    assert with_ckpt < without
    budget = (with_ckpt + without) / 2
    proc = recipe(tiny_dir, tmp_path / "padded", "--packing", "false", "--memory_budget_gb", f"{budget:.6f}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "padded" / "metrics.json").read_text())
    tokens, labelled, _ = dataset_counts
    assert m["batching"] == "length_grouped" and m["packing_leak"] is None
    assert (m["trained_tokens"], m["trained_labelled_tokens"]) == (tokens, labelled)  # the same epoch
    assert m["trained_positions"] > tokens and m["trained_positions"] % 8 == 0
    assert m["padding_fraction"] == pytest.approx(1 - tokens / m["trained_positions"], abs=1e-4)
    assert 0 < m["padding_fraction"] < 0.25
    assert m["gradient_checkpointing"] is True and m["memory_plan"]["gradient_checkpointing"] is True
    assert "Adds gradient checkpointing" in m["memory_plan"]["reason"]
    assert "gradient checkpointing on" in proc.stderr
    # a budget the plan nearly fills: glibc's defaults (which the plan models), not the fragmenting warm heap
    assert m["allocator_tuned"] is False and "allocator: glibc's defaults kept" in proc.stderr
    assert "glibc keeps freed memory" not in proc.stderr


def test_recipe_checkpoints_half_the_layers_when_that_fits(tiny_dir, tmp_path):
    """The tiny model's 2 layers: every 2nd layer checkpointed (layer 0) fits a budget that no checkpointing
    does not; the run trains with transformers' every_n_layers and records it in its plan."""
    without, half, full = (planner_gib(tiny_dir, 4, 4, ckpt, n) for ckpt, n in ((False, 1), (True, 2), (True, 1)))
    assert full < half < without
    budget = (half + without) / 2
    proc = recipe(tiny_dir, tmp_path / "half", "--memory_budget_gb", f"{budget:.6f}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "half" / "metrics.json").read_text())
    plan = m["memory_plan"]
    assert m["gradient_checkpointing"] is True and plan["checkpoint_every_n_layers"] == 2
    assert "Adds gradient checkpointing on every 2nd layer" in plan["reason"]
    assert "gradient checkpointing on 1 of 2 layers (every 2nd)" in plan["reason"]
    assert "gradient checkpointing on every 2nd layer, micro-batch 4 x 4" in proc.stderr
    assert plan["required_gb"] == pytest.approx(half, abs=0.01)
    assert m["eval_loss_after"] < m["eval_loss_before"]


def test_recipe_nothing_fits_exits_before_the_model_loads(tiny_dir, tmp_path):
    smallest = planner_gib(tiny_dir, 4, 4, True)
    proc = recipe(tiny_dir, tmp_path / "nofit", "--memory_budget_gb", f"{smallest * 0.9:.6f}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: memory plan: nothing fits" in proc.stderr and "--method qlora" in proc.stderr
    assert "LoRA attached" not in proc.stderr and not (tmp_path / "nofit").exists()


@pytest.fixture(scope="module")
def recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_memory_diet", REPO / "recipes" / "sft_memory_diet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_unpinned_batch_is_planned_and_yaml_booleans_work(recipe_module, tiny_dir, tmp_path):
    """Batch options set nowhere (not in the YAML, not as flags): the planner picks the micro-batch, keeping
    the effective batch. Set in either place: pinned. `packing: false` in YAML is the string "false"."""
    from common.config import options_set_by_user, parse_config
    from common.fast_path import BATCH_OPTIONS, plan_memory

    lines = [line for line in (REPO / "recipes/configs/sft_memory_diet.yaml").read_text().splitlines()
             if not line.startswith(("per_device_train_batch_size", "gradient_accumulation_steps", "packing"))]
    config = tmp_path / "unpinned.yaml"
    config.write_text("\n".join(lines + ["packing: false"]) + "\n")
    argv = ["--config", str(config), "--model_name_or_path", str(tiny_dir), "--precision=fp32"]
    cfg, args = parse_config(recipe_module.CONFIGS, argv)
    assert cfg.packing == "false" and cfg.gradient_checkpointing == "auto"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 1)  # TrainingArguments' defaults
    options = options_set_by_user(recipe_module.CONFIGS, argv)
    assert {"packing", "model_name_or_path", "precision", "lora_r"} <= options
    assert not options & set(BATCH_OPTIONS)
    assert "gradient_accumulation_steps" in options_set_by_user(recipe_module.CONFIGS,
                                                                argv + ["--gradient_accumulation_steps", "2"])

    cfg.memory_budget_gb = (planner_gib(tiny_dir, 8, 2, False) + planner_gib(tiny_dir, 16, 1, False)) / 2
    plan = plan_memory(cfg, torch.device("cpu"), "fp32", "adamw_torch", str(tiny_dir), False, 1, 16)
    assert plan["decided_by_planner"] == ["gradient_checkpointing", "per_device_train_batch_size",
                                          "gradient_accumulation_steps"]
    assert (plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]) == (8, 2)
    assert plan["gradient_checkpointing"] is False and plan["fits"] is True
    pinned = plan_memory(cfg, torch.device("cpu"), "fp32", "adamw_torch", str(tiny_dir), True, 1, 16)
    assert (pinned["per_device_train_batch_size"], pinned["gradient_accumulation_steps"]) == (1, 16)


def test_packing_is_refused_or_skipped_where_isolation_is_not_verified():
    from common import fast_path

    cpu = torch.device("cpu")
    assert fast_path.resolve_packing("auto", "sdpa", cpu) and fast_path.resolve_packing("auto", "eager", cpu)
    assert fast_path.resolve_packing("false", "sdpa", cpu) is False
    assert fast_path.resolve_packing("auto", "flex_attention", cpu) is False  # length-grouped padding instead
    with pytest.raises(fast_path.checks.CheckFailed,
                       match="--packing true with attn_implementation flex_attention on cpu: not verified"):
        fast_path.resolve_packing("true", "flex_attention", cpu)
    with pytest.raises(fast_path.checks.CheckFailed, match="choose auto, true or false"):
        fast_path.resolve_packing("yes", "sdpa", cpu)
    assert fast_path.resolve_liger("auto", cpu) is False
    with pytest.raises(fast_path.checks.CheckFailed, match="need CUDA"):
        fast_path.resolve_liger("true", cpu)
