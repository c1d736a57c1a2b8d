"""GGUF export checked in llama.cpp itself (the export extra: `bash launch/setup_export.sh`).

    pytest -m llamacpp          # ~5 min on a loaded 2-core machine; not part of the default run

recipes/merge_export.py merges an adapter on SmolLM2-135M-Instruct (asset:smollm2, a released tokenizer whose
pre-tokenizer llama.cpp knows as 'smollm'), converts merged/ with llama.cpp's convert_hf_to_gguf.py to f16 and
bf16, quantizes with llama_model_quantize to q8_0, q4_k_m and q5_k_m, loads each file in llama.cpp, and compares
greedy chat answers (template embedded in the GGUF) with the merged HF model's: f16 and bf16 must give the same
answers; q8_0 and the k-quants change SmolLM2's open-ended answers after a few words, so they are reported. The adapter is random but small
(LoRA B scaled to 2% of its random init), so the merge changes every targeted weight while the model keeps
SmolLM2-Instruct's answers (a strongly perturbed random model has near-ties that even f16 rounding flips).
"""
import importlib.util
import json
import os

import pytest
import torch

from conftest import REPO, run
from test_merge_export import LAUNCHER

LLAMA_CPP_DIR = REPO / ".cache" / "llama.cpp"
MISSING = ("llama-cpp-python is not installed" if importlib.util.find_spec("llama_cpp") is None else
           None if (LLAMA_CPP_DIR / "convert_hf_to_gguf.py").is_file() else f"no converter in {LLAMA_CPP_DIR}")
pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(MISSING is not None, reason=f"the export extra is missing ({MISSING}): "
                                                             "bash launch/setup_export.sh")]
EXACT = ["f16", "bf16"]                 # greedy answers must equal the merged HF model's
REPORTED = ["q8_0", "q4_k_m", "q5_k_m"]  # answers may differ (measured 0/6 each here): reported, not gated


@pytest.fixture(scope="module")
def export(smollm2_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    model.save_pretrained(root / "run" / "adapter")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(root / "run" / "adapter")
    (root / "run" / "manifest.json").write_text(json.dumps({"status": "finished", "config": {"method": "lora"}}))
    out = root / "export"
    proc = run(LAUNCHER + ["--adapter_path", str(root / "run" / "adapter"), "--output_dir", str(out),
                           "--gguf_type", "f16,bf16", "--gguf_quantizations", ",".join(REPORTED),
                           "--gguf_questions", "6", "--gguf_max_tokens", "24", "--num_samples", "2"], timeout=1800)
    return out, proc


def test_every_gguf_loads_in_llama_cpp_and_the_exact_types_answer_like_the_merged_model(export):
    out, proc = export
    assert proc.returncode == 0, proc.stderr[-4000:]
    check = json.loads((out / "gguf_check.json").read_text())
    files = {f["type"]: f for f in check["files"]}
    assert list(files) == ["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m"] and check["passed"] and check["questions"] == 6
    for kind, f in files.items():
        assert (f["architecture"], f["tokenizer_model"], f["tokenizer_pre"]) == ("llama", "gpt2", "smollm"), kind
        assert f["has_chat_template"] and f["tokenizer_ids_match"] and f["passed"], kind
        assert (out / f"model-{kind}.gguf").stat().st_size == f["bytes"]
    for kind in EXACT:
        assert files[kind]["answers_match_rate"] == 1.0 and files[kind]["gated"], (kind, files[kind]["answers"])
        assert files[kind]["top1_agreement"] == 1.0 and files[kind]["max_abs_logit_diff"] < 1.0, kind
    assert all(len(a["hf"].split()) >= 3 for a in files["f16"]["answers"])  # sentences, not a broken model
    for kind in REPORTED:
        assert not files[kind]["gated"] and 0.0 <= files[kind]["answers_match_rate"] <= 1.0
        assert files[kind]["top1_agreement"] > (0.9 if kind == "q8_0" else 0.7), kind
    assert files["q4_k_m"]["quantize_note"] and "fallback quantization" in files["q4_k_m"]["quantize_note"]  # 576 % 256
    size = {k: f["bytes"] for k, f in files.items()}
    assert size["q4_k_m"] < size["q5_k_m"] < size["q8_0"] < size["f16"] == pytest.approx(size["bf16"], rel=0.01)
    m = json.loads((out / "metrics.json").read_text())
    assert m["verified"] and m["gguf"]["type"] == "f16" and m["gguf"]["passed"] and len(m["gguf_files"]) == 5
    print("\nGGUF figures:", json.dumps({k: {"MB": round(f["bytes"] / 1e6, 1), "match": f["answers_match_rate"],
                                            "top1": f["top1_agreement"], "max_logit_diff": round(f["max_abs_logit_diff"], 3),
                                            "s": f.get("convert_seconds", f.get("quantize_seconds"))}
                                        for k, f in files.items()}))


def test_modelfile_beside_the_gguf_loads_in_llama_cpp(export):
    import llama_cpp

    out, _ = export
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./model-f16.gguf" in lines and "# FROM ./model-q4_k_m.gguf" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and "{{ .Content }}<|im_end|>" in text
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=256, verbose=False)
    assert llm.detokenize([llm.token_eos()], special=True) == b"<|im_end|>"  # llama.cpp stops where the Modelfile says


def test_a_tokenizer_llama_cpp_does_not_know_is_refused_with_its_hash(tiny_dir, tmp_path):
    """The tiny asset's tokenizer is trained locally: llama.cpp's converter hashes how it splits a fixed text,
    finds no known pre-tokenizer and refuses (rather than writing one llama.cpp cannot load)."""
    from common import gguf as gguf_mod
    from common.checks import CheckFailed

    with pytest.raises(CheckFailed, match=r"does not know this tokenizer's pre-tokenizer \(chkhsh [0-9a-f]{64}\)"):
        gguf_mod.convert_to_gguf(tiny_dir, tmp_path / "tiny.gguf", "f16", LLAMA_CPP_DIR)
    assert not os.path.exists(tmp_path / "tiny.gguf")
