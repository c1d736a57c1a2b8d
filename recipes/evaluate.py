"""Evaluate a model, a base + adapter, or a merged export; compare it with a baseline (forgetting check).

What it is for: the numbers you want after fine-tuning, on held-out data, for the model you will deploy:
  - perplexity over the labelled tokens (assistant turns and their end-of-turn token), token-weighted:
    exp(sum of NLL / number of labelled tokens) over the whole set, not a mean of batch means;
  - replies by batched greedy generation (left padding, stopping at EOS / the end-of-turn token) scored
    against the reference reply: ROUGE-1/2/L (rouge-score, F1, 0-1), BLEU and chrF (sacrebleu, corpus,
    0-100), exact match (normalized), keyword accuracy where records carry `keywords`, and how many
    replies stopped at EOS instead of running to max_new_tokens;
  - classification-style data (text,label; Banking77-like intents): the prompt lists the allowed labels,
    the model generates one; accuracy (the one allowed label the reply names) and exact match (the reply
    is the label), invalid replies counted, chance level reported;
  - the catastrophic-forgetting check (seed 003): the same metrics for a baseline (the base model) on a
    general-knowledge set and the domain set, and the delta fine-tuned - baseline per set.

The model under test is any of: a model folder (--model_name_or_path, e.g. the base or a merged export
from recipes/merge_export.py), a base + adapter (--adapter_path, or --model_name_or_path pointing at an
adapter folder). With an adapter, the baseline is the same base with the adapter disabled; otherwise pass
--baseline_model_name_or_path.

Run:
    bash launch/evaluate.sh --adapter_path runs/sft_memory_diet/adapter
    bash launch/evaluate.sh --model_name_or_path runs/merge_export/merged --baseline_model_name_or_path asset:smollm2
    python recipes/evaluate.py --config recipes/configs/evaluate.yaml [--key value ...]
Writes metrics.json (every figure), results.md (the table, also printed), generations.json, manifest.json,
loss.png (per-set loss, model vs baseline).

Measured here (SmolLM2-135M-Instruct + the quickstart adapter, 2-core CPU): see docs/export.md, "Evaluate".
"""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import prepare_output_dir  # noqa: E402
from common.collator import tokenize_sft  # noqa: E402
from common.run import run_recipe  # noqa: E402
from common.data import load_dataset_file, to_messages  # noqa: E402
from common.evaluation import (generate_batched, keyword_accuracy, normalize_answer, parse_label,  # noqa: E402
                               perplexity, stop_token_ids, text_metrics, token_weighted_nll)
from common.models import DTYPES, resolve_precision  # noqa: E402
from common.run_files import PeakMemory, device_name, now, write_json, write_manifest  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "model under test: a model folder (base or merged export), asset:..., or an adapter folder"})
    adapter_path: str | None = field(default=None, metadata={"help": "PEFT adapter applied to --model_name_or_path (unmerged)"})
    baseline_model_name_or_path: str | None = field(default=None, metadata={"help": "baseline for the forgetting check; default: the base with the adapter disabled when there is an adapter, else none"})
    compare_baseline: bool = field(default=True, metadata={"help": "evaluate the baseline too and report deltas"})
    domain_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "the fine-tuning domain's held-out set (chat, instruction or completion; `keywords` optional)"})
    general_dataset_path: str | None = field(default="data/eval/general.jsonl", metadata={"help": "general-knowledge set for the forgetting check"})
    classification_dataset_path: str | None = field(default=None, metadata={"help": "text,label data (e.g. data/samples/classification.csv): accuracy by generating a label"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory: metrics.json, results.md, generations.json, manifest.json, loss.png"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="fp32", metadata={"help": "auto | bf16 | fp16 | fp32: dtype the models are loaded in"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length for replies"})
    classification_max_new_tokens: int = field(default=12, metadata={"help": "generation length for a label"})
    batch_size: int = field(default=16, metadata={"help": "batch size for generation and perplexity"})
    max_length: int = field(default=512, metadata={"help": "tokens per example for perplexity (longer ones are truncated)"})
    max_examples: int = field(default=0, metadata={"help": "use at most N examples per set (0 = all)"})
    seed: int = field(default=42, metadata={"help": "random seed (generation is greedy)"})


# ---------------------------------------------------------------------------------------------
# Loading the three forms: model folder, base + adapter, merged export
# ---------------------------------------------------------------------------------------------
def load_model(name_or_path: str, adapter_path: str | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, description). An adapter folder passed as the model is read as base + adapter."""
    path = Path(resolve_model_path(name_or_path))
    if adapter_path is None and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter_path, path = str(path), Path(resolve_model_path(
            json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]))
    if not (path / "config.json").is_file():
        raise checks.CheckFailed(f"{name_or_path}: no config.json in {path}; pass a model folder, an asset:... name or "
                                 "an adapter folder")
    if adapter_path and not (Path(adapter_path) / "adapter_config.json").is_file():
        raise checks.CheckFailed(f"--adapter_path {adapter_path}: no adapter_config.json there")
    tok_dir = Path(adapter_path) if adapter_path and (Path(adapter_path) / "tokenizer_config.json").is_file() else path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": str(device)})
    described = str(path)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
        described = f"{path} + adapter {adapter_path}"
    model.eval()
    model.config.use_cache = True
    return model, tokenizer, described


# ---------------------------------------------------------------------------------------------
# One set, one model
# ---------------------------------------------------------------------------------------------
def classification_prompt(text: str, labels: list[str]) -> list[dict]:
    return [{"role": "user", "content": "Classify the customer's message into exactly one of these intents: "
             + ", ".join(labels) + f".\nMessage: {text}\nAnswer with the intent name only."}]


def build_items(records, fmt: str, kind: str, max_examples: int = 0) -> dict:
    """Prompts (as messages or raw text), references, keywords and full examples for perplexity.
    Classification labels come from the whole file, before --max_examples cuts it."""
    items = {"prompts": [], "references": [], "keywords": [], "examples": [], "labels": None}
    if kind == "classification":
        if fmt != "classification":
            raise checks.CheckFailed(f"{records[0].path}: format {fmt!r}; the classification set needs text,label records")
        labels = sorted({str(r.data["label"]) for r in records})
        items["labels"] = labels
        for r in records[:max_examples or None]:
            prompt = classification_prompt(r.data["text"], labels)
            items["prompts"].append(prompt)
            items["references"].append(str(r.data["label"]))
            items["examples"].append((f"{r.path}:{r.line}", prompt + [{"role": "assistant", "content": str(r.data["label"])}], r.data))
        return items
    if fmt not in ("chat", "instruction", "completion"):
        raise checks.CheckFailed(f"{records[0].path}: format {fmt!r} cannot be scored as replies; use chat, instruction "
                                 "or completion data (classification data goes to --classification_dataset_path)")
    for r in records[:max_examples or None]:
        messages = to_messages(r.data, fmt)
        if messages is None:  # plain-text prompt/completion
            items["prompts"].append(r.data["prompt"])
            items["references"].append(r.data["completion"])
        else:
            if messages[-1]["role"] != "assistant":
                raise checks.CheckFailed(f"{r.path}:{r.line}: the last message must be the assistant's reference reply")
            items["prompts"].append(messages[:-1])
            items["references"].append(messages[-1]["content"])
        items["keywords"].append(r.data.get("keywords"))
        items["examples"].append((f"{r.path}:{r.line}", messages, r.data))
    return items


def evaluate_set(model, tokenizer, items: dict, cfg: Config, kind: str) -> tuple[dict, list[dict]]:
    start = time.time()
    features, truncation = tokenize_sft(items["examples"], tokenizer, cfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll, count = token_weighted_nll(model, features, pad, batch_size=max(1, cfg.batch_size // 2))
    prompts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
               for p in items["prompts"]]
    max_new = cfg.classification_max_new_tokens if kind == "classification" else cfg.max_new_tokens
    gens = generate_batched(model, tokenizer, prompts, max_new, cfg.batch_size,
                            stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    replies, refs = [g.text for g in gens], items["references"]
    metrics = {"examples": len(replies), "labelled_tokens": count, "loss": nll / count, "perplexity": perplexity(nll, count),
               "truncated_examples": truncation.truncated_examples}
    if kind == "classification":
        predicted = [parse_label(r, items["labels"]) for r in replies]
        metrics["accuracy"] = sum(p == ref for p, ref in zip(predicted, refs)) / len(refs)
        metrics["exact_match"] = sum(normalize_answer(r) == normalize_answer(ref) for r, ref in zip(replies, refs)) / len(refs)
        metrics["invalid_fraction"] = sum(p is None for p in predicted) / len(refs)
        metrics["chance_accuracy"] = 1 / len(items["labels"])
        metrics["labels"] = items["labels"]
    else:
        predicted = [None] * len(replies)
        metrics.update(text_metrics(replies, refs))
        with_keywords = [(r, k) for r, k in zip(replies, items["keywords"]) if k]
        if with_keywords:
            metrics["keyword_accuracy"] = keyword_accuracy(*zip(*with_keywords))
    metrics["eos_stop_rate"] = sum(g.stopped_at_eos for g in gens) / len(gens)
    metrics["mean_new_tokens"] = sum(g.new_tokens for g in gens) / len(gens)
    metrics["seconds"] = round(time.time() - start, 2)
    rows = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "reference": ref, "reply": g.text,
             "stopped_at_eos": g.stopped_at_eos, **({"predicted_label": pl} if kind == "classification" else {})}
            for p, ref, g, pl in zip(items["prompts"], refs, gens, predicted)]
    return metrics, rows


# ---------------------------------------------------------------------------------------------
# Report: deltas and the table
# ---------------------------------------------------------------------------------------------
TABLE_METRICS = ["perplexity", "loss", "keyword_accuracy", "accuracy", "exact_match", "rouge1", "rouge2", "rougeL",
                 "bleu", "chrf", "eos_stop_rate", "mean_new_tokens"]
SCALES = {"rouge1": "F1, 0-1", "rouge2": "F1, 0-1", "rougeL": "F1, 0-1", "bleu": "corpus, 0-100", "chrf": "corpus, 0-100",
          "exact_match": "0-1", "keyword_accuracy": "0-1", "accuracy": "0-1", "eos_stop_rate": "0-1",
          "perplexity": "exp(token-weighted NLL)", "loss": "token-weighted NLL, nats"}


def deltas(model: dict, baseline: dict) -> dict:
    return {name: {k: model[name][k] - baseline[name][k] for k in TABLE_METRICS
                   if isinstance(model[name].get(k), (int, float)) and isinstance(baseline[name].get(k), (int, float))}
            for name in model if name in baseline}


def fmt_value(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def results_table(model: dict, baseline: dict | None) -> str:
    if baseline:
        lines = ["| set | metric | baseline | model | delta (model - baseline) |", "|---|---|---|---|---|"]
    else:
        lines = ["| set | metric | model |", "|---|---|---|"]
    delta = deltas(model, baseline) if baseline else {}
    for name, m in model.items():
        for k in TABLE_METRICS:
            if k not in m:
                continue
            label = f"{k} ({SCALES[k]})" if k in SCALES else k
            if baseline:
                b = baseline.get(name, {}).get(k)
                d = delta.get(name, {}).get(k)
                lines.append(f"| {name} (n={m['examples']}) | {label} | {fmt_value(b)} | {fmt_value(m[k])} | "
                             f"{'-' if d is None else f'{d:+.4g}'} |")
            else:
                lines.append(f"| {name} (n={m['examples']}) | {label} | {fmt_value(m[k])} |")
    return "\n".join(lines) + "\n"


def plot_set_losses(path: Path, model: dict, baseline: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(model)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    width = 0.38 if baseline else 0.6
    if baseline:
        ax.bar([i - width / 2 for i in range(len(names))], [baseline[n]["loss"] for n in names], width, label="baseline")
    ax.bar([i + (width / 2 if baseline else 0) for i in range(len(names))], [model[n]["loss"] for n in names], width,
           label="model")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("token-weighted loss (labelled tokens)")
    ax.set_title("evaluate: loss per set", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(cfg: Config) -> dict:
    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." per call
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    for key in ("adapter_path", "baseline_model_name_or_path", "domain_dataset_path", "general_dataset_path",
                "classification_dataset_path"):
        if str(getattr(cfg, key)).strip().lower() in ("", "none", "null"):
            setattr(cfg, key, None)  # the command line cannot say null: '' or none unsets an option

    # ---- validate everything that needs no model -------------------------------------------------
    device = checks.resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    sets = {name: path for name, path in (("domain", cfg.domain_dataset_path), ("general", cfg.general_dataset_path),
                                           ("classification", cfg.classification_dataset_path)) if path}
    if not sets:
        raise checks.CheckFailed("no evaluation set: pass --domain_dataset_path, --general_dataset_path or "
                                 "--classification_dataset_path")
    items = {}
    for name, path in sets.items():
        records, fmt = load_dataset_file(path)
        items[name] = build_items(records, fmt, "classification" if name == "classification" else "reply",
                                  max(cfg.max_examples, 0))
    prepare_output_dir(output_dir, asdict(cfg), resume=True)
    write_manifest(output_dir, cfg, list(sets.values()), started, "running")

    # ---- the model under test, then the baseline -------------------------------------------------
    memory = PeakMemory(device)
    dtype = DTYPES[precision]
    model, tokenizer, described = load_model(cfg.model_name_or_path, cfg.adapter_path, device, dtype)
    has_adapter = hasattr(model, "disable_adapter")
    results, generations = {}, {"model": {}}
    for name, it in items.items():
        results[name], generations["model"][name] = evaluate_set(model, tokenizer, it, cfg, name if name == "classification" else "reply")
        log.info("model / %s: %s", name, json.dumps({k: round(v, 4) for k, v in results[name].items()
                                                     if k in TABLE_METRICS and v is not None}))
    baseline, baseline_described = None, None
    if cfg.compare_baseline and (cfg.baseline_model_name_or_path or has_adapter):
        if cfg.baseline_model_name_or_path:
            del model
            model, tokenizer, baseline_described = load_model(cfg.baseline_model_name_or_path, None, device, dtype)
            context = nullcontext()
        else:
            baseline_described = f"{described.split(' + adapter')[0]} (adapter disabled)"
            context = model.disable_adapter()
        baseline, generations["baseline"] = {}, {}
        with context:
            for name, it in items.items():
                baseline[name], generations["baseline"][name] = evaluate_set(
                    model, tokenizer, it, cfg, name if name == "classification" else "reply")
    elif cfg.compare_baseline:
        log.info("no baseline: pass --baseline_model_name_or_path (e.g. the base model) for the forgetting check")

    # ---- report ----------------------------------------------------------------------------------
    table = results_table(results, baseline)
    print(f"\nmodel: {described}" + (f"\nbaseline: {baseline_described}" if baseline else "") + "\n\n" + table)
    (output_dir / "results.md").write_text(f"model: {described}\n\n" + (f"baseline: {baseline_described}\n\n" if baseline else "")
                                           + table)
    write_json(output_dir / "generations.json", generations)
    plot_set_losses(output_dir / "loss.png", results, baseline)
    metrics = {
        "recipe": RECIPE, "model": described, "baseline": baseline_described, "device": device_name(device),
        "device_type": device.type, "world_size": 1, "precision": precision,
        "datasets": sets, "results": results, "baseline_results": baseline,
        "deltas": deltas(results, baseline) if baseline else None,
        "forgetting": ({k: -v for k, v in deltas(results, baseline).get("general", {}).items()
                        if k in ("keyword_accuracy", "rougeL", "exact_match", "chrf")} if baseline and "general" in results else None),
        "metric_scales": SCALES, "wall_seconds": round(time.time() - wall_start, 2), **memory.report(),
    }
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, list(sets.values()), started, "finished")
    return metrics


if __name__ == "__main__":
    run_recipe(main, Config)
