"""Held-out keyword probes: greedy answers to the held-out chats that carry `keywords`, scored by keyword
accuracy before and after training, printed side by side and kept in generations.json."""
from __future__ import annotations

from pathlib import Path

from common.evaluation import generate_replies, keyword_accuracy
from common.run_files import write_json


class KeywordProbe:
    def __init__(self, eval_records, eval_fmt: str, max_new_tokens: int):
        probe = [r for r in eval_records if r.data.get("keywords")] if eval_fmt == "chat" else []
        self.conversations = [r.data["messages"][:-1] for r in probe]
        self.keywords = [r.data["keywords"] for r in probe]
        self.max_new_tokens = max_new_tokens

    def __len__(self) -> int:
        return len(self.conversations)

    def score(self, model, tokenizer) -> dict:
        """{"replies", "keyword_accuracy"}, or {} when the held-out set has no keywords."""
        if not self.conversations:
            return {}
        replies = generate_replies(model, tokenizer, self.conversations, self.max_new_tokens)
        return {"replies": replies, "keyword_accuracy": keyword_accuracy(replies, self.keywords)}

    def report(self, before: dict, after: dict, shown: int, path: Path) -> None:
        """Print `shown` prompts with both answers; write every prompt, keyword list and answer to `path`."""
        if not self.conversations:
            return
        print("\n=== held-out prompts: before -> after training ===")
        for i in range(min(shown, len(self))):
            print(f"Q: {self.conversations[i][-1]['content']}")
            print(f"  before: {before.get('replies', ['(not run: QLoRA on CPU)'] * len(self))[i]}")
            print(f"  after:  {after['replies'][i]}")
        write_json(path, {"prompts": [c[-1]["content"] for c in self.conversations], "keywords": self.keywords,
                          "before": before.get("replies"), "after": after["replies"]})
