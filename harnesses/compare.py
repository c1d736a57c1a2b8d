"""Comparison runs: train one configuration per process, measure it, and put the rows side by side.

Used by harnesses/adapter_vs_full.py (full fine-tuning vs LoRA vs bottleneck adapter vs QLoRA) and
harnesses/memory_ladder.py (one memory technique added per rung). Both are one script with two modes:

- driver (default): for each configuration, run `python <recipe> --config <output_dir>/runs/<name>/config.yaml
  --run_one <name>` as a child process (common.child: output in runs/<name>/log.txt, stopped after --timeout),
  read its metrics.json. A configuration that fails (a missing package, a check, a crash, the timeout)
  becomes a row with status "failed" and its error; the others still run. SIGTERM/SIGINT stop the
  running configuration and the driver (exit 75); the rerun reuses the finished ones. One process per configuration so peak memory is that configuration's alone: on CPU the
  process's VmHWM (it never goes down), on CUDA torch.cuda.max_memory_allocated.
- worker (`--run_one NAME`, `train_one` below): load, attach the method, check one batch, train with the
  HF Trainer (so the optimizers are the real ones: adamw_torch, adamw_bnb_8bit, adafactor, DeepSpeed),
  evaluate, write metrics.json.

What a row holds: trainable/total parameters; training seconds (Trainer's on_train_begin to on_train_end:
no model loading, no evaluation) and tokens/s (non-pad tokens trained / those seconds); peak memory read
right after training (loading, the gradient check and training included; the evaluation after it not);
train loss per step; held-out loss before (optional) and after; how many frozen and trainable tensors
changed; and the memory planner's prediction (common.memory) where it models the configuration.
A finished run whose spec and shared settings are unchanged is reused; delete runs/<name> to measure again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from common import checks, child
from common.run_files import PeakMemory, device_name, now, write_json, write_manifest

log = logging.getLogger(__name__)
METHODS = ("full", "lora", "qlora", "adapter")


@dataclass
class CompareConfig:
    """Options every comparison recipe has (each recipe's Config adds its own)."""

    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2 (built offline)"})
    dataset_path: str = field(default="data/persona/train.jsonl", metadata={"help": "SFT training data (chat, instruction or completion)"})
    eval_dataset_path: str | None = field(default="data/persona/heldout.jsonl", metadata={"help": "held-out data for the eval loss"})
    output_dir: str = field(default="runs/compare", metadata={"help": "table (JSON + markdown), loss.png, metrics.json, manifest.json, runs/<name>/"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer ones are truncated and reported"})
    max_steps: int = field(default=10, metadata={"help": "optimizer steps per configuration (the same for every row)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "micro-batch size"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warmup: steps (>= 1) or a ratio of all steps (< 1)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (lora, qlora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Linear layer names, or all-linear"})
    adapter_size: int = field(default=64, metadata={"help": "bottleneck adapter width (adapter method; harnesses/adapters.py)"})
    seed: int = field(default=42, metadata={"help": "random seed (same data order for every row)"})
    timeout: int = field(default=1800, metadata={"help": "seconds before a configuration's process is stopped and reported failed"})
    run_one: str | None = field(default=None, metadata={"help": "worker mode: train only this configuration in this process (the driver starts each one this way)"})


NOT_SHARED = ("output_dir", "timeout", "run_one")  # options that do not change what a run measures


@dataclass
class RunSpec:
    """One row: what differs between the configurations of a comparison."""

    name: str
    adds: str = ""                       # what this row changes (the table's first column)
    method: str = "full"                 # full | lora | qlora | adapter (bottleneck adapters)
    precision: str = "fp32"              # fp32 | bf16: the model is loaded in it (bf16: weights, gradients and
    #                                      optimizer states of a full fine-tune are bf16, as torchtune's dtype=bf16)
    batch: int = 8                       # micro-batch
    accumulation: int = 1
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"           # TrainingArguments.optim
    learning_rate: float = 1e-4
    zero_stage: int = 0                  # DeepSpeed ZeRO stage through the Trainer; 0 = none
    offload: str = "none"                # none | optimizer | optimizer+params (ZeRO-3)
    skip_on_cpu: str = ""                # reason to skip this row when there is no GPU
    lora_variant: dict = field(default_factory=dict)  # lora/qlora: LoraOptions variant fields (use_dora, use_rslora,
    #                                      lora_init, loraplus_lr_ratio)


# ---------------------------------------------------------------------------------------------
# Worker: one configuration in this process
# ---------------------------------------------------------------------------------------------
def _checksums(model) -> dict[str, float]:
    """A float64 sum per parameter tensor, in 1M-element chunks (no full-size copy raises the peak)."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            out[name] = float(sum(chunk.double().sum() for chunk in flat.split(1 << 20))) if flat.numel() else 0.0
    return out


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(stage: int, offload: str) -> dict:
    """A ZeRO config for the Trainer. With offload DeepSpeed steps its own CPU Adam (DeepSpeedCPUAdam) on the
    host copy of the fp32 master weights and optimizer states; the `optimizer` block asks for it."""
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}},
            "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "steps_per_print": 10**9, "wall_clock_breakdown": False}


def planner_prediction(model_path: str, cfg: CompareConfig, spec: RunSpec, seq_len: int, device: str) -> dict:
    """common.memory's predicted peak for this row, or the reason it has none."""
    from common import memory

    if spec.method == "adapter":
        return {"bytes": None, "note": "n/a: bottleneck adapters are not modelled"}
    if spec.optim not in memory.OPTIMIZERS:
        return {"bytes": None, "note": f"n/a: optimizer {spec.optim} is not modelled"}
    s = memory.Settings(method=spec.method, lora_r=cfg.lora_r, lora_targets=",".join(cfg.lora_target_modules),
                        lora_dropout=cfg.lora_dropout, use_dora=spec.lora_variant.get("use_dora", False),
                        seq_len=seq_len, batch_size=spec.batch,
                        gradient_accumulation_steps=spec.accumulation, optim=spec.optim, dtype=spec.precision,
                        grad_ckpt=spec.gradient_checkpointing, zero=spec.zero_stage, device=device,
                        check_autocast=False)  # train_one's gradient check runs outside autocast
    if spec.zero_stage:
        s.optim = "adamw_torch"  # DeepSpeed's CPU Adam keeps AdamW's two fp32 states
    note = f"ZeRO-{spec.zero_stage} modelled without offload (on one CPU the offloaded states are in the same RAM)" \
        if spec.offload != "none" else ""
    try:
        return {"bytes": memory.plan(model_path, s)["peak_bytes"], "note": note, "seq_len": seq_len}
    except memory.PlanError as e:
        return {"bytes": None, "note": f"n/a: {e}"}


class _TrainTimer:
    """Seconds between the Trainer's on_train_begin and on_train_end (no loading, no evaluation)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                timer.seconds = time.perf_counter() - timer.start

        self.start, self.seconds, self.callback = None, None, Callback()


def build_model(spec: RunSpec, cfg: CompareConfig, model_path: str, device: torch.device, precision: str):
    """The base model with `spec.method` attached, ready to train. Returns (model, extra metrics)."""
    from harnesses.adapters import attach_bottleneck_adapters
    from common.models import LoraOptions, attach_lora, load_base_model, pick_attn_implementation

    model = load_base_model(model_path, device, precision, spec.method == "qlora",
                            pick_attn_implementation("auto", device))
    extra = {}
    if spec.method in ("lora", "qlora"):
        options = LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              lora_target_modules=cfg.lora_target_modules, **spec.lora_variant)
        targets = options.lora_targets
        model = attach_lora(model, options, quantized=spec.method == "qlora",
                            gradient_checkpointing=spec.gradient_checkpointing)
        extra["lora_modules"] = checks.check_lora_targets(model, targets)
    elif spec.method == "adapter":
        extra["adapters"] = attach_bottleneck_adapters(model, cfg.adapter_size)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            checks.enable_input_grads(model)
    elif spec.gradient_checkpointing:  # full fine-tuning: every parameter trains
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, extra


def train_one(cfg: CompareConfig, spec: RunSpec, run_dir: Path, eval_before: bool = True) -> dict:
    """Train `spec` in this process; write and return its metrics.json."""
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    from common.assets import resolve_model_path
    from common.collator import CausalLMCollator, tokenize_sft
    from common.data import load_dataset_file, to_messages
    from common.models import resolve_precision
    from common.trainer import TokenCountingTrainer

    wall_start = time.time()
    set_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- validate what needs no model ------------------------------------------------------------
    if spec.method not in METHODS:
        raise checks.CheckFailed(f"{spec.name}: method {spec.method!r}; choose one of {', '.join(METHODS)}")
    device = checks.resolve_device(cfg.device)
    precision = resolve_precision(spec.precision, device)
    if device.type == "cpu" and spec.optim.startswith("paged_"):
        raise checks.CheckFailed(spec.skip_on_cpu or f"{spec.optim} pages optimizer states between GPU and host "
                                 "memory; without a GPU there is nothing to page")
    quantized_on_cpu = spec.method == "qlora" and device.type == "cpu"
    if spec.zero_stage:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise checks.CheckFailed(f"DeepSpeed is not importable ({e}); `pip install deepspeed==0.19.8` "
                                     "(requirements.txt) to run the ZeRO rows") from None
        if spec.method != "full":
            raise checks.CheckFailed(f"{spec.name}: the ZeRO rows are full fine-tuning; got method {spec.method}")
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
            os.environ.setdefault(key, value)  # a one-process "distributed" job: DeepSpeed needs a process group
    records, fmt = load_dataset_file(cfg.dataset_path)
    eval_records = load_dataset_file(cfg.eval_dataset_path)[0] if cfg.eval_dataset_path else []

    # ---- tokenize ----------------------------------------------------------------------------------
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    checks.check_chat_template(tokenizer, source=model_path)
    features, truncation = tokenize_sft([(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in records],
                                        tokenizer, cfg.max_length)
    eval_features = tokenize_sft([(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in eval_records],
                                 tokenizer, cfg.max_length)[0] if eval_records else []
    collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    longest = -(-max(len(f["input_ids"]) for f in features) // 8) * 8  # the widest padded batch

    # ---- model + method ----------------------------------------------------------------------------
    memory = PeakMemory(device)
    model, extra = build_model(spec, cfg, model_path, device, precision)
    trainable, total = checks.log_parameter_counts(model)
    before_sums = _checksums(model)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    guard = checks.Cpu4bitEvalGuard(model) if quantized_on_cpu else None

    first = collator(features[:spec.batch])
    checks.check_labels(first, tokenizer.eos_token_id, tokenizer.pad_token_id)
    checks.check_gradient_flow(model, first)

    # before TrainingArguments: a ZeRO-3 config makes every later from_config (the planner's meta model) zero.Init
    planner = planner_prediction(model_path, cfg, spec, longest, device.type)

    # ---- trainer -----------------------------------------------------------------------------------
    timer = _TrainTimer()
    args = TrainingArguments(
        output_dir=str(run_dir), seed=cfg.seed, use_cpu=device.type == "cpu", bf16=precision == "bf16",
        per_device_train_batch_size=spec.batch, per_device_eval_batch_size=spec.batch,
        gradient_accumulation_steps=spec.accumulation, max_steps=cfg.max_steps, learning_rate=spec.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, weight_decay=0.0, max_grad_norm=1.0,
        optim=spec.optim, logging_steps=1, report_to="none", save_strategy="no",
        eval_strategy="no", remove_unused_columns=False, dataloader_num_workers=0, prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        deepspeed=deepspeed_config(spec.zero_stage, spec.offload) if spec.zero_stage else None)
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=features,
                                   eval_dataset=eval_features or None, data_collator=collator,
                                   processing_class=tokenizer, callbacks=[timer.callback])
    trainer.loraplus_lr_ratio = spec.lora_variant.get("loraplus_lr_ratio", 0.0)  # > 0: LoRA+ optimizer groups
    # before training: not under ZeRO (no engine yet) and not through 4-bit weights on CPU (repacking)
    loss_before = trainer.evaluate()["eval_loss"] if eval_before and eval_features and not guard \
        and not spec.zero_stage else None

    # ---- train, measure ----------------------------------------------------------------------------
    result = trainer.train()
    peak = memory.report()
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)
    changed = None
    if spec.zero_stage != 3:  # ZeRO-3 leaves partitioned placeholders in the module
        after_sums = _checksums(model)  # before evaluating: an eval forward repacks 4-bit weights on CPU
        moved = {n for n in before_sums if after_sums.get(n) != before_sums[n]}
        changed = {"trainable_tensors": len(trainable_names), "trainable_changed": len(moved & trainable_names),
                   "frozen_tensors": len(before_sums) - len(trainable_names),
                   "frozen_changed": len(moved - trainable_names)}
    loss_after = trainer.evaluate()["eval_loss"] if eval_features else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = timer.seconds or result.metrics["train_runtime"]
    optimizer = trainer.optimizer
    for _ in range(3):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer, then the one that steps
        optimizer = getattr(optimizer, "optimizer", optimizer)
    optimizer = type(optimizer)
    metrics = {
        "name": spec.name, "status": "ok", "spec": asdict(spec), "shared": shared_settings(cfg),
        "model": model_path, "device": device_name(device), "device_type": device.type, "precision": precision,
        "optimizer": f"{optimizer.__module__.split('.')[0]}.{optimizer.__name__}",
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4), **extra,
        "optimizer_steps": trainer.state.global_step, "effective_batch_size": spec.batch * spec.accumulation,
        "trained_tokens": trainer.trained_tokens, "train_seconds": round(seconds, 2),
        "tokens_per_second": round(trainer.trained_tokens / seconds, 2), "wall_seconds": round(time.time() - wall_start, 2),
        "train_losses": losses, "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": result.training_loss, "eval_loss_before": loss_before, "eval_loss_after": loss_after,
        **peak, "planner": planner,
        "parameters_changed": changed, "truncation": truncation.as_dict(),
    }
    write_json(run_dir / "metrics.json", metrics)
    log.info("%s done: %s", spec.name, json.dumps({k: metrics[k] for k in (
        "trainable_params", "tokens_per_second", "peak_memory_bytes", "final_train_loss", "eval_loss_after")}))
    return metrics


def shared_settings(cfg: CompareConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(CompareConfig) if f.name not in NOT_SHARED}


def worker_main(cfg: CompareConfig, specs: list[RunSpec], eval_before: bool = True) -> int:
    """`--run_one NAME`: train that configuration here; `error: <message>` and exit 1 on a known failure."""
    from common.checkpoints import OutputDirError
    from common.data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    by_name = {s.name: s for s in specs}
    try:
        if cfg.run_one not in by_name:
            raise checks.CheckFailed(f"--run_one {cfg.run_one!r}: no such configuration; choose one of {sorted(by_name)}")
        train_one(cfg, by_name[cfg.run_one], Path(cfg.output_dir) / "runs" / cfg.run_one, eval_before)
        return 0
    except (checks.CheckFailed, DataError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Driver: every configuration in its own process
# ---------------------------------------------------------------------------------------------
def run_all(cfg: CompareConfig, specs: list[RunSpec], script: str) -> list[dict]:
    """Run each spec as `python script --config runs/<name>/config.yaml --run_one <name>`; one row each."""
    out = Path(cfg.output_dir)
    device = checks.resolve_device(cfg.device)
    rows = []
    for spec in specs:
        run_dir = out / "runs" / spec.name
        if device.type == "cpu" and spec.skip_on_cpu:
            log.info("%s: skipped on CPU: %s", spec.name, spec.skip_on_cpu)
            rows.append({"name": spec.name, "status": "skipped", "spec": asdict(spec), "note": spec.skip_on_cpu})
            continue
        done = run_dir / "metrics.json"
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("spec") == asdict(spec) and previous.get("shared") == shared_settings(cfg):
                log.info("%s: reusing the finished run in %s (delete it to measure again)", spec.name, run_dir)
                rows.append(previous)
                continue
            done.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump({k: v for k, v in asdict(cfg).items() if k != "run_one"}, sort_keys=False))
        cmd = [sys.executable, script, "--config", str(config_file), "--run_one", spec.name]
        log.info("%s: %s", spec.name, " ".join(cmd))
        result = child.run(cmd, run_dir / "log.txt", timeout=cfg.timeout, metrics=done)
        if result.interrupted:
            child.exit_stopped(f"{spec.name} did not finish; rerun the same command: the finished "
                               "configurations are reused")
        if result.returncode == 0 and result.metrics is not None:
            row = result.metrics
            log.info("%s: ok in %.0f s, peak %.2f GiB, %.0f tokens/s", spec.name, result.seconds,
                     row["peak_memory_bytes"] / 2**30, row["tokens_per_second"])
        else:
            rc = None if result.timed_out else result.returncode
            error = f"timed out after {cfg.timeout} s" if result.timed_out \
                else result.error.removeprefix("error: ") or "no output"
            log.warning("%s: failed (rc %s): %s", spec.name, rc, error)
            row = {"name": spec.name, "status": "failed", "spec": asdict(spec), "rc": rc, "error": error,
                   "log": str(run_dir / "log.txt")}
        rows.append(row)
    return rows


class Report:
    """A comparison harness's run files around run_all: manifest.json "running" when it starts; at the end
    <recipe>.md and .json (header + table), loss.png, metrics.json, manifest.json "finished", the table on
    stdout, and exit code 1 with one `error:` line when a row failed."""

    def __init__(self, recipe: str, cfg: CompareConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        self.recipe, self.cfg, self.started = recipe, cfg, now()
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.datasets = [cfg.dataset_path] + ([cfg.eval_dataset_path] if cfg.eval_dataset_path else [])
        write_manifest(self.out, cfg, self.datasets, self.started, "running")

    def finish(self, rows: list[dict], header: str, text: str, metrics: dict, noun: str) -> int:
        first = first_ok(rows)
        (self.out / f"{self.recipe}.md").write_text(header + "\n\n" + text + "\n")
        write_json(self.out / f"{self.recipe}.json", {"header": header, "rows": rows})
        plot_losses(rows, self.out / "loss.png", f"{self.recipe} on {Path(first.get('model', '')).name}")
        failed = [r for r in rows if r["status"] == "failed"]
        write_json(self.out / "metrics.json", {"recipe": self.recipe, "device": first.get("device"), "world_size": 1,
                                               **metrics, "failed": [r["name"] for r in failed]})
        write_manifest(self.out, self.cfg, self.datasets, self.started, "finished")
        print("\n" + header + "\n\n" + text)
        if failed:
            print(f"error: {len(failed)} of {len(rows)} {noun} failed (the table is in {self.out}): "
                  + "; ".join(f"{r['name']}: {r['error']}" for r in failed), file=sys.stderr)
            return 1
        return 0


def first_ok(rows: list[dict]) -> dict:
    """The first finished row: the model, device and peak-memory method the table's header names."""
    return next((r for r in rows if r["status"] == "ok"), {})


# ---------------------------------------------------------------------------------------------
# Table helpers
# ---------------------------------------------------------------------------------------------
def gib(n: int | None) -> str:
    return f"{n / 2**30:.2f}" if n else "n/a"


def fmt_loss(x: float | None) -> str:
    return f"{x:.3f}" if x is not None and math.isfinite(x) else "n/a"


def plot_losses(rows: list[dict], path: Path, title: str) -> None:
    """Train loss per optimizer step, one line per finished row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for row in rows:
        if row.get("status") == "ok" and row.get("train_losses"):
            losses = row["train_losses"]
            ax.plot(range(1, len(losses) + 1), losses, label=row["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
