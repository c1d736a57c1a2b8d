"""Online RL glue for recipes/ppo.py: rewards (reward model or programmatic), greedy held-out answers, the
frozen-model checks (reference log-probs with a precision-aware tolerance), TRL 1.12's PPOTrainer with the
response lengths it computes but does not log (and a train() the Run scaffold can call), the value model,
the per-step log of either trainer and its plot.

Every score is read at the response's EOS (common.preference); an answer that never ends gets its last
token's score minus --missing_eos_penalty, exactly as TRL's PPO does.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common import checks
from common.preference import load_reward_model, prompt_ids, reward_scores


# ---------------------------------------------------------------------------------------------
def concise_reward(text: str, finished: bool, target_words: int) -> float:
    """1 for a finished answer of <= target words, falling linearly to 0 at twice that; -1 if it never ends."""
    if not finished:
        return -1.0
    words = len(text.split())
    return 1.0 - min(1.0, max(0, words - target_words) / target_words)


class Scorer:
    """Scores (prompt ids, response ids) pairs with the reward model or the programmatic reward."""

    def __init__(self, cfg, tokenizer, reward_model, bf16: bool):
        self.cfg, self.tokenizer, self.reward_model, self.bf16 = cfg, tokenizer, reward_model, bf16

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        eos = self.tokenizer.eos_token_id
        finished = [eos in r for r in responses]
        responses = [r[:r.index(eos) + 1] if eos in r else r for r in responses]
        if self.cfg.reward == "concise":
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            return [concise_reward(t, f, self.cfg.concise_target_words) for t, f in zip(texts, finished)]
        scores = reward_scores(self.reward_model, self.tokenizer.pad_token_id,
                               [p + r for p, r in zip(prompts, responses)], autocast_bf16=self.bf16)
        return [float(s) - (0.0 if f else self.cfg.missing_eos_penalty) for s, f in zip(scores, finished)]

    def grpo_reward(self):
        """A TRL GRPO reward function (name shows up in the logs) over the completions' token ids."""
        def reward(prompts, completions, completion_ids, **kwargs):
            return self([prompt_ids(self.tokenizer, p) for p in prompts], [list(c) for c in completion_ids])
        reward.__name__ = "reward_model" if self.cfg.reward == "model" else "concise"
        return reward


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy response token ids (left-padded batch), cut after the first EOS."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    eos = tokenizer.eos_token_id
    responses = []
    for row in out[:, width:].tolist():
        responses.append(row[:row.index(eos) + 1] if eos in row else row)
    return responses


@torch.no_grad()
def sequence_logps(model, prompts: list[list[int]], responses: list[list[int]], precision: str = "fp32") -> torch.Tensor:
    """Summed log-prob of each response given its prompt (to check that the reference did not move), with the
    forward under `precision`'s autocast: after training the trainer's Accelerator has wrapped the policy's
    forward in that autocast anyway, so start and end are measured the same way."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    out = []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(p) - 1:-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None]).sum())
    model.train(was_training)
    return torch.stack(out).cpu()


FROZEN_TOLERANCE = 1e-3  # fp32: a summed log-prob or reward recomputed on an unchanged model moves far less


def reference_tolerance(logps_fp32: torch.Tensor, logps_at_precision: torch.Tensor) -> float:
    """How far the reference's summed log-probs may move before the check calls it moved.

    Under bf16/fp16 the same unchanged weights give summed log-probs that differ from fp32 by the rounding of
    every logit, added up over the whole response (CHRONICLES: GRPO at bf16 tripped the fixed fp32 tolerance).
    That gap, measured on this model and these held-out sequences before training, is the noise floor of the
    precision: twice it, plus the fp32 tolerance, is what rounding alone can explain. A reference that really
    moved (a trained or merged base weight) moves its log-probs by much more.
    """
    floor = float((logps_at_precision - logps_fp32).abs().max())
    return FROZEN_TOLERANCE + 2 * floor


def held_out(model, tokenizer, scorer, prompts, cfg) -> dict:
    """Greedy answers to the held-out prompts, their rewards, lengths and the share that finished."""
    responses = greedy_answers(model, tokenizer, prompts, cfg.response_length)
    scores = scorer(prompts, responses)
    eos = tokenizer.eos_token_id
    return {"responses": responses, "texts": tokenizer.batch_decode(responses, skip_special_tokens=True),
            "scores": scores, "mean_score": sum(scores) / len(scores),
            "mean_length": sum(len(r) for r in responses) / len(responses),
            "finished": sum(eos in r for r in responses) / len(responses)}


def import_ppo():
    """(PPOConfig, PPOTrainer + the mean response length in each step's log). TRL 1.12 computes the lengths
    inside train() (`get_reward` on the EOS-truncated responses) and does not log them; we read them there."""
    import trl

    try:
        import trl.experimental.ppo.ppo_trainer as ppo_module
        from trl.experimental.ppo import PPOConfig
    except ImportError:
        raise checks.CheckFailed(f"PPOTrainer is not in this TRL ({trl.__version__}): it moved to trl.experimental.ppo "
                                 "and was removed in 1.13.0. Install trl==1.12.0 (requirements.txt), or use "
                                 "--algorithm grpo") from None
    if not hasattr(ppo_module, "get_reward"):
        raise checks.CheckFailed(f"trl.experimental.ppo in TRL {trl.__version__} has no get_reward: this recipe is "
                                 "written against trl==1.12.0 (requirements.txt)")

    class PPOTrainerWithLengths(ppo_module.PPOTrainer):
        def train(self, resume_from_checkpoint=None):
            """TRL's loop, returning a TrainOutput as Trainer.train does (common.run.Run.train reads it). TRL's
            loop always starts at step 0: a checkpoint to resume from is refused."""
            from transformers.trainer_utils import TrainOutput

            if resume_from_checkpoint:
                raise checks.CheckFailed(f"TRL's PPOTrainer cannot resume (asked to from {resume_from_checkpoint}); "
                                         "rerun into a new --output_dir")
            original, lengths = ppo_module.get_reward, []
            self._response_lengths, self.rollout_tokens = lengths, 0
            start = time.time()

            def get_reward(model, query_responses, pad_token_id, context_length):
                out = original(model, query_responses, pad_token_id, context_length)
                if model is self.reward_model:  # the call on the EOS-truncated responses
                    lengths.append((out[2] - context_length + 1).float().cpu())
                    self.rollout_tokens += int((query_responses != pad_token_id).sum())
                return out

            ppo_module.get_reward = get_reward
            try:
                super().train()
            finally:
                ppo_module.get_reward = original
            losses = [h["loss/policy_avg"] for h in self.state.log_history if "loss/policy_avg" in h]
            return TrainOutput(self.state.global_step, sum(losses) / len(losses) if losses else 0.0,
                               {"train_runtime": time.time() - start})

        def log(self, logs, start_time=None):
            if getattr(self, "_response_lengths", None):
                logs["objective/response_length"] = float(torch.cat(self._response_lengths).mean())
                self._response_lengths.clear()
            super().log(logs, start_time)

    return PPOConfig, PPOTrainerWithLengths


def value_model_from(reward_model_path: str, cfg, pad_token_id: int):
    """The critic: a copy of the reward model (its score is a good first value estimate), with LoRA
    injected in place (the class stays a plain *ForSequenceClassification, as PPOTrainer expects)."""
    from peft import LoraConfig, inject_adapter_in_model

    value, _ = load_reward_model(reward_model_path)
    value.config.pad_token_id = pad_token_id
    if cfg.value_lora:
        value = inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                   target_modules=cfg.lora_targets, exclude_modules=["score"]), value)
        for name, p in value.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("score."))
    else:
        value.requires_grad_(True)
    return value.train()


# each algorithm's log keys for the per-step figures (TRL's PPO and GRPO name them differently)
STEP_KEYS = {
    "ppo": {"kl": "objective/kl", "mean_reward": "objective/scores", "response_length": "objective/response_length",
            "policy_loss": "loss/policy_avg", "value_loss": "loss/value_avg", "entropy": "objective/entropy"},
    "grpo": {"kl": "kl", "mean_reward": "reward", "response_length": "completions/mean_length", "policy_loss": "loss",
             "entropy": "entropy", "frac_reward_zero_std": "frac_reward_zero_std"},
}


def step_log(log_history: list[dict], algorithm: str) -> list[dict]:
    """One entry per update: KL, mean reward, response length, losses (metrics.json "steps", loss.png)."""
    keys = STEP_KEYS[algorithm]
    return [{"step": h["step"], **{k: h.get(v) for k, v in keys.items()}}
            for h in log_history if keys["mean_reward"] in h]


def step_summary(steps: list[dict]) -> dict:
    """Mean reward, KL and response length over the first and the last few updates (up to 4, a quarter)."""
    k = max(1, min(4, len(steps) // 4))
    first, last = steps[:k], steps[-k:]
    return {"train_mean_reward_first_steps": sum(s["mean_reward"] for s in first) / k,
            "train_mean_reward_last_steps": sum(s["mean_reward"] for s in last) / k, "steps_averaged": k,
            "train_kl_last_steps": sum((s["kl"] or 0.0) for s in last) / k,
            "train_response_length_first_steps": sum(s["response_length"] for s in first) / k,
            "train_response_length_last_steps": sum(s["response_length"] for s in last) / k}


def plot_steps(steps: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("policy_loss", "policy loss"), ("mean_reward", "mean reward"), ("kl", "KL to reference"),
              ("response_length", "response length (tokens)")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3), dpi=100)
    for ax, (key, label) in zip(axes, panels):
        points = [(s["step"], s[key]) for s in steps if s.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", ms=3)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
