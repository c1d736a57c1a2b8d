"""Offline preference optimisation with TRL: DPO (any TRL loss type), or ORPO / KTO behind --algorithm.

What it is for: teach a chat model to prefer the chosen answer of each prompt/chosen/rejected pair,
without a reward model or sampling. With LoRA (default) the reference policy is the same model with
its adapter disabled, so no second copy of the weights is held; `--precompute_ref_log_probs true`
computes the reference log-probabilities once before training (for full fine-tuning this drops the
reference copy too). `--beta` and `--loss_type` (sigmoid, ipo, hinge, robust, ...) are TRL's.
`--algorithm orpo` (reference-free, SFT + odds ratio) and `--algorithm kto` (unpaired: each chosen is a
desirable, each rejected an undesirable example) take the same data.

Held-out figures, before and after, computed here the same way for every algorithm (whole set, not
averaged per batch): implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) for chosen and rejected,
with pi_ref the starting model; reward accuracy = share of pairs with r(chosen) > r(rejected) and margin
= mean r(chosen) - r(rejected). Before training pi == pi_ref, so every reward is exactly 0 and accuracy is
0 (ties count as wrong, as in TRL). The policy's own preference, mean per-token log-prob of chosen >
rejected ("logp accuracy"), is also reported; it has a meaningful starting value. After training the
reference log-probs are recomputed (adapter disabled, or the reference copy) and must not have moved.

Run:
    bash launch/dpo.sh
    python recipes/dpo.py --config recipes/configs/dpo.yaml [--key value ...]

Measured here (SmolLM2-135M-Instruct, data/preference, 2-core CPU): see "Preference alignment" in
docs/alignment.md; the figures are in runs/dpo/metrics.json.
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
from transformers import AutoTokenizer, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import (CheckpointValidator, NonFiniteGuard, RunError, RunSegments, explain_disk_full,  # noqa: E402
                                prepare_output_dir)
from common.config import parse_config  # noqa: E402
from common.data import DataError, check_control_tokens, check_format_option, split_eval  # noqa: E402
from common.evaluation import generate_replies  # noqa: E402
from common.models import load_base_model, pick_attn_implementation, resolve_precision  # noqa: E402
from common.preference import is_conversational, load_preference, prompt_text, split_prompt_completion  # noqa: E402
from common.run_files import (PeakMemory, device_name, estimated_cost, now, plot_loss, version_drift,  # noqa: E402
                              write_json, write_manifest)
from common.trainer import keep_tracking_in_run_dir  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)
ALGORITHMS = ("dpo", "orpo", "kto")


@dataclass
class Config:
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2 (built offline)"})
    dataset_path: str = field(default="data/preference/train.jsonl", metadata={"help": "preference pairs (prompt/chosen/rejected, plain or conversational)"})
    eval_dataset_path: str = field(default="data/preference/heldout.jsonl", metadata={"help": "held-out pairs: reward accuracy and margins before and after"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | preference: the files must hold preference pairs (prompt/chosen/rejected); a record of another format is refused with its file:line"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training pairs (seeded by --seed) as the held-out set instead of --eval_dataset_path; 0 = no split"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory (metrics.json, manifest.json, loss.png, generations.json, adapter/ or model/)"})
    algorithm: str = field(default="dpo", metadata={"help": "dpo | orpo (no reference model) | kto (pairs are split into desirable/undesirable examples)"})
    method: str = field(default="lora", metadata={"help": "lora (reference = adapter disabled, no copy) | full (reference = a frozen copy, or precomputed)"})
    beta: float = field(default=0.1, metadata={"help": "DPO/KTO: strength of the pull towards the reference; ORPO: weight of the odds-ratio term (lambda)"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": "DPO loss(es): sigmoid | ipo | hinge | robust | bco_pair | sppo_hard | nca_pair | apo_zero | ... (TRL DPOConfig.loss_type); KTO: kto | apo_zero_unpaired"})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "DPO/KTO: reference log-probs computed once before training (full: no reference copy in memory)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (weights stay fp32; bf16/fp16 are autocast)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})
    max_length: int = field(default=256, metadata={"help": "prompt + response tokens; a longer pair is an error (TRL would truncate its EOS away)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (LoRA; full fine-tuning wants ~1e-6 to 5e-6)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warmup: steps (>= 1) or a ratio of all steps (< 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (TRL's default is true; ~20-40%% slower)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (TRL disables dropout in the policy anyway)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], metadata={"help": "Linear layer names, or all-linear"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    logging_steps: int = field(default=2, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps; 0 = no checkpoints", "min": 0})
    resume: bool = field(default=True, metadata={"help": "resume an unfinished run found in output_dir from its last valid checkpoint"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    sample_generations: int = field(default=4, metadata={"help": "held-out prompts answered (greedy) before and after; 0 = none"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length for those prompts"})
    hourly_price_usd: float = field(default=1.41, metadata={"help": "price per device-hour for the cost estimate"})


# ---------------------------------------------------------------------------------------------
# Held-out log-probabilities (summed over the completion tokens, as TRL's DPO does)
# ---------------------------------------------------------------------------------------------
def tokenize_pairs(tokenizer, records) -> list[tuple[list[int], list[int], list[int]]]:
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
    rc = beta * (policy["chosen"] - reference["chosen"])
    rr = beta * (policy["rejected"] - reference["rejected"])
    per_token_c = policy["chosen"] / policy["chosen_len"]
    per_token_r = policy["rejected"] / policy["rejected_len"]
    return {"reward_accuracy": float((rc > rr).float().mean()), "reward_margin": float((rc - rr).mean()),
            "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()),
            "logp_accuracy": float((per_token_c > per_token_r).float().mean()),
            "chosen_logp": float(policy["chosen"].mean()), "rejected_logp": float(policy["rejected"].mean())}


def counting_tokens(trainer_cls):
    """The trainer class, counting the non-pad tokens of the batches it trains on (prompt + response, chosen
    and rejected). Not the collator: the dataloader collates one batch ahead (CHRONICLES 15). Not TRL's
    `num_input_tokens_seen`: ORPO batches have no `input_ids`, so the Trainer counts 0 there."""
    class CountingTrainer(trainer_cls):
        trained_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.trained_tokens += sum(int(inputs[k].sum()) for k in TOKEN_KEYS if k in inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    CountingTrainer.__name__ = trainer_cls.__name__
    return CountingTrainer


TOKEN_KEYS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")  # DPO/KTO; ORPO


def build_trainer(cfg: Config, model, ref_model, tokenizer, train_records, common_args: dict, peft_config, callbacks):
    """The TRL trainer for --algorithm, on the same conversational/plain prompt/chosen/rejected dataset."""
    from datasets import Dataset

    train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_records])
    if cfg.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common_args, beta=cfg.beta, loss_type=cfg.loss_type, max_length=cfg.max_length,
                         precompute_ref_log_probs=cfg.precompute_ref_log_probs)
        return counting_tokens(DPOTrainer)(model=model, ref_model=ref_model, args=args, train_dataset=train,
                                           processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if cfg.algorithm == "kto":
        from trl import KTOConfig, KTOTrainer

        loss_type = cfg.loss_type[0] if cfg.loss_type != ["sigmoid"] else "kto"
        args = KTOConfig(**common_args, beta=cfg.beta, loss_type=loss_type, max_length=cfg.max_length,
                         precompute_ref_log_probs=cfg.precompute_ref_log_probs)
        return counting_tokens(KTOTrainer)(model=model, ref_model=ref_model, args=args, train_dataset=train,
                                           processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**common_args, beta=cfg.beta, max_length=cfg.max_length)
    return counting_tokens(ORPOTrainer)(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                        peft_config=peft_config, callbacks=callbacks)


def main(cfg: Config) -> dict:
    import datasets
    from peft import LoraConfig

    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # ---- validate everything that needs no model -------------------------------------------------
    if cfg.algorithm not in ALGORITHMS:
        raise checks.CheckFailed(f"--algorithm {cfg.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if cfg.method not in ("lora", "full"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or full")
    if cfg.algorithm == "orpo" and cfg.precompute_ref_log_probs:
        raise checks.CheckFailed("--precompute_ref_log_probs with --algorithm orpo: ORPO has no reference model; "
                                 "drop the flag")
    checks.check_world_size(1)
    device = checks.resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    bf16 = precision == "bf16"
    check_format_option(cfg.dataset_format, ("preference",))
    train_records = load_preference(cfg.dataset_path)
    train_records, eval_records = (split_eval(train_records, cfg.eval_split, cfg.seed) if cfg.eval_split
                                   else (train_records, load_preference(cfg.eval_dataset_path)))
    for name in version_drift():
        log.warning("version drift from requirements.txt: %s", name)

    # ---- tokenizer; every pair must fit max_length (TRL would cut the EOS off) --------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_control_tokens(train_records + eval_records, "preference", tokenizer, source=model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by position here; pad == EOS is harmless
    too_long = [f"{r['where']} ({len(p) + max(len(c), len(j))} tokens)"
                for r, (p, c, j) in zip(train_records + eval_records, tokenize_pairs(tokenizer, train_records + eval_records))
                if len(p) + max(len(c), len(j)) > cfg.max_length]
    if too_long:
        raise checks.CheckFailed(f"{len(too_long)} pairs are longer than --max_length {cfg.max_length}: "
                                 f"{', '.join(too_long[:5])}. Raise --max_length or shorten them")
    eval_pairs = tokenize_pairs(tokenizer, eval_records)
    resume_from = prepare_output_dir(output_dir, asdict(cfg), cfg.resume)
    datasets_used = [cfg.dataset_path] + ([] if cfg.eval_split else [cfg.eval_dataset_path])
    write_manifest(output_dir, cfg, datasets_used, started, "running")

    # ---- model (fp32 weights; bf16 is autocast) and, for full DPO/KTO, the reference copy ---------
    memory = PeakMemory(device)
    attn = pick_attn_implementation(cfg.attn_implementation, device)
    model = load_base_model(model_path, device, "fp32", False, attn)
    needs_ref_copy = cfg.method == "full" and cfg.algorithm != "orpo" and not cfg.precompute_ref_log_probs
    ref_model = load_base_model(model_path, device, "fp32", False, attn).requires_grad_(False).eval() if needs_ref_copy else None
    if cfg.method == "lora":
        targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
    else:
        peft_config = None
    reference_held = ("adapter disabled (no copy)" if cfg.method == "lora" and cfg.algorithm != "orpo" else
                      "none (ORPO is reference-free)" if cfg.algorithm == "orpo" else
                      "precomputed log-probs (no copy)" if cfg.precompute_ref_log_probs else "frozen full copy")
    log.info("reference policy: %s", reference_held)

    # ---- before: held-out log-probs of the starting model (= the reference), generations ----------
    before_file = output_dir / "before.json"
    probe = [r for r in eval_records if is_conversational(r)][:cfg.sample_generations]
    if resume_from and before_file.is_file():
        saved = json.loads(before_file.read_text())
        start_logps = {k: torch.tensor(v) for k, v in saved["logps"].items()}
        before_replies = saved["replies"]
    else:
        start_logps = completion_logps(model, eval_pairs, tokenizer.pad_token_id, bf16)
        before_replies = generate_replies(model, tokenizer, [r["prompt"] for r in probe], cfg.max_new_tokens) if probe else []
        write_json(before_file, {"logps": {k: v.tolist() for k, v in start_logps.items()}, "replies": before_replies})
    before = preference_figures(start_logps, start_logps, cfg.beta)

    # ---- trainer (TRL configs need use_cpu on CPU: they default to bf16=True) ---------------------
    common_args = dict(
        output_dir=str(output_dir), seed=cfg.seed, use_cpu=device.type == "cpu", bf16=bf16,
        fp16=precision == "fp16", per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=cfg.logging_steps, logging_first_step=True,
        report_to=cfg.report_to, save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=cfg.save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True)
    keep_tracking_in_run_dir(output_dir, cfg.report_to)  # tensorboard/mlflow/trackio files inside the run
    # figures of the segments before a resume travel in the checkpoints: metrics.json covers the whole run
    segments = RunSegments(resume_from, counters=("trained_tokens",))
    trainer = build_trainer(cfg, model, ref_model, tokenizer, train_records, common_args, peft_config,
                            [CheckpointValidator(segments=segments), NonFiniteGuard()])
    segments.bind(trainer)
    policy = trainer.model
    lora_modules = checks.check_lora_targets(policy, peft_config.target_modules if isinstance(peft_config.target_modules, str)
                                             else sorted(peft_config.target_modules)) if peft_config else 0
    trainable, total = checks.log_parameter_counts(policy)
    if cfg.method == "lora" and getattr(trainer, "ref_model", None) is not None:
        raise checks.CheckFailed("TRL built a separate reference model although the policy is LoRA; the adapter-"
                                 "disabled policy is the reference and needs no copy")

    # ---- train -----------------------------------------------------------------------------------
    with explain_disk_full(output_dir, trainer):
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    whole = segments.finish(train_result)  # every segment of the run, not only this process's

    # ---- after: held-out figures; the reference must not have moved ------------------------------
    end_logps = completion_logps(policy, eval_pairs, tokenizer.pad_token_id, bf16)
    after = preference_figures(end_logps, start_logps, cfg.beta)
    if cfg.method == "lora":
        with policy.disable_adapter():
            ref_now = completion_logps(policy, eval_pairs, tokenizer.pad_token_id, bf16)
    elif getattr(trainer, "ref_model", None) is not None:
        ref_now = completion_logps(trainer.accelerator.unwrap_model(trainer.ref_model), eval_pairs, tokenizer.pad_token_id, bf16)
    else:
        ref_now = None  # full + precomputed / ORPO: no reference left in memory to recheck
    ref_change = (max(float((ref_now[k] - start_logps[k]).abs().max()) for k in ("chosen", "rejected"))
                  if ref_now is not None else None)
    if ref_change is not None and ref_change > 1e-3:
        raise checks.CheckFailed(f"the reference policy moved during training (held-out log-probs changed by up to "
                                 f"{ref_change:.4f}); the DPO rewards are then measured against a moving target")
    after_replies = generate_replies(policy, tokenizer, [r["prompt"] for r in probe], cfg.max_new_tokens) if probe else []
    artifact = output_dir / ("adapter" if cfg.method == "lora" else "model")
    policy.save_pretrained(artifact)
    tokenizer.save_pretrained(artifact)
    if probe:
        print(f"\n=== held-out prompts: before -> after {cfg.algorithm} ===")
        for r, b, a in zip(probe, before_replies, after_replies):
            print(f"Q: {prompt_text(r)}\n  before: {b}\n  after:  {a}")
        write_json(output_dir / "generations.json", {"prompts": [prompt_text(r) for r in probe],
                                                     "before": before_replies, "after": after_replies})

    # ---- metrics, manifest, plot -----------------------------------------------------------------
    train_seconds = whole["train_seconds"]
    wall = time.time() - wall_start
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    trained_tokens = whole["trained_tokens"]
    world = trainer.args.world_size
    metrics = {
        "recipe": RECIPE, "algorithm": cfg.algorithm, "method": cfg.method, "model": model_path,
        "device": device_name(device), "device_type": device.type, "world_size": world, "precision": precision,
        "beta": cfg.beta, "loss_type": cfg.loss_type if cfg.algorithm != "orpo" else None,
        "reference": reference_held, "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
        "final_train_loss": train_losses[-1] if train_losses else None, "mean_train_loss": whole["mean_train_loss"],
        **{f"heldout_{k}_before": v for k, v in before.items()}, **{f"heldout_{k}_after": v for k, v in after.items()},
        "heldout_pairs": len(eval_pairs), "train_pairs": len(train_records),
        "reference_logps_max_abs_change": ref_change,
        "optimizer_steps": trainer.state.global_step, "trained_tokens": trained_tokens,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(trained_tokens / train_seconds, 2),
        "trainable_params": trainable, "total_params": total, "lora_modules": lora_modules,
        "effective_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
        "segments": whole["segments"], "segments_complete": whole["segments_complete"],
        "train_log": [{k: v for k, v in h.items() if k in ("step", "loss", "rewards/accuracies", "rewards/margins", "kl")}
                      for h in history if "loss" in h],
        **memory.report(), **estimated_cost(wall, cfg.hourly_price_usd, world),
    }
    plot_loss(history, output_dir / "loss.png", f"{cfg.algorithm} ({cfg.method}) on {Path(model_path).name}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, datasets_used, started, "finished", {"resumed_from": str(resume_from) if resume_from else None})
    log.info("done: %s", json.dumps({k: metrics[k] for k in ("heldout_reward_accuracy_before", "heldout_reward_accuracy_after",
                                                              "heldout_reward_margin_after", "heldout_logp_accuracy_before",
                                                              "heldout_logp_accuracy_after", "reference_logps_max_abs_change",
                                                              "wall_seconds", "peak_memory_bytes")}))
    return metrics


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config)
    except (checks.CheckFailed, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
