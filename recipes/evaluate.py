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
    general-knowledge set and the domain set, and the delta fine-tuned - baseline per set;
  - a vision-language model (recipes/sft_vlm.py's adapter, its merged export): answer accuracy and loss on held-out
    image chats (--image_chat_dataset_path), against the base with the adapter disabled;
  - with --harness_tasks, lm-evaluation-harness tasks on the same model and baseline (the optional eval extra:
    bash launch/setup_eval.sh), folded into the same table and forgetting check as "lm-eval:<task>" sets; local
    tasks for the data in data/ (persona_keywords, general_keywords, intent_classification) run offline.

The model under test is any of: a model folder (--model_name_or_path, e.g. the base or a merged export
from recipes/merge_export.py), a base + adapter (--adapter_path, or --model_name_or_path pointing at an
adapter folder). With an adapter, the baseline is the same base with the adapter disabled; otherwise pass
--baseline_model_name_or_path.

Run:
    bash launch/evaluate.sh --adapter_path runs/sft_memory_diet/adapter
    bash launch/evaluate.sh --model_name_or_path runs/merge_export/merged --baseline_model_name_or_path asset:smollm2
    bash launch/evaluate.sh --adapter_path runs/sft_memory_diet/adapter --harness_tasks persona_keywords general_keywords
    python recipes/evaluate.py --config recipes/configs/evaluate.yaml [--key value ...]
Writes metrics.json (every figure), results.md (the table, also printed), generations.json, manifest.json,
loss.png (per-set loss, model vs baseline).

Measured here (SmolLM2-135M-Instruct + the quickstart adapter, 2-core CPU): see docs/export.md, "Evaluate".
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import transformers  # noqa: E402

from common import checks, harness_eval  # noqa: E402
from common.data import load_dataset_file, to_messages  # noqa: E402
from common.evaluation import (SCALES, TABLE_METRICS, deltas, load_model_under_test, model_is_vlm,  # noqa: E402
                               plot_set_losses, results_table, score_image_chats, score_set)
from common.models import DTYPES  # noqa: E402
from common.run import ModelOptions, Run, run_recipe  # noqa: E402
from common.run_files import write_json  # noqa: E402
from common.vlm import load_image_chats  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)
OPTIONAL = ("adapter_path", "baseline_model_name_or_path", "domain_dataset_path", "general_dataset_path",
            "classification_dataset_path", "image_chat_dataset_path")


@dataclass
class Config(ModelOptions):
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "model under test: a model folder (base or merged export), asset:..., or an adapter folder"})
    adapter_path: str | None = field(default=None, metadata={"help": "PEFT adapter applied to --model_name_or_path (unmerged)"})
    baseline_model_name_or_path: str | None = field(default=None, metadata={"help": "baseline for the forgetting check; default: the base with the adapter disabled when there is an adapter, else none"})
    compare_baseline: bool = field(default=True, metadata={"help": "evaluate the baseline too and report deltas"})
    domain_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "the fine-tuning domain's held-out set (chat, instruction or completion; `keywords` optional)"})
    general_dataset_path: str | None = field(default="data/eval/general.jsonl", metadata={"help": "general-knowledge set for the forgetting check"})
    classification_dataset_path: str | None = field(default=None, metadata={"help": "text,label data (e.g. data/samples/classification.csv): accuracy by generating a label"})
    image_chat_dataset_path: str | None = field(default=None, metadata={"help": "held-out image chats ({\"messages\", \"images\"}, e.g. runs/sft_vlm/shapes/heldout.jsonl) for a vision-language model: answer accuracy and loss; a VLM is scored on this set only"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory: metrics.json, results.md, generations.json, manifest.json, loss.png"})
    precision: str = field(default="fp32", metadata={"help": "auto | bf16 | fp16 | fp32: dtype the models are loaded in"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length for replies"})
    classification_max_new_tokens: int = field(default=12, metadata={"help": "generation length for a label"})
    batch_size: int = field(default=16, metadata={"help": "batch size for generation and perplexity"})
    max_length: int = field(default=512, metadata={"help": "tokens per example for perplexity (longer ones are truncated)"})
    max_examples: int = field(default=0, metadata={"help": "use at most N examples per set (0 = all)"})
    seed: int = field(default=42, metadata={"help": "random seed (generation is greedy)"})
    harness_tasks: list[str] = field(default_factory=list, metadata={"help": "lm-eval tasks scored on the model and the baseline too (needs bash launch/setup_eval.sh): persona_keywords, general_keywords, intent_classification (data/lm_eval_tasks), or any lm-eval task where its data is reachable"})


def validate(cfg: Config) -> tuple[dict[str, str], harness_eval.Harness | None]:
    """Everything that needs no model, each with the option to change; returns the sets to score, by name, and the
    lm-eval tasks (lm-eval installed, every name known) or None."""
    if model_is_vlm(cfg.model_name_or_path, cfg.adapter_path):  # scored on image chats, nothing else
        if not cfg.image_chat_dataset_path or cfg.harness_tasks:
            raise checks.CheckFailed(f"{cfg.model_name_or_path} is a vision-language model: pass --image_chat_dataset_path "
                                     "(held-out image chats, e.g. runs/sft_vlm/shapes/heldout.jsonl) and no --harness_tasks")
        log.info("vision-language model: scored on %s only (the text sets are skipped)", cfg.image_chat_dataset_path)
        return {"image_chat": cfg.image_chat_dataset_path}, None
    if cfg.image_chat_dataset_path:
        raise checks.CheckFailed(f"--image_chat_dataset_path needs a vision-language model; {cfg.model_name_or_path} is "
                                 "a text model (drop the option, or pass the VLM, e.g. runs/sft_vlm/adapter)")
    sets = {name: path for name, path in (("domain", cfg.domain_dataset_path), ("general", cfg.general_dataset_path),
                                           ("classification", cfg.classification_dataset_path)) if path}
    if not sets:
        raise checks.CheckFailed("no evaluation set: pass --domain_dataset_path, --general_dataset_path or "
                                 "--classification_dataset_path")
    return sets, harness_eval.check_tasks(cfg.harness_tasks) if harness_eval.split_tasks(cfg.harness_tasks) else None


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


def score(cfg: Config, model, tokenizer, items: dict, name: str) -> tuple[dict, list[dict]]:
    if name == "image_chat":  # `tokenizer` is the VLM's processor
        return score_image_chats(model, tokenizer, items[name], cfg.batch_size, cfg.max_new_tokens)
    classification = name == "classification"
    return score_set(model, tokenizer, items[name], classification, cfg.max_length, cfg.batch_size,
                     cfg.classification_max_new_tokens if classification else cfg.max_new_tokens)


def main(cfg: Config) -> dict:
    for key in OPTIONAL:
        if str(getattr(cfg, key)).strip().lower() in ("", "none", "null"):
            setattr(cfg, key, None)  # the command line cannot say null: '' or none unsets an option
    run = Run(RECIPE, cfg, datasets=[cfg.domain_dataset_path, cfg.general_dataset_path, cfg.classification_dataset_path,
                                     cfg.image_chat_dataset_path,
                                     *harness_eval.data_files(cfg.harness_tasks)])
    transformers.logging.set_verbosity_error()
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." per call
    sets, harness = validate(cfg)
    items = {}
    for name, path in sets.items():
        if name == "image_chat":
            items[name] = load_image_chats(path)[:cfg.max_examples or None]
            continue
        records, fmt = load_dataset_file(path)
        items[name] = build_items(records, fmt, "classification" if name == "classification" else "reply",
                                  max(cfg.max_examples, 0))
    run.open()
    run.started()

    # ---- the model under test, then the baseline -------------------------------------------------
    run.measure_memory()
    dtype = DTYPES[run.precision]
    model, tokenizer, described = load_model_under_test(cfg.model_name_or_path, cfg.adapter_path, run.device, dtype)
    has_adapter = hasattr(model, "disable_adapter")
    results, generations = {}, {"model": {}}
    for name in items:
        results[name], generations["model"][name] = score(cfg, model, tokenizer, items, name)
        run.log.info("model / %s: %s", name, json.dumps({k: round(v, 4) for k, v in results[name].items()
                                                         if k in TABLE_METRICS and v is not None}))
    baseline, baseline_described = None, None
    if cfg.compare_baseline and (cfg.baseline_model_name_or_path or has_adapter):
        if cfg.baseline_model_name_or_path:
            del model
            model, tokenizer, baseline_described = load_model_under_test(cfg.baseline_model_name_or_path, None,
                                                                         run.device, dtype)
            context = nullcontext()
        else:
            baseline_described = f"{described.split(' + adapter')[0]} (adapter disabled)"
            context = model.disable_adapter()
        baseline, generations["baseline"] = {}, {}
        with context:
            for name in items:
                baseline[name], generations["baseline"][name] = score(cfg, model, tokenizer, items, name)
    elif cfg.compare_baseline:
        run.log.info("no baseline: pass --baseline_model_name_or_path (e.g. the base model) for the forgetting check")

    # ---- lm-evaluation-harness on the same model and baseline (--harness_tasks) -------------------
    plot_set_losses(run.output_dir / "loss.png", results, baseline)  # the recipe's own sets: lm-eval has no loss
    if harness:
        del model  # lm-eval loads its own copy of each model
        scores = harness_eval.evaluate(harness, cfg.model_name_or_path, cfg.adapter_path,
                                       (cfg.baseline_model_name_or_path or True) if baseline is not None else None,
                                       dtype, run.device, cfg.batch_size, max(cfg.max_examples, 0), cfg.max_new_tokens)
        harness_eval.fold(scores, results, baseline, generations)

    # ---- report ----------------------------------------------------------------------------------
    table = results_table(results, baseline)
    print(f"\nmodel: {described}" + (f"\nbaseline: {baseline_described}" if baseline else "") + "\n\n" + table)
    (run.output_dir / "results.md").write_text(f"model: {described}\n\n" + (f"baseline: {baseline_described}\n\n"
                                                                              if baseline else "") + table)
    write_json(run.output_dir / "generations.json", generations)
    delta = deltas(results, baseline) if baseline else None
    forgetting = ({k: -v for k, v in delta.get("general", {}).items()
                   if k in ("keyword_accuracy", "rougeL", "exact_match", "chrf")} if baseline and "general" in results else None)
    if harness and baseline:
        forgetting = {**(forgetting or {}), **harness_eval.forgetting(delta, scores)}
    return run.write_results({
        "model": described, "baseline": baseline_described, "datasets": sets, "results": results,
        "baseline_results": baseline, "deltas": delta, "forgetting": forgetting, "metric_scales": SCALES,
        "harness": scores.summary if harness else None,
    })


CONFIGS = (Config,)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
