"""Tokenization with assistant-only loss masks, and the causal-LM collator that pads and labels.

Two steps, kept apart on purpose (seed 000, episode 7: labels attached before padding crashed
batching with "expected sequence of length 554 at dim 1 (got 107)"):

1. `tokenize_sft` turns each example into `input_ids` + `loss_mask` (1 = learn this token),
   unpadded. Chat examples use the tokenizer's chat template with {% generation %} markers, so
   every assistant turn *and its end-of-turn token* are learned and nothing else is (system,
   user, template tokens). Truncation to `max_length` is counted per assistant turn and reported;
   an example left with no labelled token is dropped and named (file:line), never silently.
2. `CausalLMCollator` pads a batch to a multiple of 8 and only then builds `labels`
   (-100 on padding and on every unmasked token). Labels come from the mask, not from
   `input_ids != pad_id`, so EOS is learned even when the pad token *is* the EOS token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

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


def tokenize_sft(items, tokenizer, max_length: int) -> tuple[list[dict], TruncationReport]:
    """items: iterable of (where, messages_or_None, data) where `where` is "file:line".

    Returns features with `input_ids` and `loss_mask` (same length, <= max_length).
    """
    report = TruncationReport()
    features = []
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
            for start, end in assistant_spans(mask):
                if start >= max_length:
                    report.dropped_turns += 1
                elif end > max_length:
                    report.partial_turns += 1
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                report.dropped_examples.append(where)
                continue
        features.append({"input_ids": ids, "loss_mask": mask})
        report.kept += 1
        report.tokens += len(ids)
        report.labelled_tokens += sum(mask)
    if not features:
        raise ValueError(f"no example has a labelled token within max_length={max_length}; "
                         "raise --max_length or shorten the prompts")
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
