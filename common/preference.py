"""What the preference recipes share (reward_model.py, ppo.py, dpo.py): preference records, a pad token
that is not EOS, one tokenization of prompt + response, and reward-model scoring and loading.

Why a pad token distinct from EOS (CHRONICLES: "pad token == EOS in a reward model or PPO").
SmolLM2 ships pad == EOS == <|im_end|>. A sequence-classification reward model pools the *last
non-pad token*; TRL 1.12's PPO builds its attention mask as `tokens != pad_token_id` and reads the
reward at the token before the first pad. With pad == EOS, every <|im_end|> inside the prompt is
masked out, and PPO reads the reward one token before the EOS, where the reward model was never
trained to. `use_distinct_pad_token` picks an existing special token that the chat template never
emits, so every reader agrees.

Where the reward is read. `reward_sequence` ends every scored sequence *at* its EOS (the ChatML
template adds a "\\n" after <|im_end|>; it is dropped). Reward training, held-out accuracy, PPO's
`get_reward` and the GRPO reward function then all read the score at the EOS token.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from common.checks import CheckFailed
from common.data import load_dataset_file

log = logging.getLogger(__name__)

# Existing special tokens that can serve as padding; never added (that would resize the embeddings).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>", "[PAD]")


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def load_preference(path: str) -> list[dict]:
    """Validated preference records ({prompt, chosen, rejected}, plain or conversational) + `where` (file:line).

    Validation is common.data's (`python -m common.data validate FILE --format preference`): chosen
    identical to rejected, an empty response, a prompt that does not end with a user turn and a
    response with a non-assistant turn are errors naming the line.
    """
    records, _ = load_dataset_file(path, "preference")
    return [{"prompt": r.data["prompt"], "chosen": r.data["chosen"], "rejected": r.data["rejected"],
             "where": f"{r.path}:{r.line}"} for r in records]


def is_conversational(record: dict) -> bool:
    return isinstance(record["prompt"], list)


def prompt_text(record: dict) -> str:
    """The last user message (conversational) or the prompt string, for printing."""
    return record["prompt"][-1]["content"] if is_conversational(record) else record["prompt"]


# ---------------------------------------------------------------------------------------------
# Pad token
# ---------------------------------------------------------------------------------------------
def use_distinct_pad_token(tokenizer, *models) -> str | None:
    """Make the pad token differ from EOS (and from every token the chat template emits); update the
    models' config/generation_config. Returns a note of what changed, or None when nothing did."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        chosen = None
    else:
        vocab = tokenizer.get_vocab()
        used = {tokenizer.eos_token_id, tokenizer.bos_token_id}
        if getattr(tokenizer, "chat_template", None):
            probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
            used |= set(tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True)["input_ids"])
        chosen = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] not in used), None)
        if chosen is None:
            raise CheckFailed(
                f"the tokenizer's pad token is {tokenizer.pad_token!r}, the same as EOS, and it has none of "
                f"{list(PAD_CANDIDATES)} to pad with instead. With pad == EOS the reward model and TRL's PPO mask "
                "every EOS in the prompt and read the reward at the wrong token. Add a pad token "
                "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and model.resize_token_embeddings)")
        old = tokenizer.pad_token
        tokenizer.pad_token = chosen
        log.info("pad token %r (id %s) was EOS or unset: padding with %r (id %d) instead, so EOS is never "
                 "mistaken for padding", old, tokenizer.convert_tokens_to_ids(old) if old else None, chosen,
                 tokenizer.pad_token_id)
    for model in models:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return f"pad token set to {chosen!r} (id {tokenizer.pad_token_id})" if chosen else None


# ---------------------------------------------------------------------------------------------
# Tokenization (mirrors TRL 1.12's DPO/Reward tokenization: prompt with the generation prompt, then
# prompt + response through the template; the completion is what follows the prompt)
# ---------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def split_prompt_completion(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids). Conversational: the template's tokens after the prompt (they hold
    the response and its end-of-turn EOS); plain text: the response tokens + EOS."""
    p = prompt_ids(tokenizer, prompt)
    if isinstance(prompt, list):
        full = list(tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"])
    else:
        full = tokenizer(prompt + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if full[:len(p)] != p:
        raise CheckFailed("the tokenized prompt is not a prefix of the tokenized prompt + response (the chat "
                          "template or tokenizer merges across the boundary); use a template that renders the "
                          "prompt identically with and without the response")
    return p, full[len(p):]


def reward_sequence(tokenizer, prompt, response) -> list[int]:
    """prompt + response token ids ending *at* the response's EOS (where every scorer reads the reward)."""
    p, c = split_prompt_completion(tokenizer, prompt, response)
    if tokenizer.eos_token_id not in c:
        raise CheckFailed("the response does not end with the EOS token after tokenization; the reward would be "
                          "read at an arbitrary token. Check the chat template's end-of-turn token")
    last_eos = len(c) - 1 - c[::-1].index(tokenizer.eos_token_id)
    return p + c[:last_eos + 1]


# ---------------------------------------------------------------------------------------------
# Reward models: scoring and loading
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reward_scores(model, pad_token_id: int, sequences: list[list[int]], batch_size: int = 16,
                  autocast_bf16: bool = False) -> torch.Tensor:
    """Scalar reward per token sequence (right-padded; a sequence-classification head pools the last
    non-pad token, which is the EOS for sequences from `reward_sequence`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            out.append(logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def pairwise_eval(model, tokenizer, records: list[dict], autocast_bf16: bool = False) -> dict:
    """Pairwise accuracy (reward(chosen) > reward(rejected)), mean margin and Bradley-Terry loss."""
    chosen = [reward_sequence(tokenizer, r["prompt"], r["chosen"]) for r in records]
    rejected = [reward_sequence(tokenizer, r["prompt"], r["rejected"]) for r in records]
    scores = reward_scores(model, tokenizer.pad_token_id, chosen + rejected, autocast_bf16=autocast_bf16)
    rc, rr = scores[:len(records)], scores[len(records):]
    margin = rc - rr
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "loss": float(-torch.nn.functional.logsigmoid(margin).mean()), "pairs": len(records),
            "chosen_mean": float(rc.mean()), "rejected_mean": float(rr.mean())}


def check_score_head_trainable(model) -> None:
    """A reward model's `score` head is new (random): it must train. peft freezes it unless the LoRA config
    has task_type SEQ_CLS (or modules_to_save=["score"]); CHRONICLES: "the reward head never trained"."""
    if not any(p.requires_grad for n, p in model.named_parameters() if "score" in n.split(".")):
        raise CheckFailed("the score head is frozen: it starts random, so the reward model can only learn a random "
                          "projection. With LoRA use task_type='SEQ_CLS' (it adds `score` to modules_to_save)")


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a reward_model.py artifact: `model/` (full) or `adapter/` (LoRA + score head,
    merged into its base here), or any sequence-classification folder with num_labels=1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise CheckFailed(f"--reward_model_path {path}: no such folder; train one with `bash launch/reward_model.sh` "
                          "and pass its adapter/ or model/ folder")
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
    if model.config.num_labels != 1:
        raise CheckFailed(f"{path} is a classifier with {model.config.num_labels} labels; a reward model has one "
                          "output (num_labels=1)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    use_distinct_pad_token(tokenizer, model)
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


# ---- held-out log-probabilities of preference pairs (summed over the completion tokens, as TRL's DPO does) --
def tokenize_pairs(tokenizer, records) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of each pair."""
    out = []
    for r in records:
        p, c = split_prompt_completion(tokenizer, r["prompt"], r["chosen"])
        _, j = split_prompt_completion(tokenizer, r["prompt"], r["rejected"])
        out.append((p, c, j))
    return out


@torch.no_grad()
def completion_logps(model, pairs, pad_id: int, bf16: bool, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Summed log-prob and token count of the chosen and rejected completions of each pair."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seqs = [(p + c, len(p)) for p, c, _ in pairs] + [(p + j, len(p)) for p, _, j in pairs]
    logps, lengths = [], []
    try:
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            width = max(len(s) for s, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            completion = torch.zeros_like(ids, dtype=torch.bool)
            for row, (s, start) in enumerate(chunk):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
                completion[row, start:len(s)] = True
            ids, mask, completion = ids.to(device), mask.to(device), completion.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            keep = completion[:, 1:]
            logps.append((token_logps * keep).sum(-1).cpu())
            lengths.append(keep.sum(-1).cpu())
    finally:
        model.train(was_training)
    logps, lengths = torch.cat(logps), torch.cat(lengths)
    n = len(pairs)
    return {"chosen": logps[:n], "rejected": logps[n:], "chosen_len": lengths[:n], "rejected_len": lengths[n:]}


def preference_figures(policy: dict, reference: dict, beta: float) -> dict:
    """Implicit-reward accuracy and margin of `policy` against `reference` (DPO's r = beta * log-ratio)."""
    rc = beta * (policy["chosen"] - reference["chosen"])
    rr = beta * (policy["rejected"] - reference["rejected"])
    per_token_c = policy["chosen"] / policy["chosen_len"]
    per_token_r = policy["rejected"] / policy["rejected_len"]
    return {"reward_accuracy": float((rc > rr).float().mean()), "reward_margin": float((rc - rr).mean()),
            "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()),
            "logp_accuracy": float((per_token_c > per_token_r).float().mean()),
            "chosen_logp": float(policy["chosen"].mean()), "rejected_logp": float(policy["rejected"].mean())}
