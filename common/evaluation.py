"""Evaluation pieces shared by recipes: batched greedy generation, keyword accuracy, token-weighted
perplexity, text-overlap metrics (ROUGE, BLEU, chrF, exact match) and label parsing; for recipes/evaluate.py
also the model under test in its three forms (model folder, base + adapter, merged export; a vision-language
model too, scored on image chats by `score_image_chats`), one set scored
by one model (`score_set`), and the report (results table with deltas, per-set loss plot).

Generation pads on the left (a right-padded prompt would make the model continue after pad
tokens) and stops at the tokenizer's EOS and the chat template's end-of-turn token.
"""
from __future__ import annotations

import json
import math
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import checks
from common.vlm import is_vlm_folder


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies to each conversation (its last message is the user's)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    replies = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            replies += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def keyword_accuracy(replies: list[str], keywords: list[list[str]]) -> float:
    """Fraction of replies that contain every one of their keywords (case-insensitive)."""
    hits = [all(k.lower() in r.lower() for k in ks) for r, ks in zip(replies, keywords)]
    return sum(hits) / max(len(hits), 1)


# ---------------------------------------------------------------------------------------------
# Generation that reports how each reply ended, token-weighted perplexity, text-overlap metrics,
# and the chat template's end-of-turn token (recipes/evaluate.py, recipes/merge_export.py).
# ---------------------------------------------------------------------------------------------


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML: <|im_end|>,
    Llama 3: <|eot_id|>), or None without a chat template. Generation must stop on it; a
    generation_config whose eos_token_id lacks it makes every reply run to max_new_tokens."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "EOT_PROBE_7f3a"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = text.split(probe, 1)[1] if probe in text else ""
    specials = sorted({str(t) for t in tokenizer.all_special_tokens} | set(tokenizer.get_added_vocab()), key=len,
                      reverse=True)
    for token in specials:
        if token and after.startswith(token):
            return tokenizer.convert_tokens_to_ids(token)
    return None


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id generation should stop at: the tokenizer's EOS, the template's end-of-turn token and
    whatever the model's generation_config lists."""
    ids = []
    candidates = [tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)]
    if generation_config is not None:
        eos = generation_config.eos_token_id
        candidates += eos if isinstance(eos, (list, tuple)) else [eos]
    for i in candidates:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


@dataclass
class Generation:
    text: str              # the reply, decoded without special tokens, cut at the first stop token
    new_tokens: int        # tokens generated before the stop token (or max_new_tokens)
    stopped_at_eos: bool   # False: the reply ran to max_new_tokens (the pad == EOS symptom, CHRONICLES 3)


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16,
                     stop_ids: list[int] | None = None) -> list[Generation]:
    """Greedy continuations of already-templated prompt strings, batched with LEFT padding.

    A right-padded batch puts pad tokens between a short prompt and its continuation: the model
    then continues after the pads and the short prompts get garbage (transformers only warns:
    "A decoder-only architecture is being used, but right-padding was detected!"). Each row stops
    at the first stop id; the tokens after it (pad fill) are dropped before decoding.
    """
    stop_ids = stop_ids or stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    results = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=pad_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                stop = next((k for k, t in enumerate(row) if t in stop_ids), None)
                kept = row if stop is None else row[:stop]
                results.append(Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept),
                                          stop is not None))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results


@torch.no_grad()
def token_weighted_nll(model, features: list[dict], pad_token_id: int, batch_size: int = 8,
                       distributed: bool | None = None) -> tuple[float, int]:
    """(sum of next-token NLL over every labelled token, number of labelled tokens) of the whole set.

    The project's one definition of held-out loss is `sum / count` (`heldout_loss`): every labelled token
    weighs the same, whatever batch or rank it fell in, and every example counts once. Features are
    `tokenize_sft` output (input_ids + loss_mask); labels come from the mask, so EOS is counted when
    pad == EOS. Batches are right-padded (CausalLMCollator), padding is never labelled.

    Why not `Trainer.evaluate` (CHRONICLES "eval loss 0.5 nats off with 2 ranks"): it averages per-batch
    mean losses weighted by examples, and on N ranks transformers 5 divides each rank's summed loss by
    the MEAN labelled-token count over the ranks (`average_tokens_across_devices`), then keeps the first
    len(set) of the gathered per-example copies of those losses: a rank whose batch has more labelled
    tokens reports a proportionally larger loss, and which copies survive depends on how the sampler
    padded the last round with duplicates.

    Distributed (`distributed=None`: whenever a process group with several ranks is up): rank r scores
    features[r::world] and the sums are all-reduced, so every rank returns the same whole-set figures.
    Every rank must call it, and every rank runs the same number of forward passes (a shorter shard
    repeats a discarded batch), which ZeRO-3 and FSDP, whose forwards are collectives, need.
    """
    import torch.distributed as dist

    from common.collator import CausalLMCollator

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = features[rank::world]
    rounds = math.ceil(math.ceil(len(features) / world) / batch_size)  # batches of the longest shard
    collate = CausalLMCollator(pad_token_id, pad_to_multiple_of=8)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for step in range(rounds):
            chunk = shard[step * batch_size:(step + 1) * batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk or features[:1]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if not chunk:  # only to keep the ranks' forward passes in step
                continue
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                    labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += nll.double()
            count += (labels != -100).sum()
    finally:
        model.train(was_training)
    if distributed:
        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    return float(total), int(count)


def heldout_loss(model, features: list[dict], pad_token_id: int, batch_size: int = 8) -> float | None:
    """Held-out loss, nats: token-weighted mean NLL over every labelled token of the set, each example once
    (see token_weighted_nll). The number every recipe reports as eval_loss; None without features."""
    if not features:
        return None
    total, count = token_weighted_nll(model, features, pad_token_id, batch_size)
    return total / count if count else float("nan")


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD-style), for exact match."""
    text = text.lower().replace("_", " ")
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def text_metrics(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-1/2/L F1 (rouge-score, stemmed, mean over examples, 0-1), corpus BLEU and chrF (sacrebleu,
    0-100) and exact match (normalized, 0-1) of predictions against one reference each.

    Scales are the libraries' own. Corpus BLEU needs 4-grams: a set of one- to three-word replies
    scores 0 even when every reply is identical to its reference; ROUGE-2 of a one-word reply is 0.
    rouge-score's tokenizer keeps only [a-z0-9], so text in other scripts scores 0 with it.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    out = {key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rouge2", "rougeL")}
    out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    out["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    out["exact_match"] = sum(normalize_answer(p) == normalize_answer(r)
                             for p, r in zip(predictions, references)) / len(predictions)
    return out


def parse_label(reply: str, labels: list[str]) -> str | None:
    """The allowed label a generated reply names: the reply itself when it is a label (after
    normalization), else the one label it contains; None when it names none or several."""
    norm = normalize_answer(reply)
    by_norm = {normalize_answer(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm]
    found = [label for n, label in by_norm.items() if re.search(rf"\b{re.escape(n)}\b", norm)]
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------
# The model under test, one set scored, and the report (recipes/evaluate.py)
# ---------------------------------------------------------------------------------------------
def load_model_under_test(name_or_path: str, adapter_path: str | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, description) for a model folder (a base or a merged export), an asset:... name, or a
    base + adapter; an adapter folder passed as the model is read as its base + that adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.assets import resolve_model_path

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
    if is_vlm_folder(path):  # LLaVA-style: the processor (tokenizer + image processor) stands in for the tokenizer
        from transformers import AutoModelForImageTextToText, AutoProcessor

        tokenizer = AutoProcessor.from_pretrained(tok_dir)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map={"": str(device)})
    else:
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


def model_is_vlm(name_or_path: str, adapter_path: str | None = None) -> bool:
    """Whether the model under test (a folder, asset:..., or an adapter folder's base) is a vision-language model."""
    if name_or_path.startswith("asset:"):  # decided without building it: the VLM assets are the *_vlm ones
        return name_or_path.endswith("_vlm")
    path = Path(name_or_path)
    if adapter_path is None and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return model_is_vlm(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    return is_vlm_folder(path)


def score_image_chats(model, processor, chats, batch_size: int, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """(metrics, one row per chat) of a vision-language model on held-out image chats (common.vlm): answer
    accuracy (the reply's first word is the reference's), per record `kind`, and the token-weighted loss."""
    from common.vlm import VLMCollator, answer_accuracy, answer_questions, heldout_loss, tokenize_image_chats

    start = time.time()
    features = tokenize_image_chats(chats, processor, max_length=1 << 30)
    loss = heldout_loss(model, features, VLMCollator(processor), batch_size=max(1, batch_size // 2))
    replies = answer_questions(model, processor, chats, max_new_tokens, batch_size)
    metrics = {"examples": len(chats), **answer_accuracy(chats, replies), "loss": loss,
               "perplexity": math.exp(loss) if loss is not None else None, "seconds": round(time.time() - start, 2)}
    metrics.pop("questions")
    rows = [{"prompt": c.messages[-2]["content"], "images": c.images, "reference": c.messages[-1]["content"],
             "reply": r} for c, r in zip(chats, replies)]
    return metrics, rows


def score_set(model, tokenizer, items: dict, classification: bool, max_length: int, batch_size: int,
              max_new_tokens: int) -> tuple[dict, list[dict]]:
    """(metrics, one row per example) of one model on one set. `items`: prompts (messages or text), references,
    keywords, `examples` as tokenize_sft takes them and, for a classification set, its `labels`. Perplexity over
    the labelled tokens; greedy replies scored against the references (or as labels)."""
    from common.collator import tokenize_sft

    start = time.time()
    features, truncation = tokenize_sft(items["examples"], tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll, count = token_weighted_nll(model, features, pad, batch_size=max(1, batch_size // 2))
    prompts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
               for p in items["prompts"]]
    gens = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size,
                            stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    replies, refs = [g.text for g in gens], items["references"]
    metrics = {"examples": len(replies), "labelled_tokens": count, "loss": nll / count, "perplexity": perplexity(nll, count),
               "truncated_examples": truncation.truncated_examples}
    if classification:
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
             "stopped_at_eos": g.stopped_at_eos, **({"predicted_label": pl} if classification else {})}
            for p, ref, g, pl in zip(items["prompts"], refs, gens, predicted)]
    return metrics, rows


TABLE_METRICS = ["perplexity", "loss", "keyword_accuracy", "accuracy", "exact_match", "rouge1", "rouge2", "rougeL",
                 "bleu", "chrf", "eos_stop_rate", "mean_new_tokens"]
SCALES = {"rouge1": "F1, 0-1", "rouge2": "F1, 0-1", "rougeL": "F1, 0-1", "bleu": "corpus, 0-100", "chrf": "corpus, 0-100",
          "exact_match": "0-1", "keyword_accuracy": "0-1", "accuracy": "0-1", "eos_stop_rate": "0-1",
          "perplexity": "exp(token-weighted NLL)", "loss": "token-weighted NLL, nats"}


def deltas(model: dict, baseline: dict) -> dict:
    """model - baseline for every numeric TABLE_METRICS figure of every set both have."""
    return {name: {k: model[name][k] - baseline[name][k] for k in TABLE_METRICS
                   if isinstance(model[name].get(k), (int, float)) and isinstance(baseline[name].get(k), (int, float))}
            for name in model if name in baseline}


def fmt_value(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def results_table(model: dict, baseline: dict | None) -> str:
    """The markdown table of results.md: set, metric (with its scale), baseline, model, delta."""
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
    """loss.png of an evaluation: token-weighted loss per set, model beside baseline."""
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
