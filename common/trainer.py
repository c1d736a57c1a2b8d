"""The Trainer the SFT recipes use: transformers' Trainer plus exact trained-token counts."""
from __future__ import annotations

import torch
from transformers import Trainer


class TokenCountingTrainer(Trainer):
    """Counts the tokens of the batches it actually trains on (non-pad and labelled), per process.

    The collator cannot: accelerate's dataloader collates one batch ahead to detect the last one,
    so a run stopped by max_steps collates a batch it never trains (CHRONICLES entry 15).
    Padding-free (packed) batches have no attention_mask and no padding: every position is a token.
    `trained_positions` counts every position fed to the model, padding included, so
    1 - trained_tokens / trained_positions is the padding fraction.

    Evaluation batches always come in dataset order (SequentialSampler), whatever the training sampler
    (e.g. train_sampling_strategy="group_by_length"), so the held-out loss, a mean of per-batch means,
    is the same number for the same model whichever way training batches were formed.
    """

    trained_tokens = trained_labelled_tokens = trained_positions = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        positions = inputs["input_ids"].numel()
        mask = inputs.get("attention_mask")
        self.trained_tokens += int(mask.sum()) if mask is not None else positions
        self.trained_positions += positions
        self.trained_labelled_tokens += int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_eval_sampler(self, eval_dataset):
        if eval_dataset is None or not hasattr(eval_dataset, "__len__"):
            return None
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


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
