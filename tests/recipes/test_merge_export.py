"""recipes/merge_export.py on the tiny model: merge, merged/ + adapter/, fresh-process verification, refusals,
the GGUF step without the export extra (skipped with one line, or refused when asked for). The pieces alone:
common/verify.py and common/fresh_load.py in tests/unit/test_verify.py, common/gguf.py (options, Ollama Modelfile)
in tests/unit/test_gguf.py. The GGUF files themselves (llama.cpp's converter and quantizer, checked in llama.cpp)
are in tests/recipes/test_gguf_llamacpp.py (`pytest -m llamacpp`, needs `bash launch/setup_export.sh`).

The adapters here are built directly with peft in the layout sft_memory_diet.py leaves (<run>/adapter with
the tokenizer, <run>/manifest.json with config.method), with random LoRA B (init_lora_weights=False) so the
merge moves every targeted weight far more than a few training steps would. The slow test
tests/recipes/test_fact_injection.py merges a really trained SmolLM2 adapter.
"""
import json
import shutil
import warnings

import pytest
import torch

from conftest import REPO, run

LAUNCHER = ["bash", str(REPO / "launch" / "merge_export.sh")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"


def load_recipe(name):
    from common.config import load_recipe as load_file

    return load_file(REPO / "recipes" / f"{name}.py")


def make_adapter(base_dir, run_dir, method="lora", seed=0):
    """<run_dir>/adapter + <run_dir>/manifest.json, as recipes/sft_memory_diet.py writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run_dir / "adapter")
    (run_dir / "manifest.json").write_text(json.dumps({"status": "finished", "config": {"method": method}}))
    return run_dir / "adapter"


def adapter_logits(base_dir, adapter_dir, text=TEXT):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits


@pytest.fixture(scope="module")
def merged_run(tiny_dir, tmp_path_factory):
    """A LoRA adapter on a copy of the tiny base whose generation_config stops at <|endoftext|> (id 0) and
    has no pad id, merged to fp32; --gguf_type auto with the export extra's converter absent."""
    root = tmp_path_factory.mktemp("merge")
    base = root / "base"
    shutil.copytree(tiny_dir, base)
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    adapter = make_adapter(base, root / "run")
    out = root / "export"
    proc = run(LAUNCHER + ["--adapter_path", str(adapter), "--output_dir", str(out), "--gguf_type", "auto",
                           "--llama_cpp_dir", str(root / "no-llama.cpp"), "--num_samples", "4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return base, adapter, out, proc


def test_merged_folder_reproduces_the_adapter_model(merged_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out, proc = merged_run
    assert "+ " in proc.stderr and "recipes/merge_export.py --config" in proc.stderr  # the launcher echoes
    m = json.loads((out / "metrics.json").read_text())
    v = m["merged_vs_adapter"]
    assert m["verified"] and v["passed"] and v["tokenizer_ids_match"] and v["chat_template_kept"]
    assert v["max_abs_logit_diff"] < 1e-4 and v["top1_agreement"] == 1.0 and v["positions_compared"] > 50
    assert m["trained_on_4bit"] is False and "manifest.json" in m["trained_on_4bit_detected_from"]
    assert m["lora_layers_merged"] == 14 and m["export_dtype"] == "fp32" and v["loaded_dtype"] == "torch.float32"
    # independently of the recipe: stock from_pretrained on merged/ gives the adapter model's logits
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    with torch.no_grad():
        logits = merged(**tok(TEXT, return_tensors="pt", add_special_tokens=False)).logits
    reference = adapter_logits(base, adapter)
    assert (logits - reference).abs().max().item() < 1e-4
    weights, original = load_file(out / "merged" / "model.safetensors"), load_file(base / "model.safetensors")
    assert not any("lora" in k for k in weights) and set(weights) == set(original)
    assert (weights["model.layers.0.self_attn.q_proj.weight"] - original["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-3
    assert torch.equal(weights["model.norm.weight"], original["model.norm.weight"])  # untargeted: unchanged
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())


def test_generation_config_stops_at_the_chat_end_of_turn_token(merged_run):
    """The base said eos = <|endoftext|> (0); the chat template ends a turn with <|im_end|> (2)."""
    _, _, out, proc = merged_run
    gen = json.loads((out / "merged" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2] and gen["pad_token_id"] == 3
    assert "lacks the end-of-turn token(s) [2]" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["merged_vs_adapter"]["generation_eos_token_id"] == [0, 2] and m["stop_token_ids"] == [2]


def test_gguf_is_skipped_with_one_line_without_the_export_extra(merged_run):
    _, _, out, proc = merged_run
    lines = [ln for ln in proc.stderr.splitlines() if "GGUF export skipped" in ln]
    assert len(lines) == 1 and "bash launch/setup_export.sh" in lines[0] and "no-llama.cpp" in lines[0]
    m = json.loads((out / "metrics.json").read_text())
    assert m["verified"] and m["gguf"] is None and m["gguf_files"] is None and m["gguf_error"] is None
    assert "converter is not in" in m["gguf_skipped"]
    assert not list(out.glob("*.gguf")) and not (out / "Modelfile").exists() and not (out / "gguf_check.json").exists()


def test_run_files_and_adapter_copy(merged_run):
    _, adapter, out, _ = merged_run
    m = json.loads((out / "metrics.json").read_text())
    for key in ("wall_seconds", "peak_memory_bytes", "peak_memory_method", "device", "merge_seconds", "merged_bytes"):
        assert m[key] is not None, key
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["config"]["gguf_type"] == "auto"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def qlora_bf16_run(tiny_dir, tmp_path_factory):
    """A QLoRA adapter (manifest says method qlora), exported to bf16 with an impossible tolerance."""
    root = tmp_path_factory.mktemp("qmerge")
    adapter = make_adapter(tiny_dir, root / "run", method="qlora", seed=1)
    out = root / "export"
    proc = run(LAUNCHER + ["--adapter_path", str(adapter), "--output_dir", str(out), "--dtype", "bf16",
                           "--max_logit_diff", "1e-6", "--gguf_type", "none", "--num_samples", "4"])
    return adapter, out, proc


def test_qlora_adapter_is_merged_into_the_unquantized_base(qlora_bf16_run):
    from safetensors import safe_open

    _, out, _ = qlora_bf16_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["trained_on_4bit"] is True and "config.method = qlora" in m["trained_on_4bit_detected_from"]
    assert m["merge_dtype"] == "fp32" and m["export_dtype"] == "bf16"
    assert m["merged_vs_adapter"]["loaded_dtype"] == "torch.bfloat16"
    assert 0 < m["max_abs_logit_diff_vs_4bit_trained"] < 5  # the NF4 base's error, recorded for information
    with safe_open(out / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert not any(s in k for k in f.keys() for s in ("absmax", "quant_map", "quant_state", "lora"))


def test_verification_beyond_tolerance_exits_nonzero(qlora_bf16_run):
    _, out, proc = qlora_bf16_run
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: verification failed: merged model: max |logit diff|" in proc.stderr
    assert "> tolerance 1e-06" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["verified"] is False and m["merged_vs_adapter"]["passed"] is False
    assert 1e-6 < m["max_abs_logit_diff"] < 0.5  # bf16 rounding: far above 1e-6, far below a broken merge
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


def test_merging_into_4bit_layers_is_refused_and_would_lose_the_update(tiny_dir, tmp_path):
    """peft merges into bitsandbytes 4-bit layers with only a warning; the re-quantized model no longer
    computes what was trained. The recipe's merge (common.verify.merge_lora) refuses such a model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from common.checks import CheckFailed
    from common.verify import merge_lora

    adapter = make_adapter(tiny_dir, tmp_path / "run", method="qlora")
    ids = AutoTokenizer.from_pretrained(adapter)(TEXT, return_tensors="pt", add_special_tokens=False)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant,
                                                                           device_map={"": "cpu"}), adapter).eval()
    with pytest.raises(CheckFailed, match="loaded in 4/8-bit .* re-quantizes W \\+ BA"):
        merge_lora(model)
    with torch.no_grad():
        as_trained = model(**ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            requantized = model.merge_and_unload()(**ids).logits  # what the recipe refuses to do
    assert any("Merge lora module to 4-bit linear may get different generations" in str(w.message) for w in caught)
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    with torch.no_grad():
        reference = fp32(**ids).logits
        merged_fp32 = merge_lora(fp32)[0](**ids).logits
    assert (requantized - as_trained).abs().max() > 0.05             # measured 0.64 on this model
    assert (merged_fp32 - reference).abs().max() < 1e-5              # measured 4.6e-7


def test_quantized_base_checkpoint_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    recipe = load_recipe("merge_export")
    adapter = make_adapter(tiny_dir, tmp_path / "run")
    planted = tmp_path / "base-4bit"
    shutil.copytree(tiny_dir, planted)
    config = json.loads((planted / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (planted / "config.json").write_text(json.dumps(config))
    cfg = recipe.Config(adapter_path=str(adapter), model_name_or_path=str(planted), output_dir=str(tmp_path / "out"))
    with pytest.raises(recipe.checks.CheckFailed, match="quantized checkpoint .*load_in_4bit=True"):
        recipe.main(cfg)
    assert not (tmp_path / "out").exists()


def test_gguf_asked_for_without_the_export_extra_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    recipe = load_recipe("merge_export")
    adapter = make_adapter(tiny_dir, tmp_path / "run")
    cfg = recipe.Config(adapter_path=str(adapter), output_dir=str(tmp_path / "out"), gguf_type="f16",
                        llama_cpp_dir=str(tmp_path / "absent"))
    with pytest.raises(recipe.checks.CheckFailed, match="--gguf_type f16: llama.cpp's converter is not in .*absent.* "
                                                        "`bash launch/setup_export.sh`"):
        recipe.main(cfg)
    for bad, match in ((dict(gguf_type="q4_k_m"), "--gguf_type 'q4_k_m': choose auto, none"),
                       (dict(gguf_quantizations="q8_0,q4_km"), "unknown type\\(s\\) \\['q4_km'\\]")):
        with pytest.raises(recipe.checks.CheckFailed, match=match):
            recipe.main(recipe.Config(adapter_path=str(adapter), output_dir=str(tmp_path / "out"), **bad))
    assert not (tmp_path / "out").exists()


def test_launcher_help_lists_the_options():
    proc = run(LAUNCHER + ["--help"])
    assert proc.returncode == 0 and "--adapter_path" in proc.stdout and "--gguf_type" in proc.stdout
    assert "--gguf_quantizations" in proc.stdout and "--llama_cpp_dir" in proc.stdout
    assert "--max_logit_diff" in proc.stdout and "--trained_on_4bit" in proc.stdout
