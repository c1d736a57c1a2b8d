"""The Trainer the SFT recipes use: transformers' Trainer plus exact trained-token counts and the project's
held-out loss; where experiment trackers write (`keep_tracking_in_run_dir`, every recipe with --report_to)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback


class TokenCountingTrainer(Trainer):
    """Counts the tokens of the batches it actually trains on (non-pad and labelled), per process.

    The collator cannot: accelerate's dataloader collates one batch ahead to detect the last one,
    so a run stopped by max_steps collates a batch it never trains.
    Padding-free (packed) batches have no attention_mask and no padding: every position is a token.
    `trained_positions` counts every position fed to the model, padding included, so
    1 - trained_tokens / trained_positions is the padding fraction.

    `evaluate()` (before/after training, every --eval_steps) reports `eval_loss` as
    common.evaluation.heldout_loss: the token-weighted NLL over every labelled token of the eval set, each
    example once, whatever the batch size, the training sampler or the number of ranks (all ranks call it;
    each scores its share and the sums are all-reduced). It is logged like the Trainer's own (log_history,
    trackers, on_evaluate) and is the number recipes/evaluate.py reports for the saved adapter at the same
    precision.

    Two speed-ups, each off with its attribute (tests/unit/test_fast_path.py checks both give the same loss and
    gradients as the plain path):
    - `labelled_logits_only`: the LM head and the cross-entropy run only at positions whose next token is
      labelled (`logits_to_keep` as a boolean mask + `shift_labels`), not over the whole vocabulary for every
      prompt token. Same loss, same gradients; skipped under Liger (its fused loss never builds logits).
    - `skip_adapter_input_cast`: under autocast (bf16/fp16 Trainer), peft casts each LoRA layer's input to the
      adapter's fp32 dtype and autocast casts it straight back to bf16 for the matmul: two full copies of the
      activations per adapted layer for nothing. Training steps run with peft's cast switched off
      (`peft.helpers.disable_input_dtype_casting`); evaluation and generation outside the Trainer keep it.

    `loraplus_lr_ratio` > 0: the optimizer is --optim's class built by peft's create_loraplus_optimizer (lora_B and
    1-D adapter parameters such as DoRA's magnitudes at ratio x lr, weight decay as --weight_decay); the Trainer
    saves and resumes its state as any other optimizer's.
    """

    trained_tokens = trained_labelled_tokens = trained_positions = 0
    labelled_logits_only = True
    skip_adapter_input_cast = True
    loraplus_lr_ratio = 0.0

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer
            from transformers.trainer_optimizer import is_optimizer_factory

            model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
                from common.checks import CheckFailed

                raise CheckFailed(f"--loraplus_lr_ratio with --optim {self.args.optim}: LoRA+ needs an optimizer built "
                                  "from parameter groups (adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, ...)")
            self.optimizer = create_loraplus_optimizer(model, optimizer_cls, loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                       loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        positions = inputs["input_ids"].numel()
        mask = inputs.get("attention_mask")
        self.trained_tokens += int(mask.sum()) if mask is not None else positions
        self.trained_positions += positions
        self.trained_labelled_tokens += int((inputs["labels"] != -100).sum())
        args = getattr(self, "args", None)
        autocast = args is not None and (args.bf16 or args.fp16)
        if self.skip_adapter_input_cast and autocast and hasattr(self.model, "peft_config"):
            from peft.helpers import disable_input_dtype_casting

            with disable_input_dtype_casting(self.model):
                return super().training_step(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (self.labelled_logits_only and not return_outputs and not self.args.use_liger_kernel
                and accepts_logits_to_keep(model)):
            inputs = labelled_logits_inputs(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        from common.evaluation import token_weighted_nll

        features = self.eval_dataset if eval_dataset is None else eval_dataset
        if features is None:
            raise ValueError("evaluate() needs an eval_dataset")
        # DeepSpeed runs the forward through its engine (ZeRO-3 gathers the partitioned weights in hooks)
        model = self.model_wrapped if self.is_deepspeed_enabled else self.model
        pad = getattr(self.processing_class, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.data_collator, "pad_token_id", None)
        start = time.time()
        total, count = token_weighted_nll(model, list(features), pad, self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_loss": total / count if count else float("nan"),
                   f"{metric_key_prefix}_tokens": count, f"{metric_key_prefix}_runtime": round(time.time() - start, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any wrappers (peft, accelerate, DDP) takes `logits_to_keep` and passes
    its extra keyword arguments (`shift_labels`) on to transformers' loss."""
    import inspect

    inner = model
    for _ in range(8):  # peft's PeftModel forwards attribute lookups, so unwrap it explicitly
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(inner._modules.get("module"), torch.nn.Module):  # DDP / FSDP1 wrappers
            inner = inner._modules["module"]
        else:
            break
    if "lm_head" not in inner._modules:
        return False
    params = inspect.signature(inner.forward).parameters
    return "logits_to_keep" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())


def labelled_logits_inputs(inputs: dict) -> dict:
    """`inputs` + `logits_to_keep` (positions whose next token is labelled) + the matching `shift_labels`.

    transformers' causal-LM loss shifts `labels` itself; with `shift_labels` given it uses them as they are,
    so the kept logits line up with their targets. The loss is the same mean over the same labelled tokens.
    """
    labels = inputs.get("labels")
    if labels is None or "logits_to_keep" in inputs or "shift_labels" in inputs:
        return inputs
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    keep = shift != -100
    return {**inputs, "logits_to_keep": keep, "shift_labels": shift[keep]}


TRACKER_DIRS = {"tensorboard": ("TENSORBOARD_LOGGING_DIR", "runs"), "mlflow": ("MLFLOW_TRACKING_URI", None),
                "trackio": ("TRACKIO_DIR", "trackio")}
OWNED_VARIABLE = "FT_TRACKER_DIRS_SET"  # the values a recipe put there (JSON), so a later run, in this process or
# a child (a sweep's trials, torchrun's ranks), tells them from a value the user set


def keep_tracking_in_run_dir(output_dir, report_to) -> dict[str, str]:
    """Point the experiment trackers in `report_to` at folders inside the run directory; call it before the
    Trainer is built (the trackers' callbacks read these variables when they are created or set up).

    transformers' TensorBoardCallback picks its folder in on_train_begin (`<output_dir>/runs/<date>_<host>`),
    but creates its writer at the first log: an evaluate() before train() opens a writer in `./runs` of the
    working directory and every training scalar follows it there. With TENSORBOARD_LOGGING_DIR set, every
    writer (before, during and after training, and after a resume) opens in <output_dir>/runs, so
    `tensorboard --logdir <output_dir>/runs` shows one curve per run. trackio gets TRACKIO_DIR=<output_dir>/trackio.
    mlflow gets the one store beside the run directory, common.tracking.store_uri (runs/mlflow.db for runs/<name>),
    so `mlflow ui` lists every run. A variable the user set is kept. Returns {tracker: where it writes}.
    """
    from common.tracking import store_uri

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    if "all" in names:
        names = list(TRACKER_DIRS)
    owned = json.loads(os.environ.get(OWNED_VARIABLE) or "{}")
    where = {}
    for name in names:
        if name not in TRACKER_DIRS:
            continue
        var, folder = TRACKER_DIRS[name]
        value = store_uri(output_dir) if name == "mlflow" else str((Path(output_dir) / folder).resolve())
        if var in os.environ and os.environ[var] != owned.get(var):
            where[name] = os.environ[var]  # the user's choice
            continue
        os.environ[var] = owned[var] = value
        where[name] = value
    if str(where.get("mlflow", "")).startswith("file:"):  # mlflow 3.17+ refuses a file: store unless opted in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ[OWNED_VARIABLE] = json.dumps(owned)
    return where


class StepProfiler(TrainerCallback):
    """`--profile_steps N`: a torch.profiler trace of N optimizer steps, written as tables to `path`.

    Step 1 is left out (first-touch allocations, lazy initialisation). The file lists operators by self
    time (CPU; CUDA time too on a GPU) and the top operator/shape pairs, and starts with the share of the
    profiled time spent in matmuls (aten::mm, bmm, addmm, the sdpa kernels counted apart), the first
    thing to read when MFU is low.
    """

    def __init__(self, steps: int, path, start_step: int = 1):
        self.steps, self.path, self.start = steps, path, start_step
        self.prof = None
        self.done = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.prof is None and not self.done and state.global_step >= self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.first = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step >= self.first + self.steps:
            self._write()

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None:
            self._write()

    def _write(self):
        from pathlib import Path

        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        share = {name: sum(e.self_cpu_time_total for e in events if e.key == name) / total
                 for name in ("aten::mm", "aten::bmm", "aten::addmm")}
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / total
        by_shape = sorted(self.prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        lines = [f"profiled optimizer steps {self.first + 1}-{self.first + self.steps}: "
                 f"{total / 1e6:.2f} s of operator self time (CPU)",
                 "share of that time: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
                 + f", sdpa kernels {100 * attention:.1f}%", "",
                 events.table(sort_by="self_cpu_time_total", row_limit=30), "",
                 "top operator / input shapes by self CPU time:"]
        lines += [f"{e.key:60s} {e.count:6d} calls {e.self_cpu_time_total / 1e3:10.1f} ms  {str(e.input_shapes)[:120]}"
                  for e in by_shape[:30]]
        Path(self.path).write_text("\n".join(lines) + "\n")
        self.prof, self.done = None, True


TOKEN_MASK_KEYS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")  # SFT/DPO/KTO; ORPO


class CountTokens:
    """Mixin for any Trainer (TRL's included): `trained_tokens` counts the non-pad tokens of the batches it
    trains on, summed over every attention mask in the batch (prompt + response, chosen and rejected). Not
    the collator (the dataloader collates one batch ahead) and not `num_input_tokens_seen` (ORPO batches
    have no `input_ids`, so the Trainer counts 0 there)."""

    trained_tokens = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained_tokens += sum(int(inputs[k].sum()) for k in TOKEN_MASK_KEYS if torch.is_tensor(inputs.get(k)))
        return super().training_step(model, inputs, num_items_in_batch)


def counting_tokens(trainer_cls):
    """`trainer_cls` with CountTokens mixed in (same name, so logs and errors read as TRL's)."""
    return type(trainer_cls.__name__, (CountTokens, trainer_cls), {})
