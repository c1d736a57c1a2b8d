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

import json
import logging
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
from common.checkpoints import prepare_output_dir  # noqa: E402
from common.run import run_recipe  # noqa: E402
from common.data import load_dataset_file, to_messages  # noqa: E402
from common.evaluation import end_of_turn_token_id  # noqa: E402
from common.gguf import (GGUF_TYPES, QUANT_FTYPES, REPO_ROOT, SETUP_EXPORT, export_extra_missing,  # noqa: E402
                         export_gguf)
from common.run_files import PeakMemory, device_name, now, write_json, write_manifest  # noqa: E402

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
# Verification in a fresh process: stock from_pretrained, nothing from this repository
# ---------------------------------------------------------------------------------------------
FRESH_LOAD = Path(__file__).resolve().parent.parent / "common" / "fresh_load.py"  # stock transformers only


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
    proc = subprocess.run([sys.executable, "-I", str(FRESH_LOAD), str(inputs_file), str(out_file), spec],
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
    run_recipe(main, Config)
