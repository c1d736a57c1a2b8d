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

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
from transformers import AutoTokenizer, TrainingArguments  # noqa: E402
from trl import DPOConfig  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.data import check_control_tokens, check_format_option, split_eval  # noqa: E402
from common.evaluation import generate_replies  # noqa: E402
from common.lora_fast import speed_up_lora  # noqa: E402
from common.models import LoraOptions, load_base_model, pick_attn_implementation  # noqa: E402
from common.preference import (completion_logps, is_conversational, load_preference, preference_figures,  # noqa: E402
                               prompt_text, tokenize_pairs)
from common.run import Run, RunOptions, run_recipe  # noqa: E402
from common.run_files import write_json  # noqa: E402
from common.trainer import counting_tokens  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"
ALGORITHMS = ("dpo", "orpo", "kto")


@dataclass
class Config(RunOptions, LoraOptions):
    dataset_path: str = field(default="data/preference/train.jsonl", metadata={"help": "preference pairs (prompt/chosen/rejected, plain or conversational)"})
    eval_dataset_path: str = field(default="data/preference/heldout.jsonl", metadata={"help": "held-out pairs: reward accuracy and margins before and after"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | preference: the files must hold preference pairs (prompt/chosen/rejected); a record of another format is refused with its file:line"})
    eval_split: float = field(default=0.0, metadata={"help": "0 < x < 1: hold out this fraction of the training pairs (seeded by --seed) as the held-out set instead of --eval_dataset_path; 0 = no split"})
    algorithm: str = field(default="dpo", metadata={"help": "dpo | orpo (no reference model) | kto (pairs are split into desirable/undesirable examples); beta, loss_type, max_length and precompute_ref_log_probs apply to each"})
    method: str = field(default="lora", metadata={"help": "lora (reference = adapter disabled, no copy) | full (reference = a frozen copy, or precomputed)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})
    sample_generations: int = field(default=4, metadata={"help": "held-out prompts answered (greedy) before and after; 0 = none"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length for those prompts"})


def validate(cfg: Config, args: DPOConfig) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.algorithm not in ALGORITHMS:
        raise checks.CheckFailed(f"--algorithm {cfg.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if cfg.method not in ("lora", "full"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or full")
    if cfg.algorithm == "orpo" and args.precompute_ref_log_probs:
        raise checks.CheckFailed("--precompute_ref_log_probs with --algorithm orpo: ORPO has no reference model; "
                                 "drop the flag")
    checks.check_world_size(1)
    check_format_option(cfg.dataset_format, ("preference",))


def build_trainer(cfg: Config, args: DPOConfig, model, ref_model, tokenizer, train_records, peft_config, callbacks):
    """The TRL trainer for --algorithm on the same prompt/chosen/rejected data; KTO and ORPO get their own
    config built from the same TrainingArguments fields."""
    from datasets import Dataset

    train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_records])
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    if cfg.algorithm == "dpo":
        from trl import DPOTrainer

        return counting_tokens(DPOTrainer)(model=model, ref_model=ref_model, args=args, train_dataset=train,
                                           processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if cfg.algorithm == "kto":
        from trl import KTOConfig, KTOTrainer

        loss_type = args.loss_type[0] if list(args.loss_type) != ["sigmoid"] else "kto"
        shared.pop("train_sampling_strategy")  # KTO pairs desirable/undesirable neighbours: its own "sequential"
        kto = KTOConfig(**shared, beta=args.beta, loss_type=loss_type, max_length=args.max_length,
                        precompute_ref_log_probs=args.precompute_ref_log_probs)
        return counting_tokens(KTOTrainer)(model=model, ref_model=ref_model, args=kto, train_dataset=train,
                                           processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    orpo = ORPOConfig(**shared, beta=args.beta, max_length=args.max_length)
    return counting_tokens(ORPOTrainer)(model=model, args=orpo, train_dataset=train, processing_class=tokenizer,
                                        peft_config=peft_config, callbacks=callbacks)


def main(cfg: Config, args: DPOConfig) -> dict:
    run = Run(RECIPE, cfg, args, datasets=[cfg.dataset_path] + ([] if cfg.eval_split else [cfg.eval_dataset_path]))
    validate(cfg, args)
    bf16 = run.precision == "bf16"
    train_records = load_preference(cfg.dataset_path)
    train_records, eval_records = (split_eval(train_records, cfg.eval_split, args.seed) if cfg.eval_split
                                   else (train_records, load_preference(cfg.eval_dataset_path)))

    # ---- tokenizer; every pair must fit max_length (TRL would cut the EOS off) --------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_control_tokens(train_records + eval_records, "preference", tokenizer, source=model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by position here; pad == EOS is harmless
    too_long = [f"{r['where']} ({len(p) + max(len(c), len(j))} tokens)"
                for r, (p, c, j) in zip(train_records + eval_records, tokenize_pairs(tokenizer, train_records + eval_records))
                if len(p) + max(len(c), len(j)) > args.max_length]
    if too_long:
        raise checks.CheckFailed(f"{len(too_long)} pairs are longer than --max_length {args.max_length}: "
                                 f"{', '.join(too_long[:5])}. Raise --max_length or shorten them")
    eval_pairs = tokenize_pairs(tokenizer, eval_records)
    resume_from = run.open()
    run.started()

    # ---- model (fp32 weights; bf16 is autocast) and, for full DPO/KTO, the reference copy ---------
    run.measure_memory()
    attn = pick_attn_implementation(cfg.attn_implementation, run.device)
    model = load_base_model(model_path, run.device, "fp32", False, attn)
    needs_ref_copy = cfg.method == "full" and cfg.algorithm != "orpo" and not args.precompute_ref_log_probs
    ref_model = (load_base_model(model_path, run.device, "fp32", False, attn).requires_grad_(False).eval()
                 if needs_ref_copy else None)
    peft_config = cfg.lora_config() if cfg.method == "lora" else None
    reference_held = ("adapter disabled (no copy)" if cfg.method == "lora" and cfg.algorithm != "orpo" else
                      "none (ORPO is reference-free)" if cfg.algorithm == "orpo" else
                      "precomputed log-probs (no copy)" if args.precompute_ref_log_probs else "frozen full copy")
    run.log.info("reference policy: %s", reference_held)

    # ---- before: held-out log-probs of the starting model (= the reference), generations ----------
    before_file = run.output_dir / "before.json"
    probe = [r for r in eval_records if is_conversational(r)][:cfg.sample_generations]
    if resume_from and before_file.is_file():
        saved = json.loads(before_file.read_text())
        start_logps = {k: torch.tensor(v) for k, v in saved["logps"].items()}
        before_replies = saved["replies"]
    else:
        start_logps = completion_logps(model, eval_pairs, tokenizer.pad_token_id, bf16)
        before_replies = generate_replies(model, tokenizer, [r["prompt"] for r in probe], cfg.max_new_tokens) if probe else []
        write_json(before_file, {"logps": {k: v.tolist() for k, v in start_logps.items()}, "replies": before_replies})
    before = preference_figures(start_logps, start_logps, args.beta)

    # ---- trainer -----------------------------------------------------------------------------------
    args = run.library_args(args, dataloader_num_workers=0, disable_tqdm=True)
    trainer = build_trainer(cfg, args, model, ref_model, tokenizer, train_records, peft_config,
                            run.callbacks(counters=("trained_tokens",)))
    run.bind(trainer)
    policy = trainer.model
    if peft_config:
        speed_up_lora(policy)  # TRL attached peft's LoRA; same maths, fewer passes (common/lora_fast.py)
    lora_modules = checks.check_lora_targets(policy, cfg.lora_targets) if peft_config else 0
    checks.log_parameter_counts(policy)
    if cfg.method == "lora" and getattr(trainer, "ref_model", None) is not None:
        raise checks.CheckFailed("TRL built a separate reference model although the policy is LoRA; the adapter-"
                                 "disabled policy is the reference and needs no copy")

    # ---- train -----------------------------------------------------------------------------------
    whole = run.train(trainer)

    # ---- after: held-out figures; the reference must not have moved ------------------------------
    end_logps = completion_logps(policy, eval_pairs, tokenizer.pad_token_id, bf16)
    after = preference_figures(end_logps, start_logps, args.beta)
    if cfg.method == "lora":
        with policy.disable_adapter():
            ref_now = completion_logps(policy, eval_pairs, tokenizer.pad_token_id, bf16)
    elif getattr(trainer, "ref_model", None) is not None:
        ref_now = completion_logps(trainer.accelerator.unwrap_model(trainer.ref_model), eval_pairs,
                                   tokenizer.pad_token_id, bf16)
    else:
        ref_now = None  # full + precomputed / ORPO: no reference left in memory to recheck
    ref_change = (max(float((ref_now[k] - start_logps[k]).abs().max()) for k in ("chosen", "rejected"))
                  if ref_now is not None else None)
    if ref_change is not None and ref_change > 1e-3:
        raise checks.CheckFailed(f"the reference policy moved during training (held-out log-probs changed by up to "
                                 f"{ref_change:.4f}); the DPO rewards are then measured against a moving target")
    after_replies = generate_replies(policy, tokenizer, [r["prompt"] for r in probe], cfg.max_new_tokens) if probe else []
    artifact = run.output_dir / ("adapter" if cfg.method == "lora" else "model")
    policy.save_pretrained(artifact)
    tokenizer.save_pretrained(artifact)
    if probe:
        print(f"\n=== held-out prompts: before -> after {cfg.algorithm} ===")
        for r, b, a in zip(probe, before_replies, after_replies):
            print(f"Q: {prompt_text(r)}\n  before: {b}\n  after:  {a}")
        write_json(run.output_dir / "generations.json", {"prompts": [prompt_text(r) for r in probe],
                                                         "before": before_replies, "after": after_replies})

    history = trainer.state.log_history
    return run.finish(trainer, whole, {
        "algorithm": cfg.algorithm, "method": cfg.method, "model": model_path,
        "beta": args.beta, "loss_type": list(args.loss_type) if cfg.algorithm != "orpo" else None,
        "reference": reference_held, "precompute_ref_log_probs": args.precompute_ref_log_probs,
        **{f"heldout_{k}_before": v for k, v in before.items()}, **{f"heldout_{k}_after": v for k, v in after.items()},
        "heldout_pairs": len(eval_pairs), "train_pairs": len(train_records),
        "reference_logps_max_abs_change": ref_change, "lora_modules": lora_modules,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "train_log": [{k: v for k, v in h.items() if k in ("step", "loss", "rewards/accuracies", "rewards/margins", "kl")}
                      for h in history if "loss" in h],
    }, f"{cfg.algorithm} ({cfg.method}) on {Path(model_path).name}", headline=(
        "heldout_reward_accuracy_before", "heldout_reward_accuracy_after", "heldout_reward_margin_after",
        "heldout_logp_accuracy_before", "heldout_logp_accuracy_after", "reference_logps_max_abs_change",
        "wall_seconds", "peak_memory_bytes"))


CONFIGS = (Config, DPOConfig)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
