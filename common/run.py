"""The run scaffold every recipe uses: one object from the parsed options to metrics.json.

    cfg, args = parse_config((Config, TrainingArguments))      # or run_recipe(main, (Config, TrainingArguments))
    run = Run(RECIPE, cfg, args, datasets=[cfg.dataset_path])   # logging, seed, version drift, peak memory
    args = run.library_args(args)                               # use_cpu / bf16 / fp16 for the device it chose
    resume_from = run.open()                                    # lock + check <output_dir>, find the checkpoint
    trainer = Trainer(..., callbacks=run.callbacks(counters=("trained_tokens",)))
    run.bind(trainer)
    run.started()                                               # manifest.json "running"
    whole = run.train(trainer)                                  # disk full, signals (exit 75), all segments
    run.finish(trainer, whole, {...recipe figures...})          # metrics.json, loss.png, manifest "finished"
                                                                # (--report_to mlflow: all of it in one MLflow run)
    run.write_results({...})                                    # instead, for a recipe that trains nothing

`run_recipe` is the `if __name__ == "__main__"` of every recipe: parse, call main, and turn the errors the
checks raise into one `error:` line and exit 1 (a bad option already exited 2; a signal exits 75).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import logging
import sys
import time
from pathlib import Path


from common import checks, tracking
from common.checkpoints import (REQUEUE_EXIT_CODE, CheckpointValidator, NonFiniteGuard, RunError, RunSegments,
                                SaveOnSignal, exit_for_requeue, explain_disk_full, prepare_output_dir)
from common.config import options_set_by_user, parse_config
from common.data import DataError
from common.memory import PlanError
from common.models import resolve_precision
from common.run_files import (PeakMemory, device_name, estimated_cost, now, plot_loss, version_drift, write_json,
                              write_manifest)
from common.trainer import keep_tracking_in_run_dir

log = logging.getLogger(__name__)
RUN_ERRORS = (checks.CheckFailed, DataError, RunError, PlanError)  # each is one line that names the fix: exit 1


def setup_logging() -> None:
    import datasets
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()


def config_dict(*configs) -> dict:
    """The resolved options of a run, as JSON types (the manifest's `config`, compared again on resume). A name
    in more than one keeps the first config's value: a recipe's Config that redeclares a library option
    (`gradient_checkpointing auto`, `torch_compile auto`) shows the user's choice, not the library's placeholder."""
    merged = {}
    for c in configs:
        if c is None:
            continue
        for key, value in (c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c)).items():
            merged.setdefault(key, value)
    return json.loads(json.dumps(merged, default=str))


@dataclass
class ModelOptions:
    """Where the model comes from and the device it runs on: what every recipe asks, those that train nothing
    (evaluate, merge_export) included. A recipe that needs another default or help redeclares the field."""
    model_name_or_path: str = field(default="asset:smollm2", metadata={"help": "hub id, local dir, or asset:tiny / asset:smollm2 (built offline)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})


@dataclass
class RunOptions(ModelOptions):
    """The options of every training recipe run that are not the library's: where the model comes from, the
    device and precision it trains in, and whether an interrupted run resumes. A recipe's Config inherits them."""
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (auto: bf16 where the hardware has it, else fp32 on CPU / fp16 on old GPUs)"})
    resume: bool = field(default=True, metadata={"help": "resume an unfinished run found in output_dir from its last valid checkpoint"})
    hourly_price_usd: float = field(default=1.41, metadata={"help": "price per device-hour for the cost estimate (an on-demand 24 GB A10G)"})


class Run:
    """One recipe run. `main_process`: only it writes the run files (every rank still takes part in train)."""

    def __init__(self, recipe: str, cfg, args=None, *, datasets=(), main_process: bool = True):
        from transformers import set_seed

        self.wall_start, self.started_at = time.time(), now()
        setup_logging()
        self.recipe, self.cfg, self.args, self.main_process = recipe, cfg, args, main_process
        self.log = logging.getLogger(recipe)
        self.config = config_dict(cfg, args)
        set_seed(args.seed if args is not None else cfg.seed)
        self.output_dir = Path(args.output_dir if args is not None else cfg.output_dir)
        self.datasets = [str(d) for d in datasets if d]
        self.resume_from: Path | None = None
        self.segments: RunSegments | None = None
        self.preempted: SaveOnSignal | None = None
        if main_process:
            for name in version_drift():
                self.log.warning("version drift from requirements.txt: %s", name)
        self.device = checks.resolve_device(getattr(cfg, "device", "auto"))
        if main_process and (busy := checks.busy_cpu_warning(self.device)):
            self.log.warning(busy)
        # a recipe without a precision option (merge_export: always fp32, then --dtype) resolves none
        self.precision = resolve_precision(cfg.precision, self.device) if hasattr(cfg, "precision") else None
        self.memory: PeakMemory | None = None
        # --report_to mlflow: one MLflow run (common.tracking), opened at the later of callbacks() and started()
        self.mlflow = args is not None and tracking.reports_to_mlflow(args.report_to)
        if self.mlflow:
            tracking.require_mlflow("--report_to mlflow")
        self.tracked: tracking.TrackedRun | None = None
        self.is_started = False

    # ---- the library config for this device ---------------------------------------------------------
    def library_args(self, args, **decided):
        """`args` (TrainingArguments, DPOConfig, ...) for the device and precision this run resolved, plus any
        field the recipe decided (`gradient_checkpointing=True` also sets its new name, activation_checkpointing)."""
        if "gradient_checkpointing" in decided:
            decided["activation_checkpointing"] = decided.pop("gradient_checkpointing")
        return dataclasses.replace(args, use_cpu=self.device.type == "cpu", bf16=self.precision == "bf16",
                                   fp16=self.precision == "fp16", **decided)

    # ---- the run directory ----------------------------------------------------------------------------
    def open(self, resume: bool | None = None) -> Path | None:
        """Lock and check <output_dir> (a finished run, another config or a live run there is refused, with
        nothing touched); returns the checkpoint an unfinished run of the same config resumes from."""
        resume = getattr(self.cfg, "resume", True) if resume is None else resume
        self.resume_from = prepare_output_dir(self.output_dir, self.config, resume) if self.main_process else None
        return self.resume_from

    def started(self) -> None:
        """manifest.json "running": only after the fail-fast checks, so a failed start leaves no trace."""
        if self.main_process:
            write_manifest(self.output_dir, self.config, self.datasets, self.started_at, "running")
        self.is_started = True
        self.start_tracking()

    def start_tracking(self) -> None:
        """The MLflow run, once the fail-fast checks passed (started) and the Trainer has its callbacks, before
        its first log: the Trainer's MLflowCallback then logs into it (common.tracking.start_run)."""
        if self.mlflow and self.main_process and self.tracked is None and self.is_started and self.segments is not None:
            library = {f.name for f in dataclasses.fields(self.args)}  # the callback logs those, as they ran
            params = {k: v for k, v in config_dict(self.cfg).items() if k not in library}
            self.tracked = tracking.start_run(self.recipe, self.output_dir, params,
                                              resume=self.resume_from is not None,
                                              interrupted=lambda: bool(self.preempted and self.preempted.received))

    def measure_memory(self) -> PeakMemory:
        """Start the peak-memory measurement; call it just before the model loads."""
        self.memory = PeakMemory(self.device)
        return self.memory

    # ---- the trainer ----------------------------------------------------------------------------------
    def callbacks(self, counters: tuple[str, ...] = (), across_ranks: bool = False, signals: bool = True) -> list:
        """Checkpoint validation (checksums, segments), non-finite guard, and SIGTERM/SIGINT save-and-stop;
        tracker files (tensorboard/mlflow/trackio) go inside the run directory."""
        if self.args is not None:
            keep_tracking_in_run_dir(self.output_dir, self.args.report_to)
        self.segments = RunSegments(self.resume_from, counters=counters, across_ranks=across_ranks)
        out = [CheckpointValidator(segments=self.segments), NonFiniteGuard()]
        if signals:
            self.preempted = SaveOnSignal()
            out.append(self.preempted)
        self.start_tracking()
        return out

    def bind(self, trainer) -> None:
        self.segments.bind(trainer)

    def train(self, trainer) -> dict:
        """trainer.train(), resumed where the run stopped; a full disk is one line; a signal saves and exits 75.
        Returns the totals over every segment of the run (RunSegments.finish)."""
        with explain_disk_full(self.output_dir, trainer):
            result = trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        if self.preempted is not None and self.preempted.received:
            self.log.warning("stopped by a signal at step %d; checkpoint saved. Rerun the same command to resume "
                             "(exit code %d)", trainer.state.global_step, REQUEUE_EXIT_CODE)
            exit_for_requeue()
        return self.segments.finish(result)

    # ---- the end --------------------------------------------------------------------------------------
    def figures(self, trainer, whole: dict, world_size: int | None = None) -> dict:
        """The figures every run reports (DESIGN: metrics.json), from the trainer and the segment totals."""
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        world = world_size or trainer.args.world_size
        tokens = whole.get("trained_tokens")
        seconds = whole["train_seconds"]
        wall = time.time() - self.wall_start
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        out = {"recipe": self.recipe, "device": device_name(self.device), "device_type": self.device.type,
               "world_size": world, "precision": self.precision,
               "final_train_loss": losses[-1] if losses else None, "mean_train_loss": whole["mean_train_loss"],
               "optimizer_steps": trainer.state.global_step, "trained_tokens": tokens,
               "train_seconds": round(seconds, 2), "wall_seconds": round(wall, 2),
               "tokens_per_second": round(tokens / seconds, 2) if tokens is not None and seconds else None,
               "train_cpu_seconds": round(whole["train_cpu_seconds"], 2),
               "trainable_params": trainable, "total_params": total,
               "segments": whole["segments"], "segments_complete": whole["segments_complete"]}
        if self.memory is not None:
            out.update(self.memory.report())
        out.update(estimated_cost(wall, getattr(self.cfg, "hourly_price_usd", 0.0), world))
        return out

    def finish(self, trainer, whole: dict, metrics: dict, title: str = "", headline: tuple[str, ...] = ()) -> dict:
        """metrics.json (every run's figures, then the recipe's), loss.png, manifest "finished"; returns metrics."""
        metrics = {**self.figures(trainer, whole), **metrics}
        if self.main_process:
            plot_loss(trainer.state.log_history, self.output_dir / "loss.png", title or self.recipe)
            write_json(self.output_dir / "metrics.json", metrics)
            write_manifest(self.output_dir, self.config, self.datasets, self.started_at, "finished",
                           {"resumed_from": str(self.resume_from) if self.resume_from else None})
            if self.tracked is not None:
                self.tracked.finish(self.output_dir, metrics, step=trainer.state.global_step)
            shown = {k: metrics.get(k) for k in headline or ("final_train_loss", "tokens_per_second",
                                                             "peak_memory_bytes", "wall_seconds")}
            self.log.info("done: %s", json.dumps(shown, default=str))
        return metrics

    def write_results(self, metrics: dict, status: str = "finished", headline: tuple[str, ...] = ()) -> dict:
        """The end of a run that trains nothing (evaluate, merge_export): metrics.json (the figures every run
        reports that apply without a trainer, then the recipe's) and manifest `status` ("failed": a check
        failed after the results were measured; the files are kept). The recipe draws its own loss.png."""
        wall = time.time() - self.wall_start
        out = {"recipe": self.recipe, "device": device_name(self.device), "device_type": self.device.type,
               "world_size": 1, **({"precision": self.precision} if self.precision else {}),
               "wall_seconds": round(wall, 2), **(self.memory.report() if self.memory is not None else {})}
        if hasattr(self.cfg, "hourly_price_usd"):
            out.update(estimated_cost(wall, self.cfg.hourly_price_usd))
        metrics = {**out, **metrics}
        if self.main_process:
            write_json(self.output_dir / "metrics.json", metrics)
            write_manifest(self.output_dir, self.config, self.datasets, self.started_at, status)
            shown = {k: metrics.get(k) for k in headline or ("wall_seconds", "peak_memory_bytes")}
            self.log.info("done: %s", json.dumps(shown, default=str))
        return metrics


def run_recipe(main, classes, argv: list[str] | None = None):
    """A recipe's entry point: parse `classes` (its dataclass, then library configs) from YAML + CLI, call
    main(*configs), and exit 1 with one `error:` line on a check, data or run-directory error. A main with a
    `user_options` parameter also gets the options the user set (what a planner may not override)."""
    import inspect

    classes = tuple(classes) if isinstance(classes, (tuple, list)) else classes
    configs = parse_config(classes, argv)
    configs = configs if isinstance(configs, tuple) else (configs,)
    extra = {"user_options": options_set_by_user(classes, argv)} \
        if "user_options" in inspect.signature(main).parameters else {}
    try:
        return main(*configs, **extra)
    except RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
