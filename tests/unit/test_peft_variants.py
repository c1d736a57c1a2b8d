"""The LoRA variants peft already has, as options of every adapter recipe (common.models.LoraOptions): DoRA,
rsLoRA, PiSSA/OLoRA/gaussian init and the LoRA+ learning-rate ratio; the planner's DoRA count; one recipe run."""
import json
import math

import pytest
import torch

from common.checks import CheckFailed
from common.models import LoraOptions, attach_lora, save_adapter
from conftest import REPO, run

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def lora(tiny_dir, **options):
    return attach_lora(tiny_model(tiny_dir), LoraOptions(lora_r=4, lora_alpha=8, lora_target_modules=TARGETS, **options))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 23, 42, 77, 3, 11, 64, 8]])


def test_each_option_reaches_peft_lora_config():
    config = LoraOptions(use_dora=True, use_rslora=True, lora_init="olora").lora_config()
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "olora")
    assert LoraOptions().lora_config().init_lora_weights is True  # "default": peft's own (A Kaiming, B zero)
    assert not LoraOptions().lora_config().use_dora and not LoraOptions().lora_config().use_rslora
    for init in ("gaussian", "pissa", "pissa_niter_4"):
        assert LoraOptions(lora_init=init).lora_config().init_lora_weights == init


def test_bad_values_are_refused_with_the_fix():
    with pytest.raises(CheckFailed, match="did you mean pissa"):
        LoraOptions(lora_init="pisa").check_lora_variants()
    with pytest.raises(CheckFailed, match=r"--method qlora.*--method lora, or --lora_init default"):
        LoraOptions(lora_init="pissa_niter_4").check_lora_variants(quantized=True)
    with pytest.raises(CheckFailed, match="--loraplus_lr_ratio -1.0.*>= 1"):
        LoraOptions(loraplus_lr_ratio=-1.0).check_lora_variants()
    # a recipe whose library trainer builds its own optimizer refuses LoRA+ instead of ignoring it
    with pytest.raises(CheckFailed, match="without LoRA\\+ groups"):
        LoraOptions(loraplus_lr_ratio=16).lora_config()
    LoraOptions(use_dora=True).check_lora_variants(quantized=True)  # peft's DoRA dequantizes 4-bit weights


def test_dora_trainable_count_equals_the_planner(tiny_dir):
    from common.memory import Settings, plan

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    dora, plain = lora(tiny_dir, use_dora=True), lora(tiny_dir)
    magnitudes = [m.lora_magnitude_vector["default"].weight.numel() for m in dora.modules() if hasattr(m, "lora_A")
                  and len(m.lora_A)]
    assert magnitudes and trainable(dora) == trainable(plain) + sum(magnitudes)
    settings = Settings(method="lora", lora_r=4, lora_targets=",".join(TARGETS), device="cpu", dtype="fp32")
    assert plan(str(tiny_dir), settings, use_dora=True)["trainable_params"] == trainable(dora)
    assert plan(str(tiny_dir), settings)["trainable_params"] == trainable(plain)
    assert plan(str(tiny_dir), settings, use_dora=True)["total_params"] == sum(p.numel() for p in dora.parameters())


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_dir):
    layer = lora(tiny_dir, use_rslora=True).base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert lora(tiny_dir).base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_start_at_the_base_and_save_a_lora_the_stock_base_reproduces(tiny_dir, tmp_path, init):
    from peft import PeftModel

    base = logits(tiny_model(tiny_dir), IDS)
    model = lora(tiny_dir, lora_init=init)
    assert (logits(model, IDS) - base).abs().max() < 1e-4  # the principal part moved from the base into the adapter
    with torch.no_grad():  # stands in for training: the adapter moves away from its start
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.02 * torch.randn_like(p))
    trained = logits(model, IDS)
    assert (trained - base).abs().max() > 1e-3
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # a plain LoRA of rank 2r
    reloaded = PeftModel.from_pretrained(tiny_model(tiny_dir), tmp_path / "adapter")
    assert (logits(reloaded, IDS) - trained).abs().max() < 1e-4
    merged = PeftModel.from_pretrained(tiny_model(tiny_dir), tmp_path / "adapter").merge_and_unload()
    assert (logits(merged, IDS) - trained).abs().max() < 1e-4


def test_loraplus_puts_lora_b_at_ratio_times_lr(tiny_dir, tmp_path):
    from transformers import TrainingArguments

    from common.trainer import TokenCountingTrainer

    model = lora(tiny_dir, use_dora=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-3, weight_decay=0.1,
                             report_to="none")
    trainer = TokenCountingTrainer(model=model, args=args)
    trainer.loraplus_lr_ratio = 16.0
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(names)  # every trainable parameter, once
    for name, p in names.items():
        expected = 16e-3 if ("lora_B" in name or "magnitude" in name) else 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert type(optimizer).__name__ == "AdamW"  # --optim's class (adamw_torch)
    plain = TokenCountingTrainer(model=model, args=args).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


LAUNCHER = ["bash", str(REPO / "launch" / "memory_diet.sh")]


def train(tiny_dir, out, *extra):
    return run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--precision", "fp32",
                           "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "3e-3",
                           "--sample_generations", "0", "--max_new_tokens", "4", *extra])


def merge_export(adapter, out):
    return run(["bash", str(REPO / "launch" / "merge_export.sh"), "--adapter_path", str(adapter), "--output_dir",
                str(out), "--gguf_type", "none", "--num_samples", "2"])


@pytest.mark.slow  # recipe and merge-export processes, minutes on 2 cores; pytest -m slow
def test_recipe_trains_with_dora_and_loraplus_resumes_and_merges(tiny_dir, tmp_path):
    import shutil

    out = tmp_path / "dora"
    proc = train(tiny_dir, out, "--use_dora", "true", "--loraplus_lr_ratio", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 4 and sum(losses[-2:]) / 2 < losses[0]
    # the LoRA+ optimizer's state saves and loads: a run resumed from checkpoint-2 ends where this one did
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("metrics.json", "adapter", "runs"))
    (resumed / "checkpoint-4" / "checkpoint_ok.json").unlink()
    manifest = json.loads((resumed / "manifest.json").read_text())
    manifest["config"]["output_dir"] = str(resumed)
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    proc = train(tiny_dir, resumed, "--use_dora", "true", "--loraplus_lr_ratio", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from {resumed / 'checkpoint-2'}" in proc.stderr
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, resumed))
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-5)
    # merge_export's logit comparison (merged vs adapter model) holds for DoRA
    proc = merge_export(out / "adapter", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # recipe and merge-export processes, minutes on 2 cores; pytest -m slow
def test_recipe_pissa_adapter_reproduces_the_run_on_the_stock_base(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.collator import tokenize_sft
    from common.data import load_dataset_file, to_messages
    from common.evaluation import heldout_loss

    out = tmp_path / "pissa"
    proc = train(tiny_dir, out, "--lora_init", "pissa_niter_4", "--save_steps", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    records, fmt = load_dataset_file(REPO / "data/persona/heldout.jsonl")
    feats, _ = tokenize_sft([("", to_messages(r.data, fmt), r.data) for r in records], tok, 256)
    recorded = json.loads((out / "metrics.json").read_text())["eval_loss_after"]
    assert heldout_loss(model, feats, tok.pad_token_id) == pytest.approx(recorded, abs=1e-4)
    proc = merge_export(out / "adapter", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_recipe_refuses_bad_values_before_anything_is_written(tiny_dir, tmp_path):
    from common.config import load_recipe, parse_config

    recipe = load_recipe(REPO / "recipes" / "sft_memory_diet.py")
    for flags, message in ((["--lora_init", "pisa"], "did you mean pissa"),
                           (["--method", "qlora", "--lora_init", "olora"], "--method lora, or --lora_init default"),
                           (["--loraplus_lr_ratio", "-2"], "--loraplus_lr_ratio -2.0")):
        cfg, args = parse_config(recipe.CONFIGS, ["--output_dir", str(tmp_path / "x"), *flags])
        with pytest.raises(CheckFailed, match=message):
            recipe.validate(cfg, args, torch.device("cpu"))
    proc = train(tiny_dir, tmp_path / "bad", "--lora_init", "pisa")  # the launcher: exit 1, one line, nothing written
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--lora_init 'pisa'" in proc.stderr and "did you mean pissa" in proc.stderr
    assert not (tmp_path / "bad").exists()
