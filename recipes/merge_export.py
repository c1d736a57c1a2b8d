"""Merge a LoRA adapter into its base, export it for deployment, and verify the export.

What it is for: turn `<run>/adapter` (from recipes/sft_memory_diet.py, LoRA or QLoRA) into what
people deploy, and prove each export computes what the adapter computes:
  merged/           a plain Hugging Face folder (config.json, model.safetensors, tokenizer, chat template,
                    generation_config.json that stops at the chat template's end-of-turn token). Loads with
                    AutoModelForCausalLM; `vllm serve runs/merge_export/merged` and TGI `--model-id` take it as is.
  model-<type>.gguf for llama.cpp / Ollama, with the export extra (bash launch/setup_export.sh): llama.cpp's own
                    convert_hf_to_gguf.py turns merged/ into model-f16.gguf (--gguf_type f32|f16|bf16|q8_0; every
                    architecture and tokenizer llama.cpp knows), its quantizer (llama_model_quantize) makes
                    model-q8_0.gguf and model-q4_k_m.gguf (--gguf_quantizations, k-quants included). Each file is
                    loaded in llama.cpp: token ids, logits against the adapter model, and greedy chat answers with
                    the template embedded in the GGUF against the merged HF model's (f32/f16/bf16 must answer
                    identically; q8_0 and k-quants are reported) -> gguf_check.json. Modelfile: Ollama, ChatML TEMPLATE,
                    stop tokens. Without the extra, --gguf_type auto skips this with one log line.
  adapter/          the adapter alone (PEFT), for multi-adapter serving (vLLM --enable-lora --lora-modules
                    name=DIR; TGI LORA_ADAPTERS) on the unmerged base.

The merge, for LoRA and QLoRA adapters alike: load the base UNQUANTIZED in fp32, apply the adapter, merge
in fp32 (W + scale * B @ A), cast once to the target dtype. A QLoRA adapter (the run's manifest.json says
method qlora, or --trained_on_4bit true) is never merged into 4-bit weights: peft would dequantize, add
and re-quantize, losing most of the update with only a warning. A 4-bit base is refused. For QLoRA the
merged model also differs from the model as trained (NF4 base + adapter) by the base's quantization
error; metrics.json records that gap (max_abs_logit_diff_vs_4bit_trained) for information.

Verification of merged/, in a fresh process with plain AutoModelForCausalLM / AutoTokenizer: the exported
tokenizer must give the same ids, and max |logit difference| against the adapter model (fp32, unmerged) on
--num_samples conversations must stay within tolerance, else the run exits 1 (files kept). Figures go to
metrics.json (and gguf_check.json for the GGUF files).

Run:
    bash launch/merge_export.sh --adapter_path runs/sft_memory_diet/adapter
    python recipes/merge_export.py --config recipes/configs/merge_export.yaml [--key value ...]

Measured here (SmolLM2-135M-Instruct quickstart adapter, 2-core CPU): see docs/export.md, "Merge and export".
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import OutputDirError, prepare_output_dir  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.data import DataError, load_dataset_file, to_messages  # noqa: E402
from common.evaluation import end_of_turn_token_id, generate_batched  # noqa: E402
from common.run_files import PeakMemory, device_name, file_sha256, now, write_json, write_manifest  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |logit diff| allowed against the fp32 adapter model. fp32: merge reassociation only (measured ~1e-5);
# bf16/fp16: weight rounding plus bf16/fp16 compute in the fresh process (measured on SmolLM2, see docs/export.md).
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.5, "bf16": 2.0}


@dataclass
class Config:
    adapter_path: str = field(default="runs/sft_memory_diet/adapter", metadata={"help": "PEFT LoRA adapter folder (what sft_memory_diet.py writes to <output_dir>/adapter)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "unquantized base model (local dir or asset:...); default: the adapter's base_model_name_or_path"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory: merged/, model-<type>.gguf, adapter/, metrics.json, manifest.json, loss.png"})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16: dtype of the merged weights (auto: the base checkpoint's dtype). The merge itself is always fp32"})
    trained_on_4bit: str = field(default="auto", metadata={"help": "auto | true | false: was the adapter trained on a 4-bit (QLoRA) base? auto reads the run's manifest.json next to the adapter, then the adapter's model card"})
    gguf_type: str = field(default="auto", metadata={"help": "auto | none | one or more (comma list) of f32, f16, bf16, q8_0: model-<type>.gguf from merged/ by llama.cpp's convert_hf_to_gguf.py (needs the export extra: bash launch/setup_export.sh). auto: f16 when the extra is installed, else skipped with one log line; an explicit type without the extra is an error"})
    gguf_quantizations: str = field(default="q8_0,q4_k_m", metadata={"help": "comma list made from the first --gguf_type file by llama.cpp's quantizer (llama_model_quantize): q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k; empty for none"})
    gguf_questions: int = field(default=24, metadata={"help": "questions (user turns of --sample_dataset_path) answered greedily by llama.cpp and by the merged HF model; f32/f16/bf16 must answer identically"})
    gguf_max_tokens: int = field(default=48, metadata={"help": "max new tokens per answer in that comparison"})
    gguf_exact_answers: bool = field(default=True, metadata={"help": "exit 1 when an f32/f16/bf16 GGUF's greedy answers differ from the merged HF model's (false: report them only)"})
    llama_cpp_dir: str = field(default=".cache/llama.cpp", metadata={"help": "where launch/setup_export.sh put llama.cpp's convert_hf_to_gguf.py (relative to the repository)"})
    copy_adapter: bool = field(default=True, metadata={"help": "copy the adapter alone to <output_dir>/adapter for multi-adapter serving"})
    sample_dataset_path: str = field(default="data/persona/heldout.jsonl", metadata={"help": "chat/instruction data whose conversations are the verification inputs"})
    num_samples: int = field(default=8, metadata={"help": "conversations used to compare logits"})
    max_logit_diff: float | None = field(default=None, metadata={"help": "tolerance on max |logit diff| merged vs adapter (default by dtype: fp32 1e-3, fp16 0.5, bf16 2.0)"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda: where the fp32 merge runs (fp32 needs 4 bytes per parameter)"})
    seed: int = field(default=42, metadata={"help": "random seed"})


# ---------------------------------------------------------------------------------------------
# Refusals: what must never be merged
# ---------------------------------------------------------------------------------------------
def quantized_layers(model) -> list[str]:
    """Names of bitsandbytes 4-/8-bit layers (the base layers inside LoRA wrappers included)."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bitLt))]


def merge_lora(peft_model):
    """W <- W + scale * B @ A in the model's own (fp32) weights; returns the plain model.

    Refuses a model whose base layers are bitsandbytes-quantized: peft's merge there dequantizes,
    adds and re-quantizes (warning only: "Merge lora module to 4-bit linear may get different
    generations due to rounding errors."), which rounds away most of a LoRA update.
    """
    from peft.tuners.lora import LoraLayer

    packed = quantized_layers(peft_model)
    if packed:
        raise checks.CheckFailed(
            f"the base is loaded in 4/8-bit ({len(packed)} bitsandbytes layers, e.g. {packed[0]}); merging a LoRA into "
            "quantized weights re-quantizes W + BA and silently loses most of the update. Load the base unquantized "
            "(no quantization_config) in fp32, merge, then cast once: this recipe does that")
    lora_layers = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not lora_layers:
        raise checks.CheckFailed("the adapter attached no LoRA layer to the base; check that --model_name_or_path is "
                                 "the model the adapter was trained on")
    not_fp32 = {str(p.dtype) for p in peft_model.parameters() if p.dtype != torch.float32}
    if not_fp32:
        raise checks.CheckFailed(f"merge must run in fp32 but the model holds {sorted(not_fp32)} parameters; load the "
                                 "base with dtype=torch.float32")
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: NaN check on a copy before writing
    left = [n for n, m in merged.named_modules() if isinstance(m, LoraLayer)]
    if left:
        raise checks.CheckFailed(f"{len(left)} LoRA layers were not merged (e.g. {left[0]})")
    return merged, len(lora_layers)


def detect_4bit_training(adapter_dir: Path, requested: str) -> tuple[bool, str]:
    if requested in ("true", "false"):
        return requested == "true", "--trained_on_4bit"
    if requested != "auto":
        raise checks.CheckFailed(f"--trained_on_4bit {requested!r}: choose auto, true or false")
    manifest = adapter_dir.parent / "manifest.json"
    if manifest.is_file():
        try:
            method = json.loads(manifest.read_text()).get("config", {}).get("method")
        except ValueError:
            method = None
        if method in ("lora", "qlora"):
            return method == "qlora", f"{manifest} (config.method = {method})"
    card = adapter_dir / "README.md"
    if card.is_file() and ("load_in_4bit: True" in card.read_text() or "bnb_4bit_quant_type" in card.read_text()):
        return True, f"{card} (bitsandbytes 4-bit quantization config)"
    return False, "no manifest.json next to the adapter and no 4-bit config in its model card (assumed LoRA; " \
                  "pass --trained_on_4bit true for a QLoRA adapter)"


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp's own converter and quantizer (the export extra), checked in llama.cpp itself
# ---------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_EXPORT = "bash launch/setup_export.sh"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes (--outtype)
# what llama_model_quantize makes from that file (llama.cpp's ftype names, lower case)
QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
                "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
                "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
                "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}
# Types whose greedy llama.cpp answers must equal the merged HF model's (--gguf_exact_answers). Measured on
# SmolLM2-135M-Instruct with a small LoRA (tests/test_gguf_llamacpp.py): f16 and bf16 6/6 identical; q8_0 0/6
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


# ---------------------------------------------------------------------------------------------
# Verification in a fresh process: stock from_pretrained, nothing from this repository
# ---------------------------------------------------------------------------------------------
VERIFY_SOURCE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
inputs_file, out_file, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = torch.load(inputs_file)
results = []
for folder, gguf_file in targets:
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw, **({"dtype": torch.float32} if gguf_file else {})).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.float()
    gen = model.generation_config
    results.append({"ids": [tok(t, add_special_tokens=False)["input_ids"] for t in data["texts"]],
                    "logits": logits[data["attention_mask"].bool()], "dtype": str(model.dtype),
                    "eos_token_id": gen.eos_token_id, "pad_token_id": gen.pad_token_id,
                    "chat_template": tok.chat_template})
    del model
torch.save(results, out_file)
"""


def verify_in_fresh_process(targets: list[tuple[Path, str | None]], inputs: dict, reference: torch.Tensor,
                            tolerances: list[float], work: Path) -> list[dict]:
    """Load each (folder, gguf_file) with stock AutoTokenizer/AutoModelForCausalLM in ONE new Python process
    (nothing from this repository, nothing cached from this process) and compare with `reference`.
    HF folders load in their saved dtype, as vLLM/TGI would; a GGUF is dequantized to fp32 (as llama.cpp
    computes with f16/bf16/q8_0 weights and fp32 accumulation)."""
    inputs_file, out_file = work / "inputs.pt", work / "out.pt"
    torch.save(inputs, inputs_file)
    start = time.time()
    spec = json.dumps([[str(folder), gguf_file or ""] for folder, gguf_file in targets])
    proc = subprocess.run([sys.executable, "-c", VERIFY_SOURCE, str(inputs_file), str(out_file), spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise checks.CheckFailed(f"an export in {[str(t[0]) for t in targets]} does not load with stock "
                                 f"from_pretrained in a fresh process:\n{proc.stderr.strip()[-2000:]}")
    seconds = round(time.time() - start, 2)
    results = []
    for out, tolerance in zip(torch.load(out_file), tolerances):
        diff = (out["logits"] - reference).abs()
        top1 = (out["logits"].argmax(-1) == reference.argmax(-1)).float().mean().item()
        results.append({
            "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": round(top1, 6), "tolerance": tolerance, "passed": diff.max().item() <= tolerance,
            "tokenizer_ids_match": out["ids"] == inputs["ids"], "loaded_dtype": out["dtype"],
            "generation_eos_token_id": out["eos_token_id"], "generation_pad_token_id": out["pad_token_id"],
            "chat_template_kept": out["chat_template"] == inputs["chat_template"],
            "positions_compared": int(reference.shape[0]), "fresh_process_seconds": seconds,
            "per_sample_loss": per_sample_loss(out["logits"], inputs)})
    return results


def per_sample_loss(flat_logits: torch.Tensor, inputs: dict) -> list[float]:
    """Mean next-token NLL of each sample over its real tokens (for loss.png)."""
    losses, start = [], 0
    for ids in inputs["ids"]:
        n = len(ids)
        logits = flat_logits[start:start + n]
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
        start += n
    return losses


def plot_losses(path: Path, series: dict[str, list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for (label, values), marker in zip(series.items(), "os^vx"):
        ax.plot(range(len(values)), values, marker, label=label, alpha=0.7)
    ax.set_xlabel("verification sample")
    ax.set_ylabel("mean next-token loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(cfg: Config) -> dict:
    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # ---- validate everything that needs no model -------------------------------------------------
    adapter_dir = Path(cfg.adapter_path)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise checks.CheckFailed(f"--adapter_path {adapter_dir}: no adapter_config.json there. Pass the adapter folder "
                                 "a training run wrote (e.g. runs/sft_memory_diet/adapter)")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise checks.CheckFailed(f"{adapter_dir}: peft_type {adapter_config.get('peft_type')!r}; this recipe merges LoRA "
                                 "adapters only")
    base = resolve_model_path(cfg.model_name_or_path or adapter_config.get("base_model_name_or_path") or "")
    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise checks.CheckFailed(f"base model {base!r} is not a local model folder (no config.json); pass "
                                 "--model_name_or_path with the unquantized base the adapter was trained on")
    base_config = transformers.AutoConfig.from_pretrained(base_dir)
    quant = getattr(base_config, "quantization_config", None)
    if quant:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        raise checks.CheckFailed(
            f"base model {base} is a quantized checkpoint ({quant.get('quant_method', 'quantization_config')}, "
            f"load_in_4bit={quant.get('load_in_4bit')}); merging a LoRA into quantized weights re-quantizes W + BA and "
            "silently loses most of the update. Pass the original unquantized base with --model_name_or_path")
    checked_dtype = str(getattr(base_config, "dtype", None) or "float32").replace("torch.", "")
    dtype_name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(checked_dtype, "fp32") \
        if cfg.dtype == "auto" else cfg.dtype
    if dtype_name not in DTYPES:
        raise checks.CheckFailed(f"--dtype {cfg.dtype!r}: choose auto, fp32, bf16 or fp16")
    gguf_types = [t.strip().lower() for t in cfg.gguf_type.split(",") if t.strip()] or ["none"]
    if gguf_types not in (["auto"], ["none"]) and not set(gguf_types) <= set(GGUF_TYPES):
        raise checks.CheckFailed(f"--gguf_type {cfg.gguf_type!r}: choose auto, none, or one or more (comma-separated) "
                                 f"of {', '.join(GGUF_TYPES)}")
    quantizations = [q.strip().lower() for q in cfg.gguf_quantizations.split(",") if q.strip()]
    unknown = [q for q in quantizations if q not in QUANT_FTYPES]
    if unknown:
        raise checks.CheckFailed(f"--gguf_quantizations: unknown type(s) {unknown}; choose from {', '.join(QUANT_FTYPES)}")
    gguf_type = ",".join(gguf_types)
    llama_cpp_dir = Path(cfg.llama_cpp_dir) if Path(cfg.llama_cpp_dir).is_absolute() else REPO_ROOT / cfg.llama_cpp_dir
    missing = export_extra_missing(llama_cpp_dir) if gguf_type != "none" else None
    if missing and gguf_type != "auto":
        raise checks.CheckFailed(f"--gguf_type {gguf_type}: {missing}. Install the export extra with `{SETUP_EXPORT}` "
                                 "(compiles llama.cpp: minutes), or pass --gguf_type none")
    if missing:
        log.info("GGUF export skipped: %s; install the export extra with `%s` to also write llama.cpp/Ollama "
                 "GGUF files", missing, SETUP_EXPORT)
    gguf_types = [] if missing or gguf_type == "none" else (["f16"] if gguf_type == "auto" else gguf_types)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    trained_on_4bit, detected_from = detect_4bit_training(adapter_dir, cfg.trained_on_4bit)
    device = checks.resolve_device(cfg.device)
    records, fmt = load_dataset_file(cfg.sample_dataset_path)
    conversations = [to_messages(r.data, fmt) for r in records[:cfg.num_samples]]
    if cfg.num_samples < 1 or any(c is None for c in conversations):
        raise checks.CheckFailed(f"{cfg.sample_dataset_path}: need chat or instruction records for verification "
                                 f"(and --num_samples >= 1)")
    chats = []  # the questions both llama.cpp and the merged HF model answer: each record without its last reply
    for r in records[:cfg.gguf_questions] if gguf_types else []:
        messages = to_messages(r.data, fmt)
        if messages and messages[-1]["role"] == "assistant" and len(messages) > 1:
            chats.append(messages[:-1])
    tolerance = cfg.max_logit_diff if cfg.max_logit_diff is not None else DEFAULT_TOLERANCE[dtype_name]
    prepare_output_dir(output_dir, asdict(cfg), resume=True)
    write_manifest(output_dir, cfg, [cfg.sample_dataset_path, str(adapter_dir)], started, "running")
    log.info("adapter %s on base %s; trained on a 4-bit base: %s (from %s); merged dtype %s", adapter_dir, base,
             trained_on_4bit, detected_from, dtype_name)

    # ---- the adapter model: unquantized fp32 base + LoRA (the reference) ------------------------
    from peft import PeftModel

    memory = PeakMemory(device)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": str(device)})
    model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    inputs = {"texts": texts, "ids": ids, "input_ids": input_ids, "attention_mask": attention_mask,
              "chat_template": tokenizer.chat_template}
    with torch.no_grad():
        reference = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float().cpu()
    reference = reference[attention_mask.bool()]
    metrics_4bit = {}
    if trained_on_4bit:
        metrics_4bit = compare_with_4bit_training(base_dir, adapter_dir, inputs, reference, device)

    # ---- merge in fp32, GGUF from the fp32 weights, cast once, save --------------------------------
    merge_start = time.time()
    merged, lora_layers = merge_lora(model)
    merge_seconds = time.time() - merge_start
    stop_ids = []
    for i in (end_of_turn_token_id(tokenizer), tokenizer.eos_token_id):
        if i is not None and i not in stop_ids:
            stop_ids.append(i)
    merged = merged.to(DTYPES[dtype_name])
    merged.config.use_cache = True
    merged_dir = output_dir / "merged"
    merged.generation_config = export_generation_config(base_dir, merged.config, tokenizer, stop_ids)
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    del merged, model, base_model
    adapter_copy = None
    if cfg.copy_adapter:
        adapter_copy = output_dir / "adapter"
        shutil.copytree(adapter_dir, adapter_copy, dirs_exist_ok=True)

    # ---- verify each export in a fresh process ---------------------------------------------------
    with tempfile.TemporaryDirectory(dir=output_dir) as work:
        (hf,) = verify_in_fresh_process([(merged_dir, None)], inputs, reference, [tolerance], Path(work))
    reference_loss = per_sample_loss(reference, inputs)

    # ---- GGUF: converter -> quantizer -> each file checked in llama.cpp ------------------------------
    gguf_failures, gg = [], None
    if gguf_types:
        try:
            gg, gguf_failures = export_gguf(merged_dir, output_dir, gguf_types, quantizations, llama_cpp_dir, tokenizer,
                                            stop_ids, inputs, reference, chats, cfg.gguf_max_tokens,
                                            cfg.gguf_exact_answers)
        except (checks.CheckFailed, ValueError, RuntimeError) as e:  # llama_cpp.Llama raises ValueError on a refused file
            gguf_failures = [f"GGUF: {e}"]

    metrics = {
        "recipe": RECIPE, "adapter_path": str(adapter_dir), "base_model": base, "device": device_name(device),
        "device_type": device.type, "world_size": 1,
        "trained_on_4bit": trained_on_4bit, "trained_on_4bit_detected_from": detected_from,
        "merge_dtype": "fp32", "export_dtype": dtype_name, "lora_layers_merged": lora_layers,
        "lora_r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
        "merge_seconds": round(merge_seconds, 3), "merged_dir": str(merged_dir), "merged_bytes": folder_bytes(merged_dir),
        "adapter_copy": str(adapter_copy) if adapter_copy else None,
        "adapter_bytes": folder_bytes(adapter_dir), "stop_token_ids": stop_ids,
        "verification_samples": len(ids), "verification_dataset": cfg.sample_dataset_path,
        "merged_vs_adapter": {k: v for k, v in hf.items() if k != "per_sample_loss"},
        "max_abs_logit_diff": hf["max_abs_logit_diff"], "tolerance": tolerance,
        **metrics_4bit,
        "gguf": None if gg is None else {k: v for k, v in gg["files"][0].items() if k != "answers"},
        "gguf_files": None if gg is None else [{k: v for k, v in f.items() if k != "answers"} for f in gg["files"]],
        "gguf_skipped": missing, "gguf_error": "; ".join(gguf_failures) or None,
        "wall_seconds": round(time.time() - wall_start, 2), **memory.report(),
    }
    failures = []
    if not hf["passed"]:
        failures.append(f"merged model: max |logit diff| {hf['max_abs_logit_diff']:.3g} > tolerance {tolerance:g}")
    if not hf["tokenizer_ids_match"]:
        failures.append("merged tokenizer gives different token ids than the adapter's tokenizer")
    failures += gguf_failures
    metrics["verified"] = not failures
    series = {"adapter (fp32, unmerged)": reference_loss, f"merged/ ({dtype_name})": hf["per_sample_loss"]}
    plot_losses(output_dir / "loss.png", series, f"merge_export: {adapter_dir} on {base_dir.name}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, [cfg.sample_dataset_path, str(adapter_dir)], started,
                   "finished" if not failures else "failed")
    summary = {"max_abs_logit_diff": hf["max_abs_logit_diff"], "top1_agreement": hf["top1_agreement"],
               "gguf_answers_match": {f["type"]: f["answers_match_rate"] for f in gg["files"]} if gg else None,
               "verified": not failures}
    log.info("done: %s", json.dumps(summary))
    if failures:
        raise checks.CheckFailed("verification failed: " + "; ".join(failures) + f" (figures in {output_dir / 'metrics.json'})")
    return metrics


def export_gguf(merged_dir: Path, output_dir: Path, gguf_types: list[str], quantizations: list[str], llama_cpp_dir: Path,
                tokenizer, stop_ids: list[int], inputs: dict, reference: torch.Tensor, chats: list[list[dict]],
                max_tokens: int, exact_answers: bool = True) -> tuple[dict, list[str]]:
    """model-<type>.gguf by llama.cpp's converter (the first type is the quantizer's source and the Modelfile's
    FROM), model-<q>.gguf by its quantizer, each loaded in llama.cpp
    and compared with the HF side; a Modelfile for Ollama; everything in <output_dir>/gguf_check.json.
    Returns (that record, failures): the exact types must give the merged HF model's greedy answers."""
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


def export_generation_config(base_dir: Path, config, tokenizer, stop_ids: list[int]) -> GenerationConfig:
    """The base's generation config, made to stop at the chat template's end-of-turn token and to have a pad id.

    A generation config whose eos_token_id lacks the end-of-turn token (e.g. a base model's
    <|endoftext|> on a ChatML fine-tune) makes vLLM, TGI and generate() run every reply to max_tokens.
    """
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else ([gen.eos_token_id] if gen.eos_token_id is not None else [])
    missing = [i for i in stop_ids if i not in eos]
    if missing:
        log.warning("generation_config.eos_token_id %s lacks the end-of-turn token(s) %s (%s); adding them so "
                    "generation stops at the end of a reply", gen.eos_token_id, missing,
                    tokenizer.convert_ids_to_tokens(missing))
        eos = eos + missing
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        log.info("generation_config.pad_token_id set to %d", gen.pad_token_id)
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


def compare_with_4bit_training(base_dir: Path, adapter_dir: Path, inputs: dict, reference: torch.Tensor,
                               device: torch.device) -> dict:
    """For a QLoRA adapter: logits of the model as trained (NF4 base + adapter) against the adapter on the
    unquantized base, i.e. what merging into the unquantized base changes. Information, not a gate."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    try:
        q = AutoModelForCausalLM.from_pretrained(base_dir, device_map={"": str(device)}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
        q = PeftModel.from_pretrained(q, adapter_dir).eval()
        with torch.no_grad():
            logits = q(input_ids=inputs["input_ids"].to(device),
                       attention_mask=inputs["attention_mask"].to(device)).logits.float().cpu()
        diff = (logits[inputs["attention_mask"].bool()] - reference).abs()
        del q
        return {"max_abs_logit_diff_vs_4bit_trained": diff.max().item(),
                "mean_abs_logit_diff_vs_4bit_trained": diff.mean().item()}
    except Exception as e:  # information only: never block a merge on it
        log.warning("could not run the 4-bit (as-trained) comparison: %s", e)
        return {"max_abs_logit_diff_vs_4bit_trained": None, "four_bit_comparison_error": str(e)[:300]}


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config)
    except (checks.CheckFailed, DataError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
