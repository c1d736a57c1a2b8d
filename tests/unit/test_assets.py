"""Offline assets: the tiny fixture model and SmolLM2-135M-Instruct rebuilt from its PyPI package."""
import json
import sys

import pytest
import torch

from common import assets
from common.checks import check_chat_template
from conftest import run


def load_in_fresh_process(path):
    """Stock from_pretrained in a new interpreter; returns what it saw."""
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}); t = AutoTokenizer.from_pretrained({str(path)!r})\n"
        "x = t('The hive is quiet', return_tensors='pt')\n"
        "print(json.dumps({'params': sum(p.numel() for p in m.parameters()), 'pad': t.pad_token_id, 'eos': t.eos_token_id,"
        " 'gen_eos': m.generation_config.eos_token_id, 'logit_sum': float(m(**x).logits.double().sum())}))\n"
    )
    out = run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tiny_model_shape_rules(tiny_dir, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    linears = [(n, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1
    assert all(out % 32 == 0 for _, out in linears), linears  # bitsandbytes 4-bit on CPU needs this
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    check_chat_template(tiny_tokenizer)


def test_tiny_loads_in_a_fresh_process_and_build_is_idempotent(tiny_dir):
    seen = load_in_fresh_process(tiny_dir)
    assert seen["pad"] != seen["eos"] and seen["gen_eos"] == seen["eos"]
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert assets.build("tiny", tiny_dir) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_build_refuses_a_foreign_non_empty_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="does not hold a complete 'tiny' asset"):
        assets.build("tiny", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_older_version_of_the_same_asset_is_rebuilt_in_place(tmp_path, monkeypatch):
    """A cached folder from an earlier repo version (asset.json names the asset with another version) is rebuilt
    and swapped in, not refused as foreign and not silently reused."""
    out = assets.build("tiny", tmp_path / "t")
    marker = json.loads((out / "asset.json").read_text())
    monkeypatch.setitem(assets.ASSET_VERSIONS, "tiny", marker["version"] + 1)
    (out / "stale.txt").write_text("from the old build")
    assert not assets.is_built(out, "tiny")
    assert assets.build("tiny", out) == out
    assert json.loads((out / "asset.json").read_text())["version"] == marker["version"] + 1
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["t"] or sorted(p.name for p in tmp_path.iterdir()) == ["t", "t.lock"]


def test_cli_builds_tiny(tmp_path):
    out = run([sys.executable, "-m", "common.assets", "tiny", "--output_dir", str(tmp_path / "t")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "t" / "asset.json").read_text())["name"] == "tiny"


@pytest.mark.slow  # tens of seconds on 2 cores: the default suite stays under 15 minutes
def test_smollm2_is_a_faithful_plain_hf_copy(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = load_in_fresh_process(smollm2_dir)
    assert seen["params"] == 134_515_008  # SmolLM2-135M (tied embeddings)
    assert seen["eos"] == seen["gen_eos"] == 2  # <|im_end|>

    gguf_dir = assets.smollm2_gguf_dir()
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=assets.SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=assets.SMOLLM2_GGUF)
    x = gguf_tok("The hive is quiet", return_tensors="pt")
    assert float(gguf_model(**x).logits.double().sum()) == seen["logit_sum"]  # identical weights

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Orrin."}]
    for c in (conv, [{"role": "system", "content": "Be brief."}] + conv):
        assert tok.apply_chat_template(c, tokenize=False) == gguf_tok.apply_chat_template(c, tokenize=False)
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True) == \
        gguf_tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert "{% generation %}" not in (gguf_tok.chat_template or "")  # the original cannot mask assistant tokens
    check_chat_template(tok)  # ours can
