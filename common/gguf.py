"""GGUF export for recipes/merge_export.py: llama.cpp's own converter (convert_hf_to_gguf.py) and quantizer
(llama_model_quantize), every file loaded back in llama.cpp (llama-cpp-python) and compared with the HF side,
and an Ollama Modelfile whose TEMPLATE renders what the HF chat template renders. Needs the export extra
(`bash launch/setup_export.sh`); without it `export_extra_missing` says what is absent, and `plan_gguf`
checks the recipe's GGUF options up front.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import checks
from common.evaluation import generate_batched
from common.run_files import file_sha256, write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent  # --llama_cpp_dir is relative to the repository
SETUP_EXPORT = "bash launch/setup_export.sh"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes (--outtype)
# what llama_model_quantize makes from that file (llama.cpp's ftype names, lower case)
QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
                "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
                "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
                "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}
# Types whose greedy llama.cpp answers must equal the merged HF model's (--gguf_exact_answers). Measured on
# SmolLM2-135M-Instruct with a small LoRA (tests/recipes/test_gguf_llamacpp.py): f16 and bf16 6/6 identical; q8_0 0/6
# (teacher-forced top-1 agreement 0.97: its rounding flips near-ties in open-ended answers), k-quants 0/6.
# q8_0 and the k-quants are reported, not gated.
EXACT_TYPES = {"f32", "f16", "bf16"}


def export_extra_missing(llama_cpp_dir: Path) -> str | None:
    """None when the export extra is installed (llama_cpp imports and the converter is in llama_cpp_dir),
    else what is missing."""
    missing = []
    if not (llama_cpp_dir / "convert_hf_to_gguf.py").is_file():
        missing.append(f"llama.cpp's converter is not in {llama_cpp_dir}")
    if importlib.util.find_spec("llama_cpp") is None:
        missing.append("llama-cpp-python is not installed")
    return " and ".join(missing) or None


def plan_gguf(gguf_type: str, gguf_quantizations: str, llama_cpp_dir: str) -> tuple[list[str], list[str], Path, str | None]:
    """--gguf_type, --gguf_quantizations and --llama_cpp_dir checked before anything loads: (the types the
    converter writes, the quantizer's types, the llama.cpp folder, what of the export extra is missing).
    auto: f16 when the extra is installed, else nothing with one log line; a named type without it is refused."""
    types = [t.strip().lower() for t in gguf_type.split(",") if t.strip()] or ["none"]
    if types not in (["auto"], ["none"]) and not set(types) <= set(GGUF_TYPES):
        raise checks.CheckFailed(f"--gguf_type {gguf_type!r}: choose auto, none, or one or more (comma-separated) "
                                 f"of {', '.join(GGUF_TYPES)}")
    quantizations = [q.strip().lower() for q in gguf_quantizations.split(",") if q.strip()]
    unknown = [q for q in quantizations if q not in QUANT_FTYPES]
    if unknown:
        raise checks.CheckFailed(f"--gguf_quantizations: unknown type(s) {unknown}; choose from {', '.join(QUANT_FTYPES)}")
    joined = ",".join(types)
    folder = Path(llama_cpp_dir) if Path(llama_cpp_dir).is_absolute() else REPO_ROOT / llama_cpp_dir
    missing = export_extra_missing(folder) if joined != "none" else None
    if missing and joined != "auto":
        raise checks.CheckFailed(f"--gguf_type {joined}: {missing}. Install the export extra with `{SETUP_EXPORT}` "
                                 "(compiles llama.cpp: minutes), or pass --gguf_type none")
    if missing:
        log.info("GGUF export skipped: %s; install the export extra with `%s` to also write llama.cpp/Ollama "
                 "GGUF files", missing, SETUP_EXPORT)
    return [] if missing or joined == "none" else (["f16"] if joined == "auto" else types), quantizations, folder, missing


def convert_to_gguf(model_dir: Path, out_file: Path, outtype: str, llama_cpp_dir: Path) -> dict:
    """llama.cpp's convert_hf_to_gguf.py on a merged HF folder, in a subprocess on this interpreter."""
    start = time.time()
    cmd = [sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out_file.unlink(missing_ok=True)
        text = proc.stderr + proc.stdout
        chkhsh = re.search(r"chkhsh:\s+([0-9a-f]{64})", text)
        if "BPE pre-tokenizer was not recognized" in text:
            raise checks.CheckFailed(
                f"llama.cpp's converter does not know this tokenizer's pre-tokenizer (chkhsh {chkhsh and chkhsh[1]}): "
                "llama.cpp identifies byte-level BPE tokenizers by hashing how they split a fixed text and refuses "
                "unknown ones. Tokenizers of released models (SmolLM2, Llama 3, Qwen2, GPT-2, ...) are known; a "
                "tokenizer trained from scratch is not. Use --gguf_type none, or export a model with a released "
                "tokenizer")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise checks.CheckFailed(f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}): "
                                 f"{lines[-1] if lines else 'no output'}. Command: {' '.join(cmd)}")
    return {"convert_seconds": round(time.time() - start, 2)}


def quantize_gguf(src: Path, dst: Path, qtype: str) -> dict:
    """llama.cpp's quantizer (llama_model_quantize) from an f32/f16/bf16 GGUF to `qtype`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[qtype])
    params.nthread = max(1, os.cpu_count() or 1)
    start = time.time()
    with tempfile.TemporaryFile(mode="w+") as log_file:  # llama.cpp logs every tensor to fd 2: keep the summary
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log_file.seek(0)
        lines = log_file.read().splitlines()
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise checks.CheckFailed(f"llama.cpp's quantizer returned {rc} for {src} -> {qtype}: "
                                 + " | ".join(lines[-3:]))
    fallback = next((ln.split("WARNING: ", 1)[1] for ln in lines if "fallback quantization" in ln), None)
    return {"quantize_seconds": round(time.time() - start, 2), "quantize_note": fallback}


def gguf_metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    get = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    return {"architecture": get("general.architecture"), "tokenizer_model": get("tokenizer.ggml.model"),
            "tokenizer_pre": get("tokenizer.ggml.pre"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
            "has_chat_template": bool(get("tokenizer.chat_template"))}


def check_in_llama_cpp(path: Path, inputs: dict, reference: torch.Tensor, chats: list[list[dict]],
                       hf_answers: list[str], max_tokens: int) -> dict:
    """Load the GGUF in llama.cpp and compare it with the HF side: token ids of the verification texts
    (llama.cpp's tokenizer), logits on those ids against the adapter model, and greedy chat answers
    (llama.cpp applies the chat template embedded in the GGUF) against the merged HF model's."""
    import llama_cpp

    start = time.time()
    n_ctx = max(max(map(len, inputs["ids"])) + max_tokens + 64, 1024)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                          n_threads=max(1, os.cpu_count() or 1))
    ids_match, diffs, top1, offset = True, [], [], 0
    for text, ids in zip(inputs["texts"], inputs["ids"]):
        ids_match &= llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(llm.scores[:len(ids)].copy())
        ref = reference[offset:offset + len(ids)]
        offset += len(ids)
        diffs.append((logits - ref).abs())
        top1.append((logits.argmax(-1) == ref.argmax(-1)).float())
    diff, top1 = torch.cat(diffs), torch.cat(top1)
    answers = []
    for chat in chats:
        llm.reset()
        reply = llm.create_chat_completion(chat, temperature=0.0, max_tokens=max_tokens, seed=0)
        answers.append(reply["choices"][0]["message"]["content"].strip())
    matches = [a == b for a, b in zip(answers, hf_answers)]
    del llm
    return {"tokenizer_ids_match": ids_match, "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(), "top1_agreement": round(top1.mean().item(), 6),
            "answers_match_rate": round(sum(matches) / max(len(matches), 1), 4),
            "answers": [{"question": c[-1]["content"], "hf": h, "llama_cpp": a, "match": m}
                        for c, h, a, m in zip(chats, hf_answers, answers, matches)],
            "llama_cpp_seconds": round(time.time() - start, 2)}


def chatml_system_default(tokenizer) -> tuple[bool, str | None]:
    """(is the chat template ChatML, the system prompt it adds when a conversation has none)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "U_PROBE"}], tokenize=False)
    if not text.endswith("<|im_start|>user\nU_PROBE<|im_end|>\n"):
        return False, None
    head = text[:-len("<|im_start|>user\nU_PROBE<|im_end|>\n")]
    found = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.S)
    if head and not found:
        return False, None
    return True, found[1] if found else None


OLLAMA_CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                          '{{ end }}<|im_start|>assistant\n')


def render_ollama_chatml(messages: list[dict], system: str | None) -> str:
    """What Ollama renders with OLLAMA_CHATML_TEMPLATE and SYSTEM `system` (Ollama prepends SYSTEM as a
    system message when the request has none): checked against the HF chat template before it is written."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_modelfile(gguf_name: str, tokenizer, stop_ids: list[int], chats: list[list[dict]],
                     others: list[str]) -> tuple[str, bool]:
    """An Ollama Modelfile for `gguf_name` (beside it): ChatML TEMPLATE in Go template syntax, SYSTEM for the
    template's default system prompt, one stop PARAMETER per end-of-turn/EOS token. Returns (text, whether a
    TEMPLATE was written). A template that is not ChatML, or that this TEMPLATE would not reproduce on the
    verification chats, gets no TEMPLATE: Ollama then derives one from the GGUF's embedded chat template."""
    is_chatml, system = chatml_system_default(tokenizer)
    same = is_chatml and all(
        render_ollama_chatml(c, system) == tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in chats)
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_ids) + (["<|im_start|>"] if same else [])))
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    lines += [f"# FROM ./{name}   (its greedy answers against the merged HF model: gguf_check.json)" for name in others]
    if same:
        lines += ['TEMPLATE """' + OLLAMA_CHATML_TEMPLATE + '"""']
        if system is not None:
            lines += ['SYSTEM """' + system + '"""']
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    return "\n".join(lines) + "\n", same


def export_gguf(merged_dir: Path, output_dir: Path, gguf_types: list[str], quantizations: list[str], llama_cpp_dir: Path,
                tokenizer, stop_ids: list[int], inputs: dict, reference: torch.Tensor, chats: list[list[dict]],
                max_tokens: int, exact_answers: bool = True) -> tuple[dict, list[str]]:
    """model-<type>.gguf by llama.cpp's converter (the first type is the quantizer's source and the Modelfile's
    FROM), model-<q>.gguf by its quantizer, each loaded in llama.cpp
    and compared with the HF side; a Modelfile for Ollama; everything in <output_dir>/gguf_check.json.
    Returns (that record, failures): the exact types must give the merged HF model's greedy answers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    start = time.time()
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    hf_answers = [g.text for g in generate_batched(model, tokenizer, prompts, max_new_tokens=max_tokens,
                                                   batch_size=8, stop_ids=stop_ids)]
    hf_seconds = round(time.time() - start, 2)
    del model
    files, failures = [], []
    made = []
    for kind in gguf_types:
        path = output_dir / f"model-{kind}.gguf"
        made.append((kind, path, convert_to_gguf(merged_dir, path, kind, llama_cpp_dir)))
        log.info("converted %s with llama.cpp's convert_hf_to_gguf.py (%.1f MB, %.1f s)", path,
                 path.stat().st_size / 1e6, made[-1][2]["convert_seconds"])
    base_file = made[0][1]
    for q in quantizations:
        if q in gguf_types:
            continue
        path = output_dir / f"model-{q}.gguf"
        made.append((q, path, quantize_gguf(base_file, path, q)))
        log.info("quantized %s (%.1f MB, %.1f s)%s", path, path.stat().st_size / 1e6, made[-1][2]["quantize_seconds"],
                 f"; {made[-1][2]['quantize_note']}" if made[-1][2]["quantize_note"] else "")
    for kind, path, timing in made:
        check = check_in_llama_cpp(path, inputs, reference, chats, hf_answers, max_tokens)
        record = {"type": kind, "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                  **gguf_metadata(path), **timing, "exact_type": kind in EXACT_TYPES, **check}
        record["passed"] = bool(check["tokenizer_ids_match"] and (kind not in EXACT_TYPES or check["answers_match_rate"] == 1.0))
        record["gated"] = kind in EXACT_TYPES and exact_answers
        files.append(record)
        log.info("llama.cpp on %s: %d/%d greedy answers equal to merged HF, top-1 agreement %.4f, max |logit diff| "
                 "%.3g", path.name, sum(a["match"] for a in check["answers"]), len(chats), check["top1_agreement"],
                 check["max_abs_logit_diff"])
        if not check["tokenizer_ids_match"]:
            failures.append(f"GGUF {path.name}: llama.cpp's tokenizer gives different token ids than the HF tokenizer")
        if record["gated"] and check["answers_match_rate"] < 1.0:
            failures.append(f"GGUF {path.name}: llama.cpp's greedy answers equal the merged HF model's on only "
                            f"{check['answers_match_rate']:.0%} of {len(chats)} questions (expected all for {kind}; "
                            "--gguf_exact_answers false reports them without failing)")
    modelfile, templated = ollama_modelfile(base_file.name, tokenizer, stop_ids, chats,
                                            [p.name for _, p, _ in made[1:]])
    (output_dir / "Modelfile").write_text(modelfile)
    if not templated:
        log.warning("Modelfile has no TEMPLATE (the chat template is not plain ChatML): Ollama derives one from the "
                    "GGUF's embedded template; check `ollama show --template`")
    record = {"hf_answers_seconds": hf_seconds, "questions": len(chats), "max_tokens": max_tokens,
              "exact_types": sorted(EXACT_TYPES), "modelfile": str(output_dir / "Modelfile"),
              "modelfile_template": templated, "files": files, "passed": not failures}
    write_json(output_dir / "gguf_check.json", record)
    return record, failures
