"""Prompt, reference and scoring of the local lm-eval tasks in this folder (`!function utils.<name>` in their YAML).

Scored as recipes/evaluate.py scores the same files: a reply hits when it contains every keyword of its record
(case-insensitive); exact match after SQuAD-style normalization (lower case, no punctuation or articles).
"""
import re
import string


def last_user_message(doc: dict) -> str:
    """The prompt: the user's turn the reference reply answers (lm-eval wraps it in the chat template)."""
    return [m for m in doc["messages"] if m["role"] == "user"][-1]["content"]


def reference_reply(doc: dict) -> str:
    return doc["messages"][-1]["content"]


def normalize_answer(text: str) -> str:
    text = text.lower().replace("_", " ")
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def keyword_results(doc: dict, results: list[str]) -> dict:
    reply = results[0]
    return {"keyword_accuracy": float(all(k.lower() in reply.lower() for k in doc["keywords"])),
            "exact_match": float(normalize_answer(reply) == normalize_answer(reference_reply(doc)))}
