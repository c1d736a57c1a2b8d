"""Tokenization with assistant-only loss masks, and the causal-LM collator that pads and labels.

Two steps, kept apart on purpose (labels attached before padding give rows of different lengths,
and batching fails with "expected sequence of length 554 at dim 1 (got 107)"):

1. `tokenize_sft` turns each example into `input_ids` + `loss_mask` (1 = learn this token),
   unpadded. Chat examples use the tokenizer's chat template with {% generation %} markers, so
   every assistant turn *and its end-of-turn token* are learned and nothing else is (system,
   user, template tokens). Truncation to `max_length` is decided per example and reported:
   an example left with no labelled token, or cut past the end of its answer (no complete
   assistant turn, so no end-of-turn label: it would teach the model not to stop), is left out
   and named (file:line), never silently; when every example is, that is a DataError (file:line
   + the max_length that would keep one). An example that keeps at least one complete assistant
   turn is trained on what fits (a later turn cut short is counted in `partial_turns`).
2. `CausalLMCollator` pads a batch to a multiple of 8 and only then builds `labels`
   (-100 on padding and on every unmasked token). Labels come from the mask, not from
   `input_ids != pad_id`, so EOS is learned even when the pad token *is* the EOS token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from common.data import DataError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive 1s: one per assistant turn."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def encode_completion(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    """Plain-text prompt/completion: learn the completion and a closing EOS."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


@dataclass
class TruncationReport:
    examples: int = 0
    kept: int = 0
    truncated_examples: int = 0       # examples longer than max_length
    partial_turns: int = 0            # assistant turns cut in the middle
    dropped_turns: int = 0            # assistant turns entirely beyond max_length
    dropped_examples: list[str] = field(default_factory=list)  # "file:line" with nothing left to learn
    cut_examples: list[str] = field(default_factory=list)  # "file:line" cut past the end of their answer
    cut_longest: int = 0              # tokens of the longest cut example (the max_length that keeps them all)
    tokens: int = 0
    labelled_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def log(self, max_length: int) -> None:
        log.info("tokenized %d examples: %d tokens, %d labelled (%.1f%%)", self.kept, self.tokens,
                 self.labelled_tokens, 100.0 * self.labelled_tokens / max(self.tokens, 1))
        if self.truncated_examples:
            log.warning("max_length=%d truncated %d/%d examples: %d assistant turns cut short, %d dropped "
                        "entirely. Raise --max_length if these matter.", max_length, self.truncated_examples,
                        self.examples, self.partial_turns, self.dropped_turns)
        if self.dropped_examples:
            shown = ", ".join(self.dropped_examples[:5]) + (" ..." if len(self.dropped_examples) > 5 else "")
            log.warning("dropped %d examples with no assistant token left after truncation to max_length=%d: %s",
                        len(self.dropped_examples), max_length, shown)
        if self.cut_examples:
            shown = ", ".join(self.cut_examples[:5]) + (" ..." if len(self.cut_examples) > 5 else "")
            log.warning("left out %d examples that max_length=%d truncates past the end of their answer (no complete "
                        "assistant turn and no end-of-turn token left, so they would teach the model not to stop): "
                        "%s. Raise --max_length to %d, or drop or split these records", len(self.cut_examples),
                        max_length, shown, self.cut_longest)


def tokenize_sft(items, tokenizer, max_length: int) -> tuple[list[dict], TruncationReport]:
    """items: iterable of (where, messages_or_None, data) where `where` is "file:line".

    Returns features with `input_ids` and `loss_mask` (same length, <= max_length).
    """
    report = TruncationReport()
    features = []
    shortest_prompt = None  # fewest tokens before the first assistant token among dropped examples
    lost = []  # "file:line" of every example left out, in order
    for where, messages, data in items:
        report.examples += 1
        if messages is not None:
            ids, mask = encode_chat(messages, tokenizer)
        else:
            ids, mask = encode_completion(data["prompt"], data["completion"], tokenizer)
        if len(ids) != len(mask):
            raise ValueError(f"{where}: tokenizer returned {len(ids)} ids but {len(mask)} mask entries")
        if not any(mask):
            raise ValueError(f"{where}: no assistant token is marked for training. The chat template must wrap "
                             "each assistant message (and its end-of-turn token) in {% generation %} ... "
                             "{% endgeneration %}; see common.assets.chatml_template")
        if len(ids) > max_length:
            report.truncated_examples += 1
            spans = assistant_spans(mask)
            for start, end in spans:
                if start >= max_length:
                    report.dropped_turns += 1
                elif end > max_length:
                    report.partial_turns += 1
            first_labelled = list(mask).index(1)
            full_length = len(ids)
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                report.dropped_examples.append(where)
                lost.append(where)
                shortest_prompt = min(shortest_prompt or first_labelled, first_labelled)
                continue
            if not any(end <= max_length for _, end in spans):  # every kept answer lost its end (and EOS)
                report.cut_examples.append(where)
                lost.append(where)
                report.cut_longest = max(report.cut_longest, full_length)
                continue
        features.append({"input_ids": ids, "loss_mask": mask})
        report.kept += 1
        report.tokens += len(ids)
        report.labelled_tokens += sum(mask)
    if not report.examples:
        raise ValueError("no examples to tokenize; the dataset is empty")
    if not features and report.cut_examples:
        path, _, line = lost[0].rpartition(":")
        lines = [w.rpartition(":")[2] or "?" for w in lost]
        shown = ", ".join(lines[:5]) + (", ..." if len(lines) > 5 else "")
        raise DataError(path or "dataset", int(line) if line.isdigit() else None,
                        f"no example fits max_length={max_length} with the end of its answer: "
                        f"{len(report.cut_examples)} of {len(lost)} examples are truncated past the end of their answer "
                        f"(lines {shown}), so the model would never see an end-of-turn token; raise --max_length to "
                        f"{report.cut_longest} (the longest such example), or drop or split the long records")
    if not features:  # all dropped is an error; some dropped is the warning in TruncationReport.log
        path, _, line = report.dropped_examples[0].rpartition(":")
        lines = [w.rpartition(":")[2] or "?" for w in report.dropped_examples]
        shown = ", ".join(lines[:5]) + (", ..." if len(lines) > 5 else "")
        raise DataError(path or "dataset", int(line) if line.isdigit() else 1,
                        f"no example has a labelled token within max_length={max_length}: all {len(lines)} examples lose "
                        f"every assistant token to truncation (lines {shown}); raise --max_length above {shortest_prompt} "
                        "(the fewest tokens any example has before its first assistant reply) or shorten the "
                        "system/user text")
    return features, report


class CausalLMCollator:
    """Right-pads `input_ids`/`loss_mask` features to a multiple of `pad_to_multiple_of`, then labels.

    A batch with no labelled token at all is an error (its loss would be NaN or 0).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (a distinct token is best; "
                             "the EOS token also works with this collator because labels come from the loss mask)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        for i, f in enumerate(features):
            if len(f["input_ids"]) != len(f["loss_mask"]):
                raise ValueError(f"batch item {i}: input_ids has {len(f['input_ids'])} tokens but loss_mask has "
                                 f"{len(f['loss_mask'])}; both must come from the same tokenization")
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m if m else longest
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        loss_mask = torch.zeros((len(features), width), dtype=torch.bool)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            loss_mask[i, :n] = torch.tensor(f["loss_mask"], dtype=torch.bool)
        labels = torch.where(loss_mask & attention_mask.bool(), input_ids, IGNORE_INDEX)
        if not (labels != IGNORE_INDEX).any():
            raise ValueError("a training batch has no labelled token (every label is -100): the loss would be "
                             "NaN or zero. Check the assistant masks of these examples or raise --max_length")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PaddingFreeCollator:
    """Padding-free ("packed") batches: a micro-batch becomes ONE row with no padding at all.

    Output (transformers' DataCollatorWithFlattening contract, which this wraps): `input_ids` and
    `labels` of shape [1, total tokens], `position_ids` restarting at 0 for every example, and no
    `attention_mask`. Labels come from the loss mask (assistant-only, as in CausalLMCollator), and each
    example's first label is -100, so no token learns to predict the next example's first token.

    Attention stays inside each example only because the model sees `position_ids` and NO attention
    mask: transformers then builds a block-diagonal causal mask from the position restarts (sdpa,
    eager: masking_utils.find_packed_sequence_indices) or varlen cu_seqlens (flash_attention_2).
    Two ways that silently breaks (CHRONICLES "Packed sequences attend to each other"): an
    all-ones `attention_mask` next to the position_ids, or `config.use_cache=True` (a KV cache
    switches packed-sequence detection off, in training mode too). `packed_attention_leak` measures it.

    `flash_attn_kwargs=True` adds `cu_seq_lens_q/k` and `max_length_q/k` so flash-attn does not
    recompute the boundaries from position_ids (a device sync) in every layer.
    """

    def __init__(self, flash_attn_kwargs: bool = False):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                  return_flash_attn_kwargs=flash_attn_kwargs)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for i, f in enumerate(features):
            ids, mask = f["input_ids"], f["loss_mask"]
            if len(ids) != len(mask):
                raise ValueError(f"batch item {i}: input_ids has {len(ids)} tokens but loss_mask has {len(mask)}; "
                                 "both must come from the same tokenization")
            rows.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
        batch = self.flatten(rows, return_tensors="pt")
        if not (batch["labels"] != IGNORE_INDEX).any():
            raise ValueError("a training batch has no labelled token (every label is -100): the loss would be "
                             "NaN or zero. Check the assistant masks of these examples or raise --max_length")
        return batch


@torch.no_grad()
def packed_attention_leak(model, features: list[dict], collator) -> float:
    """How much packed examples see of each other, measured on the real model: 0.0 = isolated.

    Packs `features` (at least 2), changes every token of the FIRST example, and returns the largest
    change of the logits of all the OTHER examples. With block-diagonal attention those logits do not
    depend on the first example at all (same shapes, same kernels: the result is exact, in any
    precision); a leak moves them by about the size of the logits. Both forwards run in training mode
    (the path training takes; an eval-mode forward would repack bitsandbytes 4-bit weights on CPU)
    with the same RNG seed, so dropout masks are identical.
    """
    if len(features) < 2:
        raise ValueError("packed_attention_leak needs at least 2 examples")
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    changed = [{**features[0], "input_ids": [(t + 1) % vocab for t in features[0]["input_ids"]]}] + list(features[1:])
    first = len(features[0]["input_ids"])
    outputs = []
    try:
        for feats in (features, changed):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collator(feats).items() if k != "labels"}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(0)  # no_grad: two forwards with their graphs held would be the run's memory peak
                outputs.append(model(**batch).logits[0, first:].float())
    finally:
        model.train(was_training)
    return float((outputs[0] - outputs[1]).abs().max())
