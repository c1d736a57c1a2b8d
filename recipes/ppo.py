"""Online RL from a reward: PPO with TRL 1.12's PPOTrainer (policy, reference, reward and value models),
or GRPO (--algorithm grpo: no value model, a group of samples per prompt is the baseline).

What it is for: raise the score a reward model (recipes/reward_model.py) gives the policy's own answers,
while a KL penalty keeps it near the starting model. With LoRA (default) the reference is the policy
with its adapter disabled, so no second policy copy is held; the value model starts from the reward
model and trains LoRA adapters plus its score head (`--value_lora false`: every weight). GRPO can use
the reward model too, or a programmatic reward (`--reward concise`: finished answers of at most
--concise_target_words words score 1).

Logged every step (metrics.json "steps", loss.png): KL to the reference, mean reward of the rollouts,
mean response length (tokens up to and including EOS). Greedy answers to held-out prompts are
generated and scored at the start and at the end (generations.json). The reference and the reward
model are rechecked after training: their outputs on the start generations must not have moved.

PPOTrainer exists only in TRL <= 1.12 (trl.experimental.ppo; removed in 1.13): requirements.txt pins
trl==1.12.0. PPOTrainer builds its own Accelerator and ignores the config's bf16/fp16; this recipe sets
ACCELERATE_MIXED_PRECISION so --precision is honoured.

Run:
    bash launch/reward_model.sh && bash launch/ppo.sh
    bash launch/ppo.sh --algorithm grpo --reward concise --output_dir runs/grpo
    python recipes/ppo.py --config recipes/configs/ppo.yaml [--key value ...]

Measured here (SmolLM2-135M-Instruct, data/preference prompts, 2-core CPU): see "Preference alignment"
in docs/alignment.md; the figures are in runs/ppo/metrics.json.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import NonFiniteGuard, RunError, prepare_output_dir  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.data import DataError, check_control_tokens, check_format_option  # noqa: E402
from common.models import LoraOptions, resolve_precision  # noqa: E402
from common.preference import load_preference, load_reward_model, prompt_ids, prompt_text, use_distinct_pad_token  # noqa: E402
from common.rl import (FROZEN_TOLERANCE, Scorer, held_out, import_ppo, plot_steps, reference_tolerance,  # noqa: E402
                       sequence_logps, value_model_from)
from common.run_files import (PeakMemory, device_name, estimated_cost, now, version_drift, write_json,  # noqa: E402
                              write_manifest)
from common.trainer import keep_tracking_in_run_dir  # noqa: E402

RECIPE = Path(__file__).stem  # the name follows the file: a copy writes runs/<its name> and "recipe": "<its name>"
log = logging.getLogger(RECIPE)


@dataclass
class Config(LoraOptions):
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "the policy: hub id, local dir, or asset:tiny / asset:smollm2"})
    reward_model_path: str | None = field(default="runs/reward_model/adapter", metadata={"help": "reward model from recipes/reward_model.py (its adapter/ or model/ folder); must share the policy's tokenizer"})
    reward: str = field(default="model", metadata={"help": "model (the reward model) | concise (programmatic, GRPO only)"})
    algorithm: str = field(default="ppo", metadata={"help": "ppo (value model, GAE) | grpo (group baseline, no value model)"})
    method: str = field(default="lora", metadata={"help": "lora (reference = adapter disabled, no copy) | full (TRL holds a frozen policy copy)"})
    dataset_path: str = field(default="data/preference/train.jsonl", metadata={"help": "prompts: the `prompt` of each preference record (chosen/rejected are not used)"})
    eval_dataset_path: str = field(default="data/preference/heldout.jsonl", metadata={"help": "held-out prompts answered and scored at the start and the end"})
    dataset_format: str = field(default="auto", metadata={"help": "auto | preference: the files must hold preference pairs (prompt/chosen/rejected); a record of another format is refused with its file:line"})
    output_dir: str = field(default=f"runs/{RECIPE}", metadata={"help": "run directory (metrics.json, manifest.json, loss.png, generations.json, adapter/)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (weights stay fp32; bf16/fp16 are autocast)"})
    max_prompt_length: int = field(default=128, metadata={"help": "longest prompt in tokens; a longer one is an error"})
    response_length: int = field(default=64, metadata={"help": "new tokens sampled per rollout (and for the held-out answers)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the rollouts"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "PPO: prompts per micro-batch; GRPO: completions per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "PPO: rollout batch = batch x accumulation"})
    num_mini_batches: int = field(default=4, metadata={"help": "PPO: mini-batches per rollout batch (optimizer steps per PPO epoch)"})
    ppo_epochs: int = field(default=2, metadata={"help": "PPO: optimisation epochs over each rollout batch; GRPO: num_iterations"})
    num_generations: int = field(default=4, metadata={"help": "GRPO: completions sampled per prompt (the group)"})
    max_steps: int = field(default=12, metadata={"help": "updates (rollout batches)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "learning rate (policy LoRA and value model)"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name (PPO steps it once per rollout batch)"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty to the reference (PPO kl_coef, GRPO beta)"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO/GRPO ratio clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO value-loss weight"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of an answer that never emits EOS (0 = off)"})
    value_lora: bool = field(default=True, metadata={"help": "PPO: the value model trains LoRA adapters + its score head (false: every weight)"})
    concise_target_words: int = field(default=20, metadata={"help": "--reward concise: answers up to this many words score 1, longer ones less"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (TRL's default is true)"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    hourly_price_usd: float = field(default=1.41, metadata={"help": "price per device-hour for the cost estimate"})


def main(cfg: Config) -> dict:
    import datasets
    from datasets import Dataset

    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # ---- validate everything that needs no model -------------------------------------------------
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
    if cfg.algorithm == "grpo" and cfg.per_device_train_batch_size % cfg.num_generations:
        raise checks.CheckFailed(f"--per_device_train_batch_size {cfg.per_device_train_batch_size} must be a multiple "
                                 f"of --num_generations {cfg.num_generations} (whole groups per step)")
    checks.check_world_size(1)
    device = checks.resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    bf16 = precision == "bf16"
    check_format_option(cfg.dataset_format, ("preference",))
    train_records = load_preference(cfg.dataset_path)
    eval_records = load_preference(cfg.eval_dataset_path)
    for name in version_drift():
        log.warning("version drift from requirements.txt: %s", name)
    prepare_output_dir(output_dir, asdict(cfg), resume=False)  # online RL runs here are minutes: no resume
    datasets_used = [cfg.dataset_path, cfg.eval_dataset_path]
    write_manifest(output_dir, cfg, datasets_used, started, "running")

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

    # ---- models: policy (fp32; bf16 is autocast), reward, value ---------------------------------
    memory = PeakMemory(device)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, device_map={"": str(device)})
    use_distinct_pad_token(tokenizer, policy)
    reward_model = None
    if cfg.reward == "model":
        reward_model, reward_tokenizer = load_reward_model(cfg.reward_model_path, device=device)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise checks.CheckFailed(f"the reward model at {cfg.reward_model_path} uses a different tokenizer than the "
                                     "policy; TRL's PPO feeds it the policy's token ids. Train the reward model from "
                                     "the policy's base (recipes/reward_model.py --model_name_or_path ...)")
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    scorer = Scorer(cfg, tokenizer, reward_model, bf16)
    peft_config = cfg.lora_config() if cfg.method == "lora" else None

    # ---- start: held-out answers and their scores -------------------------------------------------
    start = held_out(policy, tokenizer, scorer, eval_prompts, cfg)
    log.info("held-out at the start: mean reward %.3f, mean length %.1f tokens, %.0f%% finished", start["mean_score"],
             start["mean_length"], 100 * start["finished"])
    ref_logps_start = sequence_logps(policy, eval_prompts, start["responses"], precision)
    ref_tolerance = reference_tolerance(sequence_logps(policy, eval_prompts, start["responses"]), ref_logps_start)

    # ---- trainer ----------------------------------------------------------------------------------
    os.environ["ACCELERATE_MIXED_PRECISION"] = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    common_args = dict(output_dir=str(output_dir), seed=cfg.seed, use_cpu=device.type == "cpu", bf16=bf16,
                       fp16=precision == "fp16", per_device_train_batch_size=cfg.per_device_train_batch_size,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
                       max_steps=cfg.max_steps, gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1,
                       save_strategy="no", report_to=cfg.report_to, disable_tqdm=True,
                       lr_scheduler_type=cfg.lr_scheduler_type)
    keep_tracking_in_run_dir(output_dir, cfg.report_to)  # tensorboard/mlflow/trackio files inside the run
    train_ds = Dataset.from_list([{"input_ids": p} for p in train_prompts])
    eval_ds = Dataset.from_list([{"input_ids": p} for p in eval_prompts])
    if cfg.algorithm == "ppo":
        PPOConfig, PPOTrainer = import_ppo()
        value_model = value_model_from(cfg.reward_model_path, cfg, tokenizer.pad_token_id).to(device)
        rollout = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        args = PPOConfig(**common_args, total_episodes=cfg.max_steps * rollout, num_ppo_epochs=cfg.ppo_epochs,
                         num_mini_batches=cfg.num_mini_batches, response_length=cfg.response_length,
                         temperature=cfg.temperature, stop_token="eos", kl_coef=cfg.kl_coef, cliprange=cfg.cliprange,
                         vf_coef=cfg.vf_coef, missing_eos_penalty=cfg.missing_eos_penalty or None,
                         local_rollout_forward_batch_size=rollout, num_sample_generations=0)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward_model, train_dataset=train_ds, value_model=value_model,
                             eval_dataset=eval_ds, peft_config=peft_config)
        policy_model = trainer.accelerator.unwrap_model(trainer.model).policy
        value_trainable = checks.count_parameters(value_model)[0]
        ref_model = trainer.ref_model
    else:
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common_args, num_generations=cfg.num_generations, max_completion_length=cfg.response_length,
                          temperature=cfg.temperature, beta=cfg.kl_coef, num_iterations=cfg.ppo_epochs,
                          epsilon=cfg.cliprange, log_completions=False)
        grpo_train = Dataset.from_list([{"prompt": r["prompt"]} for r in train_records])
        trainer = GRPOTrainer(model=policy, reward_funcs=[scorer.grpo_reward()], args=args, train_dataset=grpo_train,
                              processing_class=tokenizer, peft_config=peft_config)
        policy_model = trainer.model
        value_trainable, ref_model = 0, getattr(trainer, "ref_model", None)
    if cfg.method == "lora" and ref_model is not None:
        raise checks.CheckFailed("TRL built a separate reference model although the policy is LoRA")
    lora_modules = checks.check_lora_targets(policy_model, cfg.lora_targets) if peft_config else 0
    trainable, total = checks.log_parameter_counts(policy_model)
    log.info("reference: %s; value model: %s", "adapter disabled (no copy)" if cfg.method == "lora" else "frozen copy",
             "none (GRPO)" if cfg.algorithm == "grpo" else f"{value_trainable:,} trainable parameters")

    # ---- train ------------------------------------------------------------------------------------
    train_start = time.time()
    trainer.add_callback(NonFiniteGuard())  # a non-finite loss / grad norm stops the run, exit 1
    trainer.train()
    train_seconds = time.time() - train_start

    # ---- end: held-out answers; reference and reward model must not have moved -------------------
    # saved before any check below: a failed check must not cost the trained weights
    artifact = output_dir / ("adapter" if cfg.method == "lora" else "model")
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
        write_manifest(output_dir, cfg, datasets_used, started, "failed", {"failed_check": message})
        raise checks.CheckFailed(message)
    print(f"\n=== held-out prompts: start -> end of {cfg.algorithm} (reward) ===")
    for i, r in enumerate(eval_records[:6]):
        print(f"Q: {prompt_text(r)}\n  start ({start['scores'][i]:+.2f}): {start['texts'][i]}\n"
              f"  end   ({end['scores'][i]:+.2f}): {end['texts'][i]}")
    write_json(output_dir / "generations.json", {
        "prompts": [prompt_text(r) for r in eval_records],
        **{when: [{"response": t, "reward": s, "tokens": len(ids)}
                  for t, s, ids in zip(run["texts"], run["scores"], run["responses"])]
           for when, run in (("start", start), ("end", end))}})

    # ---- per-step log, metrics, manifest, plot ---------------------------------------------------
    keys = ({"kl": "objective/kl", "mean_reward": "objective/scores", "response_length": "objective/response_length",
             "policy_loss": "loss/policy_avg", "value_loss": "loss/value_avg", "entropy": "objective/entropy"}
            if cfg.algorithm == "ppo" else
            {"kl": "kl", "mean_reward": "reward", "response_length": "completions/mean_length", "policy_loss": "loss",
             "entropy": "entropy", "frac_reward_zero_std": "frac_reward_zero_std"})
    steps = [{"step": h["step"], **{k: h.get(v) for k, v in keys.items()}}
             for h in trainer.state.log_history if keys["mean_reward"] in h]
    no_signal = cfg.algorithm == "grpo" and bool(steps) and all(s["frac_reward_zero_std"] == 1.0 for s in steps)
    if no_signal:
        log.warning("GRPO had no learning signal: in every group all %d completions got the same reward, so every "
                    "advantage was 0 and nothing trained (e.g. no answer finished within --response_length and all "
                    "got the missing-EOS score). Raise --response_length or use a reward that separates them",
                    cfg.num_generations)
    k = max(1, min(4, len(steps) // 4))
    first, last = steps[:k], steps[-k:]
    if cfg.algorithm == "ppo":  # prompt + response tokens (to EOS) of every rollout, once per PPO epoch
        trained_tokens = trainer.rollout_tokens * cfg.ppo_epochs
    else:
        trained_tokens = int(trainer.state.num_input_tokens_seen)
    wall = time.time() - wall_start
    metrics = {
        "recipe": RECIPE, "algorithm": cfg.algorithm, "reward": cfg.reward, "method": cfg.method, "model": model_path,
        "reward_model": cfg.reward_model_path if cfg.reward == "model" else None,
        "device": device_name(device), "device_type": device.type, "world_size": trainer.accelerator.num_processes,
        "precision": precision, "mixed_precision": trainer.accelerator.mixed_precision,
        "grpo_no_learning_signal": no_signal, "pad_token": tokenizer.pad_token, "pad_token_changed": pad_note,
        "steps": steps, "updates": trainer.state.global_step,
        "optimizer_steps": trainer.state.global_step * (cfg.ppo_epochs * cfg.num_mini_batches if cfg.algorithm == "ppo" else 1),
        "train_mean_reward_first_steps": sum(s["mean_reward"] for s in first) / k,
        "train_mean_reward_last_steps": sum(s["mean_reward"] for s in last) / k, "steps_averaged": k,
        "train_kl_last_steps": sum((s["kl"] or 0.0) for s in last) / k,
        "train_response_length_first_steps": sum(s["response_length"] for s in first) / k,
        "train_response_length_last_steps": sum(s["response_length"] for s in last) / k,
        "final_train_loss": steps[-1]["policy_loss"] if steps else None,
        "heldout_mean_reward_start": start["mean_score"], "heldout_mean_reward_end": end["mean_score"],
        "heldout_mean_length_start": start["mean_length"], "heldout_mean_length_end": end["mean_length"],
        "heldout_finished_start": start["finished"], "heldout_finished_end": end["finished"],
        "heldout_prompts": len(eval_prompts), "reference_logps_max_abs_change": ref_change,
        "reference_logps_tolerance": ref_tolerance,
        "reward_max_abs_change": rm_change, "trained_tokens": trained_tokens,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(trained_tokens / train_seconds, 2),
        "trainable_params": trainable, "value_trainable_params": value_trainable, "total_params": total,
        "lora_modules": lora_modules, **memory.report(),
        **estimated_cost(wall, cfg.hourly_price_usd, trainer.accelerator.num_processes),
    }
    plot_steps(steps, output_dir / "loss.png", f"{cfg.algorithm} ({cfg.method}, reward: {cfg.reward}) on {Path(model_path).name}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, datasets_used, started, "finished")
    log.info("done: %s", json.dumps({k: metrics[k] for k in ("train_mean_reward_first_steps", "train_mean_reward_last_steps",
                                                              "heldout_mean_reward_start", "heldout_mean_reward_end",
                                                              "heldout_mean_length_start", "heldout_mean_length_end",
                                                              "wall_seconds", "peak_memory_bytes")}))
    return metrics


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config)
    except (checks.CheckFailed, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
