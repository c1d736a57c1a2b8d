"""common/compile.py: `--torch_compile auto|true|false`.

Compiled and eager layers give the same loss and LoRA gradients on the tiny model (fast: dynamo + aot_eager, the
same graphs and autograd split without inductor's C++ build; slow: inductor), the `auto` arithmetic decides from
the planned steps and the measured step time, and impossible or unknown choices are refused before the model loads.
"""
import copy
import logging
import types

import pytest
import torch

from common import compile as comp
from common.checks import CheckFailed

CPU = torch.device("cpu")
ARGS = types.SimpleNamespace(torch_compile_backend=None, torch_compile_mode=None)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the options ------------------------------------------------------------------------------------
def test_a_value_other_than_auto_true_false_is_refused_naming_the_choices():
    with pytest.raises(CheckFailed, match=r"--torch_compile 'maybe': choose auto, true or false"):
        comp.plan_compile("maybe", ARGS, CPU, quantized=False)


def test_the_recipe_refuses_maybe_before_the_model_loads(tmp_path, tiny_dir, no_model_loads, monkeypatch):
    from common.config import load_recipe, parse_config
    from conftest import REPO

    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "sft_memory_diet.py")
    cfg, args = parse_config(recipe.CONFIGS, ["--model_name_or_path", str(tiny_dir), "--output_dir",
                                                     str(tmp_path / "run"), "--torch_compile", "maybe"])
    assert cfg.torch_compile == "maybe" and args.torch_compile is False  # the recipe owns the name
    with pytest.raises(CheckFailed, match="choose auto, true or false"):
        recipe.main(cfg, args)
    assert not (tmp_path / "run").exists()


def test_the_recipe_yaml_defaults_to_auto_and_the_trainer_never_compiles_the_whole_model():
    from common.config import load_recipe, parse_config
    from conftest import REPO

    recipe = load_recipe(REPO / "recipes" / "sft_memory_diet.py")
    cfg, args = parse_config(recipe.CONFIGS, [])
    assert cfg.torch_compile == "auto"
    assert comp.CompileWhenItPays.library_args == {"torch_compile": False, "torch_compile_backend": None,
                                                   "torch_compile_mode": None}
    cfg, args = parse_config(recipe.CONFIGS, ["--torch_compile_backend", "aot_eager"])
    assert args.torch_compile is True  # TrainingArguments turns it on for a backend...
    plan = comp.plan_compile(cfg.torch_compile, args, CPU, quantized=False)
    assert plan.backend == "aot_eager" and "no compile break-even measured for --torch_compile_backend" in \
        plan.not_measured  # ...the layers get that backend, auto stays eager without a measured break-even


def test_true_where_inductor_cannot_work_fails_fast_and_auto_says_why(monkeypatch):
    with pytest.raises(CheckFailed, match="4-bit weights on CPU"):
        comp.plan_compile("true", ARGS, CPU, quantized=True)
    assert "4-bit" in comp.plan_compile("auto", ARGS, CPU, quantized=True).not_measured
    monkeypatch.setattr(comp.shutil, "which", lambda name: None)  # no C++ compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(CheckFailed, match="needs a C[+][+] compiler"):
        comp.plan_compile("true", ARGS, CPU, quantized=False)
    plan = comp.plan_compile("auto", ARGS, CPU, quantized=False)
    state = types.SimpleNamespace(max_steps=10_000, global_step=0)
    plan.on_train_begin(None, state, None, model=None)
    assert plan.decision.compile is False and "C++ compiler" in plan.decision.reason
    assert comp.plan_compile("false", ARGS, CPU, quantized=False).requested == "false"


# ---- auto's arithmetic --------------------------------------------------------------------------------
TABLE = {"cpu": {"compile_seconds": 100.0, "speedup": 1.25}}  # each step saves 1 - 1/1.25 = 20% of its time


def test_auto_compiles_a_long_run_and_not_a_short_one():
    short = comp.decide(400, 1.0, "cpu", TABLE)  # saves 400 x 1.0 x 0.2 = 80 s < 100 s
    assert short.compile is False and short.saving_seconds == pytest.approx(80.0)
    assert "too short to pay for the compile (break-even ~500 steps at x1.25)" in short.reason
    long = comp.decide(600, 1.0, "cpu", TABLE)  # 120 s > 100 s
    assert long.compile is True and long.saving_seconds == pytest.approx(120.0) and long.compile_seconds == 100.0
    assert long.reason == "the planned steps save more than the compile costs"
    slow_steps = comp.decide(400, 2.0, "cpu", TABLE)  # same steps, twice the step time: 160 s > 100 s
    assert slow_steps.compile is True


def test_auto_stays_eager_where_compiling_was_not_faster_or_not_measured():
    none_faster = comp.decide(10**6, 5.0, "cpu", {"cpu": {"compile_seconds": 10.0, "speedup": 0.97}})
    assert none_faster.compile is False and "measured no faster on cpu (speed-up x0.97)" in none_faster.reason
    unknown = comp.decide(10**6, 5.0, "cuda", TABLE)
    assert unknown.compile is False and "no compile break-even measured on cuda" in unknown.reason
    assert set(comp.BREAK_EVEN["cpu"]) >= {"compile_seconds", "speedup", "measured"}


def test_auto_times_the_eager_steps_then_decides_once_and_logs_the_figures(monkeypatch, caplog):
    monkeypatch.setattr(comp, "BREAK_EVEN", {"cpu": {"compile_seconds": 1.0, "speedup": 2.0, "measured": "test"}})
    clock = iter([0.0, 9.0, 10.0, 10.5, 11.0, 11.5, 12.0, 12.5])  # step 1 (warm-up) 9 s, then 0.5 s steps
    monkeypatch.setattr(comp.time, "perf_counter", lambda: next(clock))
    plan = comp.plan_compile("auto", ARGS, CPU, quantized=False)
    compiled_at = []
    monkeypatch.setattr(plan, "compile", lambda model, step: compiled_at.append(step))
    state = types.SimpleNamespace(max_steps=100, global_step=0)
    with caplog.at_level(logging.INFO, logger="common.compile"):
        plan.on_train_begin(None, state, None, model=None)
        assert plan.decision is None  # nothing decided before the eager steps are timed
        for _ in range(4):
            plan.on_step_begin(None, state, None)
            state.global_step += 1
            plan.on_step_end(None, state, None, model=None)
    assert compiled_at == [3]  # decided after step 1 + MEASURED_STEPS, once
    d = plan.decision
    assert d.compile and d.planned_steps == 97 and d.eager_step_seconds == pytest.approx(0.5)
    assert d.saving_seconds == pytest.approx(97 * 0.5 * 0.5)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("torch_compile auto"))
    assert line == ("torch_compile auto: compile (the planned steps save more than the compile costs; steps left 97, "
                    "eager step 0.50 s, estimated compile 1 s, estimated saving 24 s)")
    assert plan.report()["step_seconds"] == [9.0, 0.5, 0.5, 0.5]


def test_auto_on_a_run_too_short_to_measure_stays_eager():
    plan = comp.plan_compile("auto", ARGS, CPU, quantized=False)
    plan.on_train_begin(None, types.SimpleNamespace(max_steps=3, global_step=0), None, model=None)
    assert plan.decision.compile is False and plan.decision.reason == "too short to measure (3 steps planned)"


# ---- compiled == eager on the tiny model -------------------------------------------------------------
def lora_model(tiny_dir, attn, checkpointing=False):
    from common.models import attach_lora, load_base_model

    torch.manual_seed(0)
    model = load_base_model(str(tiny_dir), CPU, "fp32", False, attn)
    model = attach_lora(model, 8, 16, 0.0, LORA_TARGETS, gradient_checkpointing=checkpointing)
    model.train()  # as the Trainer runs it (gradient checkpointing only recomputes in training mode)
    with torch.no_grad():  # lora_B starts at zero, so lora_A's gradient would be zero too: make both non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def batch(tiny_tokenizer, packed: bool):
    from common.collator import CausalLMCollator, PaddingFreeCollator
    from common.trainer import labelled_logits_inputs

    features = []
    for text, answer in (("What is your name?", "I am Orrin."), ("Say hello.", "Hello there, friend!"),
                         ("Count to three.", "One, two, three.")):
        prompt = tiny_tokenizer(text)["input_ids"]
        reply = tiny_tokenizer(" " + answer)["input_ids"] + [tiny_tokenizer.eos_token_id]
        features.append({"input_ids": prompt + reply, "loss_mask": [0] * len(prompt) + [1] * len(reply)})
    collator = PaddingFreeCollator() if packed else CausalLMCollator(tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)
    return labelled_logits_inputs({k: v for k, v in collator(features).items() if torch.is_tensor(v)})


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def check_compiled_equals_eager(tiny_dir, tiny_tokenizer, backend, attn, packed, checkpointing=False):
    from common.attention import register

    if attn == "sdpa_packed":
        register()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS.get(attn)
    eager = lora_model(tiny_dir, attn, checkpointing)
    compiled = copy.deepcopy(eager)
    inputs = batch(tiny_tokenizer, packed)
    plan = comp.CompileWhenItPays("true", CPU, backend=backend)
    torch._dynamo.reset()
    plan.compile(compiled, step=0)
    try:
        assert len(plan._layers) == 2 and all(layer._compiled_call_impl is not None for layer in plan._layers)
        loss_e, grads_e = loss_and_grads(eager, inputs)
        loss_c, grads_c = loss_and_grads(compiled, inputs)
        assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5, abs=1e-6)
        assert len(grads_e) == 2 * 7 * 2 and grads_e.keys() == grads_c.keys()  # A and B of 7 projections x 2 layers
        for name, g in grads_e.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)
        for model in (eager, compiled):  # one optimizer step each: the second loss agrees too
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p -= 0.5 * p.grad
        other = batch(tiny_tokenizer, packed)
        assert loss_and_grads(compiled, other)[0].item() == pytest.approx(loss_and_grads(eager, other)[0].item(),
                                                                          rel=1e-5, abs=1e-6)
    finally:
        plan.restore()
    assert all(layer._compiled_call_impl is None for layer in comp.decoder_layers(compiled))
    assert ALL_ATTENTION_FUNCTIONS.get(attn) is attention  # the eager attention function is back


def test_compiled_layers_give_the_eager_loss_and_lora_gradients(tiny_dir, tiny_tokenizer):
    """The recipe's default path: packed rows, sdpa_packed eager inside the compiled layers (~20 s: dynamo)."""
    check_compiled_equals_eager(tiny_dir, tiny_tokenizer, "aot_eager", "sdpa_packed", True)


@pytest.mark.slow
def test_compiled_layers_with_sdpa_inside_give_the_eager_loss_and_lora_gradients(tiny_dir, tiny_tokenizer):
    """Padded batches: sdpa (and its mask) traced into the layer's graph."""
    check_compiled_equals_eager(tiny_dir, tiny_tokenizer, "aot_eager", "sdpa", False)


@pytest.mark.slow
@pytest.mark.parametrize("attn,packed", [("sdpa_packed", True), ("sdpa", False)], ids=["packed", "padded"])
def test_inductor_layers_give_the_eager_loss_and_lora_gradients(tiny_dir, tiny_tokenizer, attn, packed):
    check_compiled_equals_eager(tiny_dir, tiny_tokenizer, "inductor", attn, packed)


@pytest.mark.slow
def test_the_recipe_with_torch_compile_true_trains_as_eager_does(tiny_dir, tmp_path):
    """Through the launcher: --torch_compile true gives the eager run's losses, and the layers are compiled."""
    import json

    from conftest import REPO, run

    runs = {}
    for mode in ("true", "false"):
        out = tmp_path / mode
        proc = run(["bash", str(REPO / "launch" / "memory_diet.sh"), "--model_name_or_path", str(tiny_dir),
                    "--output_dir", str(out), "--precision", "fp32", "--max_steps", "5", "--logging_steps", "1",
                    "--save_steps", "5", "--sample_generations", "1", "--max_new_tokens", "4",
                    "--torch_compile", mode])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads((out / "metrics.json").read_text())
        runs[mode]["losses"] = [h["loss"] for h in json.loads(
            (out / "checkpoint-5" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert "torch_compile: 2 decoder layers compiled (inductor, dynamic shapes) from optimizer step 1" in proc.stderr \
        or runs["true"]["torch_compile"]["compiled_from_step"] == 0
    assert runs["true"]["torch_compile"]["compile"] is True and runs["false"]["torch_compile"]["compile"] is False
    assert len(runs["true"]["losses"]) == 5
    assert runs["true"]["losses"] == pytest.approx(runs["false"]["losses"], rel=1e-4)
    assert runs["true"]["eval_loss_after"] == pytest.approx(runs["false"]["eval_loss_after"], rel=1e-4)


@pytest.mark.slow
def test_compiled_layers_under_gradient_checkpointing_give_the_eager_gradients(tiny_dir, tiny_tokenizer):
    """Non-reentrant checkpointing inside the compiled call (the layer forward checkpoints itself): same gradients."""
    check_compiled_equals_eager(tiny_dir, tiny_tokenizer, "inductor", "sdpa_packed", True, checkpointing=True)
