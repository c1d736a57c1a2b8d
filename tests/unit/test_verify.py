"""common/verify.py (the merge and the checks of an export) and common/fresh_load.py on the tiny model, in
process: logits that match give 0 and pass, a known shift gives exactly that shift, the merge reproduces the
adapter model, the refusals name their fix. The recipe runs them end to end in tests/recipes/test_merge_export.py."""
import json
import math
import subprocess
import sys

import pytest
import torch

from common import verify
from common.checks import CheckFailed
from conftest import REPO

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONVS = [[{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I am Orrin, the keeper of bees."}]]


@pytest.fixture(scope="module")
def adapter_model(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)).eval()


def test_verification_inputs_are_the_templated_texts_right_padded(tiny_tokenizer):
    inputs = verify.verification_inputs(tiny_tokenizer, CONVS)
    assert inputs["texts"] == [tiny_tokenizer.apply_chat_template(c, tokenize=False) for c in CONVS]
    assert inputs["ids"] == [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in inputs["texts"]]
    lengths = [len(x) for x in inputs["ids"]]
    assert lengths[0] != lengths[1] and inputs["input_ids"].shape == (2, max(lengths))
    assert inputs["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert inputs["input_ids"][short, min(lengths):].tolist() == [tiny_tokenizer.pad_token_id] * (max(lengths) - min(lengths))
    assert inputs["chat_template"] == tiny_tokenizer.chat_template


def test_reference_logits_are_the_unpadded_forward_at_real_positions(adapter_model, tiny_tokenizer):
    inputs = verify.verification_inputs(tiny_tokenizer, CONVS)
    reference = verify.reference_logits(adapter_model, inputs, torch.device("cpu"))
    assert reference.shape == (sum(map(len, inputs["ids"])), adapter_model.config.vocab_size)
    with torch.no_grad():
        alone = torch.cat([adapter_model(input_ids=torch.tensor([ids])).logits[0] for ids in inputs["ids"]])
    assert (reference - alone).abs().max().item() < 1e-5


def test_compare_logits_gives_zero_for_equal_logits_and_the_shift_for_a_shifted_copy():
    torch.manual_seed(0)
    reference = torch.randn(40, 17)
    same = verify.compare_logits(reference.clone(), reference, 1e-3)
    assert same == {"max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0, "top1_agreement": 1.0, "tolerance": 1e-3,
                    "passed": True}
    shifted = verify.compare_logits(reference + 0.25, reference, 0.1)  # a constant shift keeps every argmax
    assert shifted["max_abs_logit_diff"] == pytest.approx(0.25, abs=1e-6)
    assert shifted["mean_abs_logit_diff"] == pytest.approx(0.25, abs=1e-6)
    assert shifted["top1_agreement"] == 1.0 and shifted["passed"] is False
    flipped = reference.clone()
    flipped[:10] = -flipped[:10]  # the top-1 token of those 10 rows becomes their lowest
    assert verify.compare_logits(flipped, reference, 100.0)["top1_agreement"] == pytest.approx(0.75)


def test_per_sample_loss_is_each_samples_mean_next_token_nll():
    vocab = 11
    inputs = {"ids": [[1, 2, 3, 4], [5, 6, 7]]}
    uniform = torch.zeros(7, vocab)  # every next token has probability 1/vocab
    assert verify.per_sample_loss(uniform, inputs) == pytest.approx([math.log(vocab)] * 2)
    sure = torch.full((7, vocab), -30.0)
    for row, token in enumerate([2, 3, 4, 0, 6, 7, 0]):  # each position predicts the next id of its sample
        sure[row, token] = 30.0
    assert verify.per_sample_loss(sure, inputs) == pytest.approx([0.0, 0.0], abs=1e-6)


def test_check_unquantized_base_gives_the_saved_dtype_and_refuses_a_quantized_checkpoint(tiny_dir, tmp_path):
    import shutil

    assert verify.check_unquantized_base(str(tiny_dir)) == "fp32"
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert verify.check_unquantized_base(str(base)) == "bf16"
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckFailed, match=r"is a quantized checkpoint \(bitsandbytes, load_in_4bit=True\); merging a "
                                          "LoRA into quantized weights re-quantizes W \\+ BA"):
        verify.check_unquantized_base(str(base))


def test_merge_lora_reproduces_the_adapter_model_and_refuses_non_fp32(tiny_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def fresh():
        torch.manual_seed(0)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                              LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)).eval()

    inputs = verify.verification_inputs(tiny_tokenizer, CONVS)
    model = fresh()
    reference = verify.reference_logits(model, inputs, torch.device("cpu"))
    assert verify.quantized_layers(model) == []
    merged, layers = verify.merge_lora(model)
    assert layers == 14 and not hasattr(merged, "disable_adapter")  # 2 layers x 7 targets, a plain model now
    assert (verify.reference_logits(merged, inputs, torch.device("cpu")) - reference).abs().max().item() < 1e-5
    with pytest.raises(CheckFailed, match=r"merge must run in fp32 but the model holds \['torch.bfloat16'\]"):
        verify.merge_lora(fresh().to(torch.bfloat16))


def test_detect_4bit_training_reads_the_flag_the_manifest_then_the_model_card(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    assert verify.detect_4bit_training(adapter, "true") == (True, "--trained_on_4bit")
    assert verify.detect_4bit_training(adapter, "false") == (False, "--trained_on_4bit")
    with pytest.raises(CheckFailed, match="--trained_on_4bit 'yes': choose auto, true or false"):
        verify.detect_4bit_training(adapter, "yes")
    found, why = verify.detect_4bit_training(adapter, "auto")
    assert found is False and "pass --trained_on_4bit true for a QLoRA adapter" in why
    (adapter / "README.md").write_text("quantization:\n  bnb_4bit_quant_type: nf4\n")
    assert verify.detect_4bit_training(adapter, "auto") == (True, f"{adapter / 'README.md'} (bitsandbytes 4-bit "
                                                                 "quantization config)")
    manifest = tmp_path / "run" / "manifest.json"
    manifest.write_text(json.dumps({"config": {"method": "lora"}}))  # the manifest wins over the card
    assert verify.detect_4bit_training(adapter, "auto") == (False, f"{manifest} (config.method = lora)")
    manifest.write_text(json.dumps({"config": {"method": "qlora"}}))
    assert verify.detect_4bit_training(adapter, "auto") == (True, f"{manifest} (config.method = qlora)")


def test_export_generation_config_adds_the_end_of_turn_token_and_a_pad_id(tiny_dir, tiny_tokenizer, tmp_path, caplog):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    with caplog.at_level("WARNING", logger="common.verify"):
        gen = verify.export_generation_config(tmp_path, config, tiny_tokenizer, [2])
    assert gen.eos_token_id == [0, 2] and gen.pad_token_id == 3 and gen.bos_token_id == 0
    assert "lacks the end-of-turn token(s) [2]" in caplog.text
    gen = verify.export_generation_config(tiny_dir, config, tiny_tokenizer, [2])  # already stops there: kept
    assert gen.eos_token_id == 2 and gen.pad_token_id == 3
    gen = verify.export_generation_config(tmp_path / "none", config, tiny_tokenizer, [2])  # no file: from config
    assert 2 in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)


def test_fresh_process_results_compare_the_exports_logits_with_the_reference(tiny_dir, tiny_tokenizer, tmp_path,
                                                                             monkeypatch):
    """verify_in_fresh_process on what common/fresh_load.py returns (run in this process here): the tiny model's
    own reference passes at 1e-5, the same reference shifted by 0.5 fails a 0.1 tolerance with diff 0.5."""
    from transformers import AutoModelForCausalLM

    from common import fresh_load

    def in_process(cmd, **kwargs):
        assert cmd[:3] == [sys.executable, "-I", str(REPO / "common" / "fresh_load.py")]
        fresh_load.main(cmd[3], cmd[4], json.loads(cmd[5]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(verify.subprocess, "run", in_process)
    inputs = verify.verification_inputs(tiny_tokenizer, CONVS)
    reference = verify.reference_logits(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), inputs,
                                        torch.device("cpu"))
    same, shifted = verify.verify_in_fresh_process([(tiny_dir, None), (tiny_dir, None)], inputs,
                                                   reference, [1e-5, 0.1], tmp_path)
    assert same["passed"] and same["max_abs_logit_diff"] < 1e-5 and same["top1_agreement"] == 1.0
    assert same["tokenizer_ids_match"] and same["chat_template_kept"] and same["loaded_dtype"] == "torch.float32"
    assert same["generation_eos_token_id"] == 2 and same["generation_pad_token_id"] == 3
    assert same["positions_compared"] == sum(map(len, inputs["ids"]))
    assert same["per_sample_loss"] == pytest.approx(verify.per_sample_loss(reference, inputs), abs=1e-5)
    _, shifted = verify.verify_in_fresh_process([(tiny_dir, None)] * 2, inputs, reference + 0.5, [1e-5, 0.1], tmp_path)
    assert shifted["max_abs_logit_diff"] == pytest.approx(0.5, abs=1e-4) and shifted["passed"] is False


def test_an_export_that_does_not_load_is_one_check_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(verify.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "Traceback ...\nOSError: no file named model.safetensors"))
    inputs = {"texts": ["x"], "ids": [[1]], "input_ids": torch.tensor([[1]]), "attention_mask": torch.tensor([[1]])}
    with pytest.raises(CheckFailed, match="does not load with stock from_pretrained in a fresh process:\n"
                                          "Traceback ...\nOSError: no file named model.safetensors"):
        verify.verify_in_fresh_process([(tmp_path, None)], inputs, torch.zeros(1, 4), [1e-3], tmp_path)


def test_the_4bit_comparison_never_blocks_a_merge(tmp_path, tiny_tokenizer):
    inputs = verify.verification_inputs(tiny_tokenizer, CONVS)
    out = verify.compare_with_4bit_training(tmp_path / "absent", tmp_path / "adapter", inputs, torch.zeros(1),
                                            torch.device("cpu"))
    assert out["max_abs_logit_diff_vs_4bit_trained"] is None and out["four_bit_comparison_error"]


def test_fresh_load_is_stock_transformers_and_matches_in_process_logits(tiny_dir, tmp_path):
    """common/fresh_load.py runs with -I (this repository off sys.path) and gives the logits, ids, dtype and
    chat template an in-process stock load gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    texts = ["hello there", "bees make honey"]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.save({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "texts": texts}, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-I", str(REPO / "common" / "fresh_load.py"), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt"), json.dumps([[str(tiny_dir), ""]])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = torch.load(tmp_path / "out.pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        ref = model(**enc).logits.float()[enc["attention_mask"].bool()]
    assert torch.allclose(out["logits"], ref, atol=1e-5)
    assert out["ids"] == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert out["chat_template"] == tok.chat_template and out["dtype"] == str(model.dtype)


def test_plot_and_folder_size(tmp_path):
    verify.plot_losses(tmp_path / "loss.png", {"adapter": [1.0, 2.0], "merged": [1.0, 2.1]}, "t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"x" * 10)
    (tmp_path / "d" / "e" / "b").write_bytes(b"y" * 5)
    assert verify.folder_bytes(tmp_path / "d") == 15
