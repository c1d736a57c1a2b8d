"""Online RL from a reward: PPO with TRL 1.12's PPOTrainer (policy, reference, reward and value models),
or GRPO (--algorithm grpo: no value model, a group of samples per prompt is the baseline).

What it is for: raise the score a reward model (recipes/reward_model.py) gives the policy's own answers,
while a KL penalty keeps it near the starting model. With LoRA (default) the reference is the policy
with its adapter disabled, so no second policy copy is held; the value model starts from the reward
model and trains LoRA adapters plus its score head (`--value_lora false`: every weight). GRPO can use
the reward model too, or a programmatic reward (`--reward concise`: finished answers of at most
--concise_target_words words score 1). The options below are this scenario's; the trainer's (batch size,
learning rate, steps, ...) are TrainingArguments', from which both TRL configs are built.

Logged every step (metrics.json "steps", loss.png): KL to the reference, mean reward of the rollouts,
mean response length (tokens up to and including EOS). Greedy answers to held-out prompts are
generated and scored at the start and at the end (generations.json). The reference and the reward
model are rechecked after training: their outputs on the start generations must not have moved.

PPOTrainer exists only in TRL <= 1.12 (trl.experimental.ppo; removed in 1.13): requirements.txt pins
trl==1.12.0. PPOTrainer builds its own Accelerator and ignores the config's bf16/fp16; this recipe sets
ACCELERATE_MIXED_PRECISION so --precision is honoured. Runs do not resume (TRL's PPO loop starts at step 0).

Run:
    bash launch/reward_model.sh && bash launch/ppo.sh
    bash launch/ppo.sh --algorithm grpo --reward concise --output_dir runs/grpo
    python recipes/ppo.py --config recipes/configs/ppo.yaml [--key value ...]

Measured here (SmolLM2-135M-Instruct, data/preference prompts, 2-core CPU): see "Preference alignment"
in docs/alignment.md; the figures are in runs/ppo/metrics.json.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.data import check_control_tokens, check_format_option  # noqa: E402
from common.lora_fast import speed_up_lora  # noqa: E402
from common.models import LoraOptions  # noqa: E402
from common.preference import load_preference, load_reward_model, prompt_ids, prompt_text, use_distinct_pad_token  # noqa: E402
from common.rl import (FROZEN_TOLERANCE, Scorer, held_out, import_ppo, plot_steps, reference_tolerance,  # noqa: E402
                       sequence_logps, step_log, step_summary, value_model_from)
from common.run import Run, RunOptions, run_recipe  # noqa: E402
from common.run_files import write_json, write_manifest  # noqa: E402

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"


@dataclass
class Config(RunOptions, LoraOptions):
    reward_model_path: str | None = field(default="runs/reward_model/adapter", metadata={"help": "reward model from recipes/reward_model.py (its adapter/ or model/ folder); must share the policy's tokenizer"})
    reward: str = field(default="model", metadata={"help": "model (the reward model) | concise (programmatic, GRPO only)"})
    algorithm: str = field(default="ppo", metadata={"help": "ppo (value model, GAE) | grpo (group baseline, no value model)"})
    method: str = field(default="lora", metadata={"help": "lora (reference = adapter disabled, no copy) | full (TRL holds a frozen policy copy)"})
    dataset_path: str = field(default="data/preference/train.jsonl", metadata={"help": "prompts: the `prompt` of each preference record (chosen/rejected are not used)"})
    eval_dataset_path: str = field(default="data/preference/heldout.jsonl", metadata={"help": "held-out prompts answered and scored at the start and the end"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | preference: the files must hold preference pairs (prompt/chosen/rejected); a record of another format is refused with its file:line"})
    max_prompt_length: int = field(default=128, metadata={"help": "longest prompt in tokens; a longer one is an error"})
    response_length: int = field(default=64, metadata={"help": "new tokens sampled per rollout (and for the held-out answers)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the rollouts"})
    num_mini_batches: int = field(default=4, metadata={"help": "PPO: mini-batches per rollout batch (optimizer steps per PPO epoch)"})
    ppo_epochs: int = field(default=2, metadata={"help": "PPO: optimisation epochs over each rollout batch; GRPO: num_iterations"})
    num_generations: int = field(default=4, metadata={"help": "GRPO: completions sampled per prompt (the group)"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty to the reference (PPO kl_coef, GRPO beta)"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO/GRPO ratio clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO value-loss weight"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of an answer that never emits EOS (0 = off)"})
    value_lora: bool = field(default=True, metadata={"help": "PPO: the value model trains LoRA adapters + its score head (false: every weight)"})
    concise_target_words: int = field(default=20, metadata={"help": "--reward concise: answers up to this many words score 1, longer ones less"})
    resume: bool = field(default=False, metadata={"help": "must stay false: PPO/GRPO runs do not resume (TRL's PPO loop starts at step 0)"})


def validate(cfg: Config, args: TrainingArguments) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.algorithm not in ("ppo", "grpo"):
        raise checks.CheckFailed(f"--algorithm {cfg.algorithm!r}: choose ppo or grpo")
    if cfg.method not in ("lora", "full"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or full")
    if cfg.reward not in ("model", "concise"):
        raise checks.CheckFailed(f"--reward {cfg.reward!r}: choose model or concise")
    if cfg.algorithm == "ppo" and cfg.reward != "model":
        raise checks.CheckFailed("TRL's PPOTrainer needs a reward *model* (a sequence classifier it runs on token "
                                 "ids); for a programmatic reward use --algorithm grpo")
    if cfg.reward == "model" and not cfg.reward_model_path:
        raise checks.CheckFailed("--reward model needs --reward_model_path (train one: bash launch/reward_model.sh)")
    if cfg.algorithm == "grpo" and args.per_device_train_batch_size % cfg.num_generations:
        raise checks.CheckFailed(f"--per_device_train_batch_size {args.per_device_train_batch_size} must be a multiple "
                                 f"of --num_generations {cfg.num_generations} (whole groups per step)")
    if cfg.resume:
        raise checks.CheckFailed("--resume true: PPO/GRPO runs do not resume (TRL's PPO loop starts at step 0); "
                                 "drop the flag and rerun into a new --output_dir")
    checks.check_world_size(1)
    check_format_option(cfg.dataset_format, ("preference",))


def build_trainer(cfg: Config, args: TrainingArguments, policy, tokenizer, reward_model, scorer, train_records,
                  train_prompts, eval_prompts, peft_config, callbacks):
    """TRL's PPOTrainer or GRPOTrainer, its config built from the same TrainingArguments fields plus this
    scenario's knobs under each algorithm's own names."""
    from datasets import Dataset

    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    if cfg.algorithm == "ppo":
        PPOConfig, PPOTrainer = import_ppo()
        rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps
        ppo = PPOConfig(**shared, total_episodes=args.max_steps * rollout, num_ppo_epochs=cfg.ppo_epochs,
                        num_mini_batches=cfg.num_mini_batches, response_length=cfg.response_length,
                        temperature=cfg.temperature, stop_token="eos", kl_coef=cfg.kl_coef, cliprange=cfg.cliprange,
                        vf_coef=cfg.vf_coef, missing_eos_penalty=cfg.missing_eos_penalty or None,
                        local_rollout_forward_batch_size=rollout, num_sample_generations=0)
        value_model = value_model_from(cfg.reward_model_path, cfg, tokenizer.pad_token_id).to(policy.device)
        return PPOTrainer(args=ppo, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
                          value_model=value_model, train_dataset=Dataset.from_list([{"input_ids": p} for p in train_prompts]),
                          eval_dataset=Dataset.from_list([{"input_ids": p} for p in eval_prompts]),
                          peft_config=peft_config, callbacks=callbacks)
    from trl import GRPOConfig, GRPOTrainer

    shared.pop("remove_unused_columns")  # GRPOConfig's own default (False): dataset columns reach the reward functions
    grpo = GRPOConfig(**shared, num_generations=cfg.num_generations, max_completion_length=cfg.response_length,
                      temperature=cfg.temperature, beta=cfg.kl_coef, num_iterations=cfg.ppo_epochs,
                      epsilon=cfg.cliprange, log_completions=False)
    return GRPOTrainer(model=policy, reward_funcs=[scorer.grpo_reward()], args=grpo, processing_class=tokenizer,
                       train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in train_records]),
                       peft_config=peft_config, callbacks=callbacks)


def main(cfg: Config, args: TrainingArguments) -> dict:
    run = Run(RECIPE, cfg, args, datasets=[cfg.dataset_path, cfg.eval_dataset_path])
    validate(cfg, args)
    precision = run.precision
    train_records = load_preference(cfg.dataset_path)
    eval_records = load_preference(cfg.eval_dataset_path)

    # ---- tokenizer (pad != EOS: TRL's PPO masks every pad-id token) and prompts ------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_control_tokens(train_records + eval_records, "preference", tokenizer, source=model_path)
    pad_note = use_distinct_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # prompts are left-padded for generation
    train_prompts = [prompt_ids(tokenizer, r["prompt"]) for r in train_records]
    eval_prompts = [prompt_ids(tokenizer, r["prompt"]) for r in eval_records]
    too_long = [r["where"] for r, p in zip(train_records + eval_records, train_prompts + eval_prompts)
                if len(p) > cfg.max_prompt_length]
    if too_long:
        raise checks.CheckFailed(f"{len(too_long)} prompts are longer than --max_prompt_length "
                                 f"{cfg.max_prompt_length}: {', '.join(too_long[:5])}")
    run.open()
    run.started()

    # ---- models: policy (fp32; bf16 is autocast), reward ------------------------------------------
    run.measure_memory()
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, device_map={"": str(run.device)})
    use_distinct_pad_token(tokenizer, policy)
    reward_model = None
    if cfg.reward == "model":
        reward_model, reward_tokenizer = load_reward_model(cfg.reward_model_path, device=run.device)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise checks.CheckFailed(f"the reward model at {cfg.reward_model_path} uses a different tokenizer than the "
                                     "policy; TRL's PPO feeds it the policy's token ids. Train the reward model from "
                                     "the policy's base (recipes/reward_model.py --model_name_or_path ...)")
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    scorer = Scorer(cfg, tokenizer, reward_model, precision == "bf16")
    peft_config = cfg.lora_config() if cfg.method == "lora" else None

    # ---- start: held-out answers and their scores -------------------------------------------------
    start = held_out(policy, tokenizer, scorer, eval_prompts, cfg)
    run.log.info("held-out at the start: mean reward %.3f, mean length %.1f tokens, %.0f%% finished",
                 start["mean_score"], start["mean_length"], 100 * start["finished"])
    ref_logps_start = sequence_logps(policy, eval_prompts, start["responses"], precision)
    ref_tolerance = reference_tolerance(sequence_logps(policy, eval_prompts, start["responses"]), ref_logps_start)

    # ---- trainer (PPOTrainer's own Accelerator reads the mixed precision from the environment) ----
    os.environ["ACCELERATE_MIXED_PRECISION"] = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    args = run.library_args(args, disable_tqdm=True)
    trainer = build_trainer(cfg, args, policy, tokenizer, reward_model, scorer, train_records, train_prompts,
                            eval_prompts, peft_config, run.callbacks(signals=False))  # no resume, so no save on SIGTERM
    run.bind(trainer)
    if cfg.algorithm == "ppo":
        policy_model = trainer.accelerator.unwrap_model(trainer.model).policy
        value_trainable, ref_model = checks.count_parameters(trainer.value_model)[0], trainer.ref_model
    else:
        policy_model, value_trainable, ref_model = trainer.model, 0, getattr(trainer, "ref_model", None)
    if cfg.method == "lora" and ref_model is not None:
        raise checks.CheckFailed("TRL built a separate reference model although the policy is LoRA")
    if peft_config:
        speed_up_lora(policy_model)  # TRL attached peft's LoRA; same maths, fewer passes (common/lora_fast.py)
    lora_modules = checks.check_lora_targets(policy_model, cfg.lora_targets) if peft_config else 0
    trainable, total = checks.log_parameter_counts(policy_model)
    run.log.info("reference: %s; value model: %s", "adapter disabled (no copy)" if cfg.method == "lora" else "frozen copy",
                 "none (GRPO)" if cfg.algorithm == "grpo" else f"{value_trainable:,} trainable parameters")

    # ---- train ------------------------------------------------------------------------------------
    whole = run.train(trainer)

    # ---- end: held-out answers; reference and reward model must not have moved -------------------
    # saved before any check below: a failed check must not cost the trained weights
    artifact = run.output_dir / ("adapter" if cfg.method == "lora" else "model")
    policy_model.save_pretrained(artifact)
    tokenizer.save_pretrained(artifact)
    end = held_out(policy_model, tokenizer, scorer, eval_prompts, cfg)
    if cfg.method == "lora":
        with policy_model.disable_adapter():
            ref_logps_end = sequence_logps(policy_model, eval_prompts, start["responses"], precision)
        ref_change = float((ref_logps_end - ref_logps_start).abs().max())
    else:
        ref_change = None
    rm_change = max(abs(a - b) for a, b in zip(scorer(eval_prompts, start["responses"]), start["scores"]))
    if (ref_change or 0) > ref_tolerance or rm_change > FROZEN_TOLERANCE:
        message = (f"a frozen model moved during training: reference log-prob change {ref_change} (tolerance "
                   f"{ref_tolerance:.4g} at {precision}), reward change {rm_change} (tolerance {FROZEN_TOLERANCE}). "
                   f"The trained {artifact.name} is saved in {artifact}, but its KL penalty was measured against a "
                   "moving reference: check that only the LoRA weights (and for PPO the value model) are trainable "
                   "and that nothing merged the adapter into the base, then rerun; --precision fp32 separates "
                   "rounding from real movement")
        write_manifest(run.output_dir, run.config, run.datasets, run.started_at, "failed", {"failed_check": message})
        raise checks.CheckFailed(message)
    print(f"\n=== held-out prompts: start -> end of {cfg.algorithm} (reward) ===")
    for i, r in enumerate(eval_records[:6]):
        print(f"Q: {prompt_text(r)}\n  start ({start['scores'][i]:+.2f}): {start['texts'][i]}\n"
              f"  end   ({end['scores'][i]:+.2f}): {end['texts'][i]}")
    write_json(run.output_dir / "generations.json", {
        "prompts": [prompt_text(r) for r in eval_records],
        **{when: [{"response": t, "reward": s, "tokens": len(ids)}
                  for t, s, ids in zip(side["texts"], side["scores"], side["responses"])]
           for when, side in (("start", start), ("end", end))}})

    # ---- per-step log, metrics, manifest, plot ---------------------------------------------------
    steps = step_log(trainer.state.log_history, cfg.algorithm)
    no_signal = cfg.algorithm == "grpo" and bool(steps) and all(s["frac_reward_zero_std"] == 1.0 for s in steps)
    if no_signal:
        run.log.warning("GRPO had no learning signal: in every group all %d completions got the same reward, so "
                        "every advantage was 0 and nothing trained (e.g. no answer finished within --response_length "
                        "and all got the missing-EOS score). Raise --response_length or use a reward that separates "
                        "them", cfg.num_generations)
    # PPO: prompt + response tokens (to EOS) of every rollout, once per PPO epoch
    trained_tokens = (trainer.rollout_tokens * cfg.ppo_epochs if cfg.algorithm == "ppo"
                      else int(trainer.state.num_input_tokens_seen))
    title = f"{cfg.algorithm} ({cfg.method}, reward: {cfg.reward}) on {Path(model_path).name}"
    metrics = run.finish(trainer, whole, {
        "algorithm": cfg.algorithm, "reward": cfg.reward, "method": cfg.method, "model": model_path,
        "reward_model": cfg.reward_model_path if cfg.reward == "model" else None,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "grpo_no_learning_signal": no_signal, "pad_token": tokenizer.pad_token, "pad_token_changed": pad_note,
        "steps": steps, "updates": trainer.state.global_step,
        "optimizer_steps": trainer.state.global_step * (cfg.ppo_epochs * cfg.num_mini_batches if cfg.algorithm == "ppo" else 1),
        **step_summary(steps), "final_train_loss": steps[-1]["policy_loss"] if steps else None,
        "heldout_mean_reward_start": start["mean_score"], "heldout_mean_reward_end": end["mean_score"],
        "heldout_mean_length_start": start["mean_length"], "heldout_mean_length_end": end["mean_length"],
        "heldout_finished_start": start["finished"], "heldout_finished_end": end["finished"],
        "heldout_prompts": len(eval_prompts), "reference_logps_max_abs_change": ref_change,
        "reference_logps_tolerance": ref_tolerance, "reward_max_abs_change": rm_change,
        "trained_tokens": trained_tokens, "tokens_per_second": round(trained_tokens / whole["train_seconds"], 2),
        "trainable_params": trainable, "value_trainable_params": value_trainable, "total_params": total,
        "lora_modules": lora_modules,
    }, title, headline=("train_mean_reward_first_steps", "train_mean_reward_last_steps", "heldout_mean_reward_start",
                        "heldout_mean_reward_end", "heldout_mean_length_start", "heldout_mean_length_end",
                        "wall_seconds", "peak_memory_bytes"))
    plot_steps(steps, run.output_dir / "loss.png", title)  # loss.png: reward, KL and length per update, not only the loss
    return metrics


CONFIGS = (Config, TrainingArguments)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
