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
  --register_model NAME  (the tracking extra, bash launch/setup_tracking.sh) merged/ and adapter/ as new versions of
                    NAME-merged and NAME-adapter in the MLflow store beside the run directory (runs/mlflow.db), tagged
                    with the base model, the training data's sha256, the recipe and the git commit (docs/tracking.md).

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

A vision-language adapter (recipes/sft_vlm.py; the base config has vision_config + text_config) merges the same
way into a LLaVA folder with its processor (AutoProcessor + AutoModelForImageTextToText load it), verified on image
chats (--sample_dataset_path, default for a VLM run: its generated <run>/shapes/heldout.jsonl); no GGUF for it.

Measured here (SmolLM2-135M-Instruct quickstart adapter, 2-core CPU): see docs/export.md, "Merge and export".
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.data import load_dataset_file, to_messages  # noqa: E402
from common.evaluation import end_of_turn_token_id  # noqa: E402
from common.gguf import export_gguf, plan_gguf  # noqa: E402
from common.models import DTYPES  # noqa: E402
from common.run import ModelOptions, Run, run_recipe  # noqa: E402
from common.tracking import check_model_name, register_export  # noqa: E402
from common.verify import (check_unquantized_base, compare_with_4bit_training, detect_4bit_training,  # noqa: E402
                           export_generation_config, folder_bytes, merge_lora, per_sample_loss, plot_losses,
                           reference_logits, verification_inputs, verify_in_fresh_process, vlm_verification_inputs)
from common.vlm import is_vlm_folder, vlm_sample_chats  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"
# max |logit diff| allowed against the fp32 adapter model. fp32: merge reassociation only (measured ~1e-5);
# bf16/fp16: weight rounding plus bf16/fp16 compute in the fresh process (measured on SmolLM2, see docs/export.md).
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.5, "bf16": 2.0}


@dataclass
class Config(ModelOptions):
    model_name_or_path: str | None = field(default=None, metadata={"help": "unquantized base model (local dir or asset:...); default: the adapter's base_model_name_or_path"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda: where the fp32 merge runs (fp32 needs 4 bytes per parameter)"})
    adapter_path: str = field(default="runs/sft_memory_diet/adapter", metadata={"help": "PEFT LoRA adapter folder (what sft_memory_diet.py writes to <output_dir>/adapter)"})
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
    seed: int = field(default=42, metadata={"help": "random seed"})
    register_model: str | None = field(default=None, metadata={"help": "NAME: register merged/ and adapter/ as versions of NAME-merged and NAME-adapter in the MLflow store (needs the tracking extra: bash launch/setup_tracking.sh); default: off"})


def validate(cfg: Config) -> tuple[dict, str, str]:
    """Everything about the adapter and its base that needs no weights, each with the option to change:
    (the adapter's config, the base folder, the dtype of merged/)."""
    if cfg.register_model is not None:  # first: mlflow installed, a name the registry takes
        check_model_name(cfg.register_model)
    adapter_dir = Path(cfg.adapter_path)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise checks.CheckFailed(f"--adapter_path {adapter_dir}: no adapter_config.json there. Pass the adapter folder "
                                 "a training run wrote (e.g. runs/sft_memory_diet/adapter)")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise checks.CheckFailed(f"{adapter_dir}: peft_type {adapter_config.get('peft_type')!r}; this recipe merges LoRA "
                                 "adapters only")
    base = resolve_model_path(cfg.model_name_or_path or adapter_config.get("base_model_name_or_path") or "")
    if not (Path(base) / "config.json").is_file():
        raise checks.CheckFailed(f"base model {base!r} is not a local model folder (no config.json); pass "
                                 "--model_name_or_path with the unquantized base the adapter was trained on")
    saved_dtype = check_unquantized_base(base)
    dtype_name = saved_dtype if cfg.dtype == "auto" else cfg.dtype
    if dtype_name not in DTYPES:
        raise checks.CheckFailed(f"--dtype {cfg.dtype!r}: choose auto, fp32, bf16 or fp16")
    return adapter_config, base, dtype_name


def main(cfg: Config) -> dict:
    from peft import PeftModel

    adapter_dir = Path(cfg.adapter_path)
    run = Run(RECIPE, cfg, datasets=[cfg.sample_dataset_path, str(adapter_dir)])
    transformers.logging.set_verbosity_error()
    adapter_config, base, dtype_name = validate(cfg)
    base_dir = Path(base)
    vlm = is_vlm_folder(base_dir)  # LLaVA-style (recipes/sft_vlm.py): image chats in, no GGUF out
    if vlm and cfg.gguf_type not in ("auto", "none"):
        raise checks.CheckFailed(f"--gguf_type {cfg.gguf_type} for a vision-language model: llama.cpp takes a VLM as two "
                                 "files (the language model and an mmproj file for the vision tower + projector, from "
                                 "its own converter's --mmproj mode), which this recipe does not build or check; use "
                                 "--gguf_type none (merged/ serves in vLLM/TGI/transformers)")
    gguf_types, quantizations, llama_cpp_dir, gguf_missing = plan_gguf("none" if vlm else cfg.gguf_type,
                                                                       cfg.gguf_quantizations, cfg.llama_cpp_dir)
    if vlm:
        gguf_missing = "a vision-language model: no GGUF (llama.cpp needs a separate mmproj file for its vision part)"
    trained_on_4bit, detected_from = detect_4bit_training(adapter_dir, cfg.trained_on_4bit)
    if vlm:
        image_chats, sample_path = vlm_sample_chats(cfg.sample_dataset_path, adapter_dir, cfg.num_samples)
        records, fmt, conversations = [], None, []
        run.datasets[0] = sample_path
    else:
        records, fmt = load_dataset_file(cfg.sample_dataset_path)
        conversations = [to_messages(r.data, fmt) for r in records[:cfg.num_samples]]
    if cfg.num_samples < 1 or any(c is None for c in conversations):
        raise checks.CheckFailed(f"{cfg.sample_dataset_path}: need chat or instruction records for verification "
                                 f"(and --num_samples >= 1)")
    # the questions both llama.cpp and the merged HF model answer: each record without its last reply
    asked = [to_messages(r.data, fmt) for r in (records[:cfg.gguf_questions] if gguf_types else [])]
    chats = [m[:-1] for m in asked if m and m[-1]["role"] == "assistant" and len(m) > 1]
    tolerance = cfg.max_logit_diff if cfg.max_logit_diff is not None else DEFAULT_TOLERANCE[dtype_name]
    run.open()
    run.started()
    run.log.info("adapter %s on base %s; trained on a 4-bit base: %s (from %s); merged dtype %s", adapter_dir, base,
                 trained_on_4bit, detected_from, dtype_name)

    # ---- the adapter model: unquantized fp32 base + LoRA (the reference) ------------------------
    run.measure_memory()
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    processor = AutoProcessor.from_pretrained(source) if vlm else None  # the VLM's tokenizer + image processor
    tokenizer = processor.tokenizer if vlm else AutoTokenizer.from_pretrained(source)
    model = PeftModel.from_pretrained((AutoModelForImageTextToText if vlm else AutoModelForCausalLM).from_pretrained(
        base_dir, dtype=torch.float32, device_map={"": str(run.device)}), adapter_dir).eval()
    inputs = vlm_verification_inputs(processor, image_chats) if vlm else verification_inputs(tokenizer, conversations)
    reference = reference_logits(model, inputs, run.device)
    metrics_4bit = compare_with_4bit_training(base_dir, adapter_dir, inputs, reference, run.device) if trained_on_4bit else {}

    # ---- merge in fp32, cast once, save merged/ (and adapter/) -----------------------------------
    merge_start = time.time()
    merged, lora_layers = merge_lora(model)
    merge_seconds = time.time() - merge_start
    stop_ids = list(dict.fromkeys(i for i in (end_of_turn_token_id(tokenizer), tokenizer.eos_token_id) if i is not None))
    merged = merged.to(DTYPES[dtype_name])
    merged.config.use_cache = True
    merged_dir = run.output_dir / "merged"
    merged.generation_config = export_generation_config(base_dir, merged.config, tokenizer, stop_ids)
    merged.save_pretrained(merged_dir)
    (processor or tokenizer).save_pretrained(merged_dir)
    del merged, model
    adapter_copy = run.output_dir / "adapter" if cfg.copy_adapter else None
    if adapter_copy:
        shutil.copytree(adapter_dir, adapter_copy, dirs_exist_ok=True)

    # ---- verify merged/ in a fresh process ---------------------------------------------------------
    with tempfile.TemporaryDirectory(dir=run.output_dir) as work:
        (hf,) = verify_in_fresh_process([(merged_dir, None)], inputs, reference, [tolerance], Path(work))

    # ---- GGUF: converter -> quantizer -> each file checked in llama.cpp ------------------------------
    gguf_failures, gg = [], None
    if gguf_types:
        try:
            gg, gguf_failures = export_gguf(merged_dir, run.output_dir, gguf_types, quantizations, llama_cpp_dir,
                                            tokenizer, stop_ids, inputs, reference, chats, cfg.gguf_max_tokens,
                                            cfg.gguf_exact_answers)
        except (checks.CheckFailed, ValueError, RuntimeError) as e:  # llama_cpp.Llama raises ValueError on a refused file
            gguf_failures = [f"GGUF: {e}"]

    # ---- report: a failed check keeps every file and exits 1 ---------------------------------------
    failures = []
    if not hf["passed"]:
        failures.append(f"merged model: max |logit diff| {hf['max_abs_logit_diff']:.3g} > tolerance {tolerance:g}")
    if not hf["tokenizer_ids_match"]:
        failures.append("merged tokenizer gives different token ids than the adapter's tokenizer")
    failures += gguf_failures
    plot_losses(run.output_dir / "loss.png", {"adapter (fp32, unmerged)": per_sample_loss(reference, inputs),
                                              f"merged/ ({dtype_name})": hf["per_sample_loss"]},
                f"merge_export: {adapter_dir} on {base_dir.name}")
    files = None if gg is None else [{k: v for k, v in f.items() if k != "answers"} for f in gg["files"]]
    metrics = run.write_results({
        "adapter_path": str(adapter_dir), "base_model": base,
        "trained_on_4bit": trained_on_4bit, "trained_on_4bit_detected_from": detected_from,
        "merge_dtype": "fp32", "export_dtype": dtype_name, "lora_layers_merged": lora_layers,
        "lora_r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
        "merge_seconds": round(merge_seconds, 3), "merged_dir": str(merged_dir), "merged_bytes": folder_bytes(merged_dir),
        "adapter_copy": str(adapter_copy) if adapter_copy else None,
        "adapter_bytes": folder_bytes(adapter_dir), "stop_token_ids": stop_ids,
        "verification_samples": len(inputs["ids"]), "verification_dataset": run.datasets[0], "vision_language": vlm,
        "merged_vs_adapter": {k: v for k, v in hf.items() if k != "per_sample_loss"},
        "max_abs_logit_diff": hf["max_abs_logit_diff"], "top1_agreement": hf["top1_agreement"], "tolerance": tolerance,
        **metrics_4bit, "gguf": files[0] if files else None, "gguf_files": files,
        "gguf_answers_match": {f["type"]: f["answers_match_rate"] for f in gg["files"]} if gg else None,
        "gguf_skipped": gguf_missing, "gguf_error": "; ".join(gguf_failures) or None, "verified": not failures,
    }, "failed" if failures else "finished", headline=("max_abs_logit_diff", "top1_agreement", "gguf_answers_match",
                                                       "verified"))
    if failures:
        raise checks.CheckFailed("verification failed: " + "; ".join(failures) + f" (figures in {run.output_dir / 'metrics.json'})")
    if cfg.register_model is not None:  # only a verified export becomes a model version
        metrics = register_export(cfg.register_model, run, metrics, {"merged": merged_dir, "adapter": adapter_copy or adapter_dir},
                                  adapter_dir, base)
        run.log.info("registered: %s", metrics["registered_model_versions"])
    return metrics


CONFIGS = (Config,)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
