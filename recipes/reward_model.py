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
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import (CheckpointValidator, NonFiniteGuard, RunError, RunSegments, explain_disk_full,  # noqa: E402
                                prepare_output_dir)
from common.config import parse_config  # noqa: E402
from common.data import DataError, check_control_tokens, check_format_option, split_eval  # noqa: E402
from common.models import resolve_precision  # noqa: E402
from common.preference import (check_score_head_trainable, load_preference, pairwise_eval, reward_sequence,  # noqa: E402
                               use_distinct_pad_token)
from common.run_files import (PeakMemory, device_name, estimated_cost, now, plot_loss, version_drift,  # noqa: E402
                              write_json, write_manifest)
from common.trainer import keep_tracking_in_run_dir  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2; loaded as a sequence classifier (num_labels=1)"})
    dataset_path: str = field(default="data/preference/train.jsonl", metadata={"help": "preference pairs (prompt/chosen/rejected, plain or conversational)"})
    eval_dataset_path: str = field(default="data/preference/heldout.jsonl", metadata={"help": "held-out pairs: pairwise accuracy before and after"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | preference: the files must hold preference pairs (prompt/chosen/rejected); a record of another format is refused with its file:line"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training pairs (seeded by --seed) as the held-out set instead of --eval_dataset_path; 0 = no split"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory (metrics.json, manifest.json, loss.png, adapter/ or model/)"})
    method: str = field(default="lora", metadata={"help": "lora (adapters + the score head) | full (every weight)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (weights stay fp32; bf16/fp16 are autocast)"})
    max_length: int = field(default=256, metadata={"help": "longest prompt+response in tokens; longer pairs are an error (TRL would drop them silently)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warmup: steps (>= 1) or a ratio of all steps (< 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (TRL's default is true; it costs ~20-40%% time)"})
    center_rewards_coefficient: float | None = field(default=None, metadata={"help": "push mean reward towards 0 (TRL; 0.01 recommended when used)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], metadata={"help": "Linear layer names, or all-linear"})
    seed: int = field(default=42, metadata={"help": "random seed (also initialises the score head)"})
    logging_steps: int = field(default=2, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps; 0 = no checkpoints", "min": 0})
    resume: bool = field(default=True, metadata={"help": "resume an unfinished run found in output_dir from its last valid checkpoint"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    hourly_price_usd: float = field(default=1.41, metadata={"help": "price per device-hour for the cost estimate"})


def main(cfg: Config) -> dict:
    from peft import LoraConfig, get_peft_model
    from datasets import Dataset
    import datasets
    from trl import RewardConfig, RewardTrainer

    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # ---- validate everything that needs no model -------------------------------------------------
    if cfg.method not in ("lora", "full"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or full")
    checks.check_world_size(1)
    device = checks.resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    check_format_option(cfg.dataset_format, ("preference",))
    train_records = load_preference(cfg.dataset_path)
    train_records, eval_records = (split_eval(train_records, cfg.eval_split, cfg.seed) if cfg.eval_split
                                   else (train_records, load_preference(cfg.eval_dataset_path)))
    for name in version_drift():
        log.warning("version drift from requirements.txt: %s", name)

    # ---- tokenizer and features: every sequence ends at its EOS, where the score is read ----------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_control_tokens(train_records + eval_records, "preference", tokenizer, source=model_path)
    pad_note = use_distinct_pad_token(tokenizer)
    features, too_long = [], []
    for r in train_records + eval_records:
        c, j = reward_sequence(tokenizer, r["prompt"], r["chosen"]), reward_sequence(tokenizer, r["prompt"], r["rejected"])
        if max(len(c), len(j)) > cfg.max_length:
            too_long.append(f"{r['where']} ({max(len(c), len(j))} tokens)")
        features.append({"chosen_ids": c, "rejected_ids": j})
    if too_long:
        raise checks.CheckFailed(f"{len(too_long)} pairs are longer than --max_length {cfg.max_length} (TRL's "
                                 f"RewardTrainer would drop them without a word): {', '.join(too_long[:5])}. Raise "
                                 "--max_length or shorten them")
    train_features = features[:len(train_records)]
    train_tokens_per_epoch = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in train_features)
    resume_from = prepare_output_dir(output_dir, asdict(cfg), cfg.resume)
    datasets = [cfg.dataset_path] + ([] if cfg.eval_split else [cfg.eval_dataset_path])
    write_manifest(output_dir, cfg, datasets, started, "running")

    # ---- model: causal LM -> sequence classifier with a fresh score head (+ LoRA) ------------------
    memory = PeakMemory(device)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32,
                                                               device_map={"": str(device)})
    use_distinct_pad_token(tokenizer, model)  # the head pools the last token that is not pad_token_id
    if cfg.method == "lora":
        targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
        # task_type SEQ_CLS puts `score` in modules_to_save: the new head is trained and saved in full.
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets, bias="none", task_type="SEQ_CLS"))
        lora_modules = checks.check_lora_targets(model, targets)
    else:
        lora_modules = 0
    check_score_head_trainable(model)
    trainable, total = checks.log_parameter_counts(model)
    checks.check_model_device(model, device)

    # ---- before: held-out pairwise accuracy (a random head: about chance) -------------------------
    bf16 = precision == "bf16"
    before_file = output_dir / "before.json"
    if resume_from and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = pairwise_eval(model, tokenizer, eval_records, autocast_bf16=bf16)
        write_json(before_file, before)
    log.info("held-out before training: accuracy %.3f, margin %.3f (%d pairs)", before["accuracy"], before["margin"],
             before["pairs"])

    # ---- train (TRL RewardTrainer; configs need use_cpu on CPU: TRL defaults to bf16=True) --------
    args = RewardConfig(
        output_dir=str(output_dir), seed=cfg.seed, use_cpu=device.type == "cpu",
        bf16=bf16, fp16=precision == "fp16", max_length=cfg.max_length,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing, center_rewards_coefficient=cfg.center_rewards_coefficient,
        logging_steps=cfg.logging_steps, logging_first_step=True, report_to=cfg.report_to,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=cfg.save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    keep_tracking_in_run_dir(output_dir, cfg.report_to)  # tensorboard/mlflow/trackio files inside the run
    # figures of the segments before a resume travel in the checkpoints: metrics.json covers the whole run
    segments = RunSegments(resume_from, counters=("_total_train_tokens",))  # TRL's count, of this process only
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_features),
                            processing_class=tokenizer, callbacks=[CheckpointValidator(segments=segments), NonFiniteGuard()])
    segments.bind(trainer)
    if len(trainer.train_dataset) != len(train_features):
        raise checks.CheckFailed(f"TRL kept {len(trainer.train_dataset)} of {len(train_features)} training pairs")
    with explain_disk_full(output_dir, trainer):
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    whole = segments.finish(train_result)  # every segment of the run, not only this process's

    # ---- after: held-out accuracy, save ------------------------------------------------------------
    after = pairwise_eval(model, tokenizer, eval_records, autocast_bf16=bf16)
    artifact = output_dir / ("adapter" if cfg.method == "lora" else "model")
    model.save_pretrained(artifact)
    tokenizer.save_pretrained(artifact)  # with the pad token the head was trained with

    # ---- metrics, manifest, plot -----------------------------------------------------------------
    train_seconds = whole["train_seconds"]
    wall = time.time() - wall_start
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    trained_tokens = whole["_total_train_tokens"]
    metrics = {
        "recipe": RECIPE, "method": cfg.method, "model": model_path, "device": device_name(device),
        "device_type": device.type, "world_size": args.world_size, "precision": precision,
        "final_train_loss": train_losses[-1] if train_losses else None, "mean_train_loss": whole["mean_train_loss"],
        "train_accuracy_last_log": next((h["accuracy"] for h in reversed(history) if "accuracy" in h), None),
        "heldout_accuracy_before": before["accuracy"], "heldout_accuracy_after": after["accuracy"],
        "heldout_margin_before": before["margin"], "heldout_margin_after": after["margin"],
        "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
        "heldout_chosen_reward_after": after["chosen_mean"], "heldout_rejected_reward_after": after["rejected_mean"],
        "heldout_pairs": after["pairs"], "train_pairs": len(train_features),
        "optimizer_steps": trainer.state.global_step, "trained_tokens": trained_tokens,
        "train_tokens_per_epoch": train_tokens_per_epoch,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(trained_tokens / train_seconds, 2),
        "trainable_params": trainable, "total_params": total, "lora_modules": lora_modules,
        "effective_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * args.world_size,
        "pad_token": tokenizer.pad_token, "pad_token_changed": pad_note, "artifact": str(artifact),
        "segments": whole["segments"], "segments_complete": whole["segments_complete"],
        **memory.report(), **estimated_cost(wall, cfg.hourly_price_usd, args.world_size),
    }
    plot_loss(history, output_dir / "loss.png", f"reward model ({cfg.method}) on {Path(model_path).name}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, datasets, started, "finished", {"resumed_from": str(resume_from) if resume_from else None})
    log.info("done: %s", json.dumps({k: metrics[k] for k in ("heldout_accuracy_before", "heldout_accuracy_after",
                                                              "heldout_margin_before", "heldout_margin_after",
                                                              "final_train_loss", "wall_seconds", "peak_memory_bytes")}))
    return metrics


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config)
    except (checks.CheckFailed, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
