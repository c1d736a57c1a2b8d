"""The Trainer the SFT recipes use: transformers' Trainer plus exact trained-token counts."""
from __future__ import annotations

import torch
from transformers import Trainer


class TokenCountingTrainer(Trainer):
    """Counts the tokens of the batches it actually trains on (non-pad and labelled), per process.

    The collator cannot: accelerate's dataloader collates one batch ahead to detect the last one,
    so a run stopped by max_steps collates a batch it never trains (CHRONICLES entry 15).
    """

    trained_tokens = trained_labelled_tokens = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained_tokens += int(inputs["attention_mask"].sum())
        self.trained_labelled_tokens += int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)


@torch.no_grad()
def mean_batch_loss(model, features: list[dict], collator, batch_size: int = 8) -> float:
    """Held-out loss as Trainer.evaluate reports it (mean of per-batch mean losses), without the Trainer.

    Usable before training under DeepSpeed ZeRO-1/2, where `Trainer.evaluate()` before `train()` raises
    "ZeRO inference only makes sense with ZeRO Stage 3".
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collator(features[i:i + batch_size]).items()}
        losses.append(float(model(**batch).loss))
    model.train(was_training)
    return sum(losses) / len(losses)
