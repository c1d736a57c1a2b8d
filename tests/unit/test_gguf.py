"""common/gguf.py without the export extra: the GGUF options checked up front (plan_gguf), what of the extra is
missing, and the Ollama Modelfile against the HF chat template. The GGUF files themselves (llama.cpp's converter
and quantizer, each loaded in llama.cpp) are in tests/recipes/test_gguf_llamacpp.py (`pytest -m llamacpp`)."""
import logging

import pytest

from common.checks import CheckFailed
from common.gguf import plan_gguf


def test_plan_gguf_without_the_extra_skips_auto_with_one_line_and_refuses_a_named_type(tmp_path, caplog):
    absent = str(tmp_path / "no-llama.cpp")
    with caplog.at_level(logging.INFO, logger="common.gguf"):
        types, quants, folder, missing = plan_gguf("auto", "q8_0, Q4_K_M", absent)
    assert types == [] and quants == ["q8_0", "q4_k_m"] and str(folder) == absent
    assert missing.startswith(f"llama.cpp's converter is not in {absent}")
    lines = [r.getMessage() for r in caplog.records if "GGUF export skipped" in r.getMessage()]
    assert len(lines) == 1 and "bash launch/setup_export.sh" in lines[0]
    assert plan_gguf("none", "", absent) == ([], [], tmp_path / "no-llama.cpp", None)  # none: the extra is not asked
    assert plan_gguf("", "", absent)[3] is None  # empty means none
    with pytest.raises(CheckFailed, match="--gguf_type f16,bf16: llama.cpp's converter is not in .*no-llama.cpp.* "
                                          "`bash launch/setup_export.sh` .*or pass --gguf_type none"):
        plan_gguf("f16, BF16", "", absent)


def test_plan_gguf_refuses_unknown_types_and_resolves_the_folder_from_the_repository(tmp_path):
    from common.gguf import REPO_ROOT

    with pytest.raises(CheckFailed, match="--gguf_type 'q4_k_m': choose auto, none, or one or more "
                                          r"\(comma-separated\) of f32, f16, bf16, q8_0"):
        plan_gguf("q4_k_m", "", str(tmp_path))
    with pytest.raises(CheckFailed, match="--gguf_type 'auto,f16'"):
        plan_gguf("auto,f16", "", str(tmp_path))
    with pytest.raises(CheckFailed, match=r"--gguf_quantizations: unknown type\(s\) \['q4_km'\]; choose from q8_0, "):
        plan_gguf("none", "q8_0,q4_km", str(tmp_path))
    assert plan_gguf("none", "", ".cache/llama.cpp")[2] == REPO_ROOT / ".cache" / "llama.cpp"


def test_ollama_modelfile_renders_what_the_chat_template_renders(tiny_dir):
    """The Go TEMPLATE (Ollama) must give the prompt the HF chat template gives, default system prompt included."""
    from transformers import AutoTokenizer

    from common import gguf as gguf_mod
    from common.assets import chatml_template

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    chats = [[{"role": "user", "content": "What is your name?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who made you?"}]]
    text, templated = gguf_mod.ollama_modelfile("model-f16.gguf", tok, [2], chats, ["model-q4_k_m.gguf"])
    assert templated and text.splitlines()[1] == "FROM ./model-f16.gguf"
    assert "# FROM ./model-q4_k_m.gguf" in text and "SYSTEM" not in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' \
           '<|im_start|>assistant\n"""' in text
    assert text.count("PARAMETER stop") == 2 and 'PARAMETER stop "<|im_end|>"' in text
    assert 'PARAMETER stop "<|im_start|>"' in text
    tok.chat_template = chatml_template("You are Orrin.")  # SmolLM2-style: a default system turn
    text, templated = gguf_mod.ollama_modelfile("model-f16.gguf", tok, [2, 0], chats, [])
    assert templated and 'SYSTEM """You are Orrin."""' in text and 'PARAMETER stop "<|endoftext|>"' in text
    for chat in chats:
        assert gguf_mod.render_ollama_chatml(chat, "You are Orrin.") == tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    text, templated = gguf_mod.ollama_modelfile("model-f16.gguf", tok, [2], chats, [])
    assert not templated and "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


def test_export_extra_missing_names_what_is_absent(tmp_path):
    from common.gguf import export_extra_missing

    message = export_extra_missing(tmp_path / "no-llama.cpp")
    assert message.startswith(f"llama.cpp's converter is not in {tmp_path / 'no-llama.cpp'}")
    (tmp_path / "llama.cpp").mkdir()
    (tmp_path / "llama.cpp" / "convert_hf_to_gguf.py").write_text("")
    assert export_extra_missing(tmp_path / "llama.cpp") in (None, "llama-cpp-python is not installed")
