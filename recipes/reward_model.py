"""Reward model: a sequence-classification head (one score) trained on preference pairs with TRL.

What it is for: turn prompt/chosen/rejected pairs into a scalar reward, the reward that recipes/ppo.py
optimises. The base is a causal LM loaded as `AutoModelForSequenceClassification(num_labels=1)`: the
transformer is kept, `score` is a new linear head on the hidden state of the last non-pad token. Loss
is Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)). LoRA (default) trains adapters plus the full
`score` head (peft task_type SEQ_CLS puts it in modules_to_save); `--method full` trains everything.
Pairwise accuracy and margin on the held-out split are measured before and after training.

Run:
    bash launch/reward_model.sh
    python recipes/reward_model.py --config recipes/configs/reward_model.yaml [--key value ...]

Measured here (SmolLM2-135M-Instruct, data/preference, 2-core CPU): see "Preference alignment" in
docs/alignment.md; the figures are in runs/reward_model/metrics.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.data import check_control_tokens, check_format_option, split_eval  # noqa: E402
from common.models import LoraOptions  # noqa: E402
from common.preference import (check_score_head_trainable, load_preference, pairwise_eval, reward_sequence,  # noqa: E402
                               use_distinct_pad_token)
from common.run import Run, RunOptions, run_recipe  # noqa: E402
from common.run_files import write_json  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"


@dataclass
class Config(RunOptions, LoraOptions):
    dataset_path: str = field(default="data/preference/train.jsonl", metadata={"help": "preference pairs (prompt/chosen/rejected, plain or conversational)"})
    eval_dataset_path: str = field(default="data/preference/heldout.jsonl", metadata={"help": "held-out pairs: pairwise accuracy before and after"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | preference: the files must hold preference pairs (prompt/chosen/rejected); a record of another format is refused with its file:line"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training pairs (seeded by --seed) as the held-out set instead of --eval_dataset_path; 0 = no split"})
    method: str = field(default="lora", metadata={"help": "lora (adapters + the score head) | full (every weight)"})


def validate(cfg: Config, args: RewardConfig) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.method not in ("lora", "full"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or full")
    checks.check_world_size(1)
    check_format_option(cfg.dataset_format, ("preference",))


def features_of(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Token ids of chosen and rejected, each ending at its EOS (where the score is read); too long is an error."""
    out, too_long = [], []
    for r in records:
        c, j = reward_sequence(tokenizer, r["prompt"], r["chosen"]), reward_sequence(tokenizer, r["prompt"], r["rejected"])
        if max(len(c), len(j)) > max_length:
            too_long.append(f"{r['where']} ({max(len(c), len(j))} tokens)")
        out.append({"chosen_ids": c, "rejected_ids": j})
    if too_long:
        raise checks.CheckFailed(f"{len(too_long)} pairs are longer than --max_length {max_length} (TRL's "
                                 f"RewardTrainer would drop them without a word): {', '.join(too_long[:5])}. Raise "
                                 "--max_length or shorten them")
    return out


def main(cfg: Config, args: RewardConfig) -> dict:
    from datasets import Dataset
    from peft import get_peft_model

    from common.lora_fast import speed_up_lora

    run = Run(RECIPE, cfg, args, datasets=[cfg.dataset_path] + ([] if cfg.eval_split else [cfg.eval_dataset_path]))
    validate(cfg, args)
    train_records = load_preference(cfg.dataset_path)
    train_records, eval_records = (split_eval(train_records, cfg.eval_split, args.seed) if cfg.eval_split
                                   else (train_records, load_preference(cfg.eval_dataset_path)))

    # ---- tokenizer and features ------------------------------------------------------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_control_tokens(train_records + eval_records, "preference", tokenizer, source=model_path)
    pad_note = use_distinct_pad_token(tokenizer)
    features = features_of(train_records + eval_records, tokenizer, args.max_length)
    train_features = features[:len(train_records)]
    resume_from = run.open()
    run.started()

    # ---- model: causal LM -> sequence classifier with a fresh score head (+ LoRA) ------------------
    run.measure_memory()
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32,
                                                               device_map={"": str(run.device)})
    use_distinct_pad_token(tokenizer, model)  # the head pools the last token that is not pad_token_id
    lora_modules = 0
    if cfg.method == "lora":  # task_type SEQ_CLS puts `score` in modules_to_save: the new head trains in full
        model = get_peft_model(model, cfg.lora_config(task_type="SEQ_CLS"))
        speed_up_lora(model)  # peft's maths, fewer passes (common/lora_fast.py)
        lora_modules = checks.check_lora_targets(model, cfg.lora_targets)
    check_score_head_trainable(model)
    checks.log_parameter_counts(model)
    checks.check_model_device(model, run.device)

    # ---- before: held-out pairwise accuracy (a random head: about chance) -------------------------
    bf16 = run.precision == "bf16"
    before_file = run.output_dir / "before.json"
    if resume_from and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = pairwise_eval(model, tokenizer, eval_records, autocast_bf16=bf16)
        write_json(before_file, before)
    run.log.info("held-out before training: accuracy %.3f, margin %.3f (%d pairs)", before["accuracy"],
                 before["margin"], before["pairs"])

    # ---- train (TRL RewardTrainer) -----------------------------------------------------------------
    args = run.library_args(args, dataloader_num_workers=0, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_features),
                            processing_class=tokenizer, callbacks=run.callbacks(counters=("_total_train_tokens",)))
    run.bind(trainer)
    if len(trainer.train_dataset) != len(train_features):
        raise checks.CheckFailed(f"TRL kept {len(trainer.train_dataset)} of {len(train_features)} training pairs")
    whole = run.train(trainer)

    # ---- after: held-out accuracy, save ------------------------------------------------------------
    after = pairwise_eval(model, tokenizer, eval_records, autocast_bf16=bf16)
    artifact = run.output_dir / ("adapter" if cfg.method == "lora" else "model")
    model.save_pretrained(artifact)
    tokenizer.save_pretrained(artifact)  # with the pad token the head was trained with

    history = trainer.state.log_history
    tokens, seconds = whole["_total_train_tokens"], whole["train_seconds"]  # TRL's count, summed over segments
    return run.finish(trainer, whole, {
        "method": cfg.method, "model": model_path,
        "train_accuracy_last_log": next((h["accuracy"] for h in reversed(history) if "accuracy" in h), None),
        "heldout_accuracy_before": before["accuracy"], "heldout_accuracy_after": after["accuracy"],
        "heldout_margin_before": before["margin"], "heldout_margin_after": after["margin"],
        "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
        "heldout_chosen_reward_after": after["chosen_mean"], "heldout_rejected_reward_after": after["rejected_mean"],
        "heldout_pairs": after["pairs"], "train_pairs": len(train_features), "trained_tokens": tokens,
        "train_tokens_per_epoch": sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in train_features),
        "tokens_per_second": round(tokens / seconds, 2) if seconds else None, "lora_modules": lora_modules,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "pad_token": tokenizer.pad_token, "pad_token_changed": pad_note, "artifact": str(artifact),
    }, f"reward model ({cfg.method}) on {Path(model_path).name}", headline=(
        "heldout_accuracy_before", "heldout_accuracy_after", "heldout_margin_before", "heldout_margin_after",
        "final_train_loss", "wall_seconds", "peak_memory_bytes"))


CONFIGS = (Config, RewardConfig)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
