"""Evaluation pieces shared by recipes: batched greedy generation and keyword accuracy.

Generation pads on the left (a right-padded prompt would make the model continue after pad
tokens) and stops at the tokenizer's EOS.
"""
from __future__ import annotations

import torch


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
