"""LoRA / QLoRA SFT of a vision-language model (LLaVA-style: vision tower + projector + causal LM) on image chats.

What it is for: teach a VLM to answer about images, through transformers' own LlavaForConditionalGeneration and
LlavaProcessor. Data: image-chat records {"messages": [...], "images": ["a.png", ...]} with one `<image>` per
image in the user turns (the shape TRL and LLaMA-Factory use; common/vlm.py validates it with file:line errors).
Loss only on assistant text (image tokens, prompts and padding masked). What trains, each a choice:
  --train_vision_tower   the whole vision encoder (default false: a pretrained encoder stays frozen, as in LLaVA)
  --train_projector      the vision -> text projector (default true; a new projector must learn)
  --lora_on_vision_tower LoRA on the encoder's attention/MLP layers too (instead of training it fully)
  LoRA always sits on the language model's layers (--lora_target_modules names them); nothing else trains.
QLoRA (--method qlora) quantizes the language model to NF4 (bitsandbytes); the vision tower, projector and
LM head stay in the training precision.

Offline default: `asset:smollm2_vlm` (SmolLM2-135M-Instruct + a SigLIP at 64 px pretrained on rendered shapes,
a new projector; built locally) learns a generated image set (coloured circles/squares/triangles, 1-3 per
image, rendered with PIL into <output_dir>/shapes): "what colour / shape / how many", one-word answers; held-out accuracy before and
after training goes to metrics.json, with the held-out loss on other chats' images (near the true loss: the
model ignores the images).

Run:
    bash launch/sft_vlm.sh
    python recipes/sft_vlm.py --config recipes/configs/sft_vlm.yaml [--key value ...]
    python recipes/merge_export.py --adapter_path runs/sft_vlm/adapter --output_dir runs/sft_vlm_export

Options: this file's Config plus transformers' TrainingArguments (`--help` lists both); figures: docs/vlm.md.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import common  # noqa: E402,F401  (first: its logging filter must precede transformers' bitsandbytes import)
import torch  # noqa: E402
from transformers import AutoProcessor, TrainingArguments  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.models import LoraOptions  # noqa: E402
from common.run import Run, RunOptions, run_recipe  # noqa: E402
from common.run_files import write_json  # noqa: E402
from common.trainer import TokenCountingTrainer  # noqa: E402
from common.vlm import (GENERATED, MAX_IMAGE_PIXELS, VLMCollator, answer_accuracy, answer_questions,  # noqa: E402
                        attach_vlm_lora, heldout_loss, image_seq_length, is_vlm_folder, load_image_chats, load_vlm,
                        parameter_groups, tokenize_image_chats, trained_weights_in_fp32, write_shapes_dataset)

RECIPE = Path(__file__).stem  # a copy writes runs/<its name> and "recipe": "<its name>"


@dataclass
class Config(RunOptions, LoraOptions):
    model_name_or_path: str = field(default="asset:smollm2_vlm", metadata={"help": "LLaVA-style model folder (config with vision_config + text_config, a processor), or asset:smollm2_vlm / asset:tiny_vlm (built offline)"})
    dataset_path: str = field(default=GENERATED, metadata={"help": f"image-chat .jsonl/.json ({{\"messages\", \"images\"}}; image paths relative to the file), or {GENERATED}: render the shapes set into <output_dir>/shapes"})
    eval_dataset_path: str | None = field(default=GENERATED, metadata={"help": f"held-out image chats: accuracy (first word of the reply == the answer) before and after; {GENERATED}: the generated held-out split; null: none"})
    shapes_train_examples: int = field(default=480, metadata={"help": "generated set: training image chats", "min": 1})
    shapes_eval_examples: int = field(default=60, metadata={"help": "generated set: held-out image chats", "min": 1})
    method: str = field(default="lora", metadata={"help": "lora | qlora (the language model in 4-bit NF4 via bitsandbytes)"})
    train_vision_tower: bool = field(default=False, metadata={"help": "train the whole vision encoder (false: a pretrained one stays frozen; true for a random-init or off-domain one)"})
    train_projector: bool = field(default=True, metadata={"help": "train the vision -> text projector"})
    lora_on_vision_tower: bool = field(default=False, metadata={"help": "LoRA on the vision encoder's attention/MLP layers too (use with --train_vision_tower false)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example, image tokens included; a longer example is refused (cutting an image breaks it)"})
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={"help": "refuse images with more pixels than this (width x height)", "min": 1})
    max_new_tokens: int = field(default=6, metadata={"help": "generation length for the held-out answers"})
    sample_generations: int = field(default=6, metadata={"help": "held-out answers printed before/after training"})


def validate(cfg: Config, args: TrainingArguments, device: torch.device) -> None:
    """Everything that needs no model, each with the option to change."""
    if cfg.method not in ("lora", "qlora"):
        raise checks.CheckFailed(f"--method {cfg.method!r}: choose lora or qlora")
    cfg.check_lora_variants(quantized=cfg.method == "qlora")
    checks.check_world_size(1)  # single-device recipe
    if cfg.train_vision_tower and cfg.lora_on_vision_tower:
        raise checks.CheckFailed("--train_vision_tower true with --lora_on_vision_tower true: the tower trains fully "
                                 "already; choose one (LoRA on it: --train_vision_tower false)")
    if args.eval_steps or args.eval_strategy != "no":
        raise checks.CheckFailed("--eval_steps / --eval_strategy: this recipe scores the held-out image chats (accuracy "
                                 "and loss, images included) before and after training only; use --eval_steps 0")


def main(cfg: Config, args: TrainingArguments) -> dict:
    generated = cfg.dataset_path == GENERATED
    run = Run(RECIPE, cfg, args, datasets=[] if generated else [cfg.dataset_path, cfg.eval_dataset_path])
    validate(cfg, args, run.device)
    device, precision, quantized = run.device, run.precision, cfg.method == "qlora"

    # ---- processor and data (a file's problems stop here, before the run directory is touched) -------
    model_path = resolve_model_path(cfg.model_name_or_path)
    if not is_vlm_folder(model_path):
        raise checks.CheckFailed(f"--model_name_or_path {cfg.model_name_or_path}: not a vision-language model (its "
                                 "config.json has no vision_config/text_config); use asset:smollm2_vlm, asset:tiny_vlm "
                                 "or a LLaVA folder; text models train with recipes/sft_memory_diet.py")
    processor = AutoProcessor.from_pretrained(model_path)
    files = {} if generated else {"train": cfg.dataset_path, "eval": cfg.eval_dataset_path}
    if files:
        train_chats = load_image_chats(files["train"], cfg.max_image_pixels)
        eval_chats = load_image_chats(files["eval"], cfg.max_image_pixels) if files["eval"] not in (None, GENERATED) else []
        if files["eval"] == GENERATED:
            run.log.warning("--eval_dataset_path %s goes with the generated training set; no held-out set for %s "
                            "(pass --eval_dataset_path FILE)", GENERATED, files["train"])
    resume_from = run.open()
    if generated:  # rendered into the run directory (the same seed draws the same set on resume)
        size = processor.image_processor.size["height"]
        train_file, eval_file = write_shapes_dataset(run.output_dir / "shapes", cfg.shapes_train_examples,
                                                     cfg.shapes_eval_examples, size, args.seed)
        run.datasets = [str(train_file), str(eval_file)]
        train_chats = load_image_chats(train_file)
        eval_chats = load_image_chats(eval_file) if cfg.eval_dataset_path else []
    train_features = tokenize_image_chats(train_chats, processor, cfg.max_length)
    eval_features = tokenize_image_chats(eval_chats, processor, cfg.max_length) if eval_chats else []
    run.log.info("%d training / %d held-out image chats; %d image tokens per image", len(train_features),
                 len(eval_features), image_seq_length(processor))

    # ---- model: VLM (LM in 4-bit for QLoRA) + LoRA + what else trains --------------------------------
    run.measure_memory()
    model = load_vlm(model_path, device, precision, quantized)
    model = attach_vlm_lora(model, cfg, cfg.train_vision_tower, cfg.train_projector, cfg.lora_on_vision_tower, quantized)
    trained_weights_in_fp32(model)  # bf16 autocast computes; the trained modules stay fp32
    trainable, total = checks.log_parameter_counts(model)
    groups = parameter_groups(model)
    run.log.info("trainable / total parameters: %s", {k: f"{v['trainable']:,} / {v['total']:,}" for k, v in groups.items()})
    guard = checks.Cpu4bitEvalGuard(model) if quantized and device.type == "cpu" else None

    # ---- trainer -------------------------------------------------------------------------------------
    collator = VLMCollator(processor)
    args = run.library_args(args, remove_unused_columns=False, include_num_input_tokens_seen="non_padding")
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=train_features, data_collator=collator,
                                   processing_class=processor.tokenizer,
                                   callbacks=run.callbacks(("trained_tokens", "trained_labelled_tokens", "trained_positions")))
    run.bind(trainer)
    trainer.loraplus_lr_ratio = cfg.loraplus_lr_ratio

    # ---- fail-fast: labels and gradients on one real batch -------------------------------------------
    first = collator(train_features[:args.per_device_train_batch_size])
    checks.check_labels(first, processor.tokenizer.eos_token_id, collator.pad_token_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        checks.check_gradient_flow(model, first)
    run.started()

    # ---- before: held-out accuracy ---------------------------------------------------------------------
    def scores() -> dict:
        if not eval_chats:
            return {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            replies = answer_questions(model, processor, eval_chats, cfg.max_new_tokens)
            loss, other = (heldout_loss(model, eval_features, collator, other_images=o) for o in (False, True))
        return {"eval_loss": loss, "eval_loss_other_images": other, **answer_accuracy(eval_chats, replies),
                "replies": replies}

    before_file = run.output_dir / "before.json"
    if resume_from and before_file.is_file():
        before = json.loads(before_file.read_text())
    elif guard:
        run.log.info("QLoRA on CPU: no evaluation before training (an eval-mode forward would repack the 4-bit "
                     "weights and corrupt later gradients); it runs after training")
        before = {}
    else:
        before = scores()
        write_json(before_file, before)

    # ---- train -------------------------------------------------------------------------------------------
    whole = run.train(trainer)
    if guard:
        guard.remove()
        checks.check_4bit_weights_unpacked(model)

    # ---- after: accuracy, answers, adapter + processor ------------------------------------------------------
    after = scores()
    model.save_pretrained(run.output_dir / "adapter")
    processor.save_pretrained(run.output_dir / "adapter")
    if eval_chats:
        print("\n=== held-out questions: before -> after training ===")
        for i, chat in enumerate(eval_chats[:cfg.sample_generations]):
            print(f"Q: {chat.messages[-2]['content'].split(chr(10))[-1]} (answer: {chat.messages[-1]['content']})")
            print(f"  before: {before.get('replies', ['(not run)'] * len(eval_chats))[i]!r}   after: {after['replies'][i]!r}")
        write_json(run.output_dir / "generations.json", {"questions": [c.messages[:-1] for c in eval_chats],
                                                         "answers": [c.messages[-1]["content"] for c in eval_chats],
                                                         "before": before.get("replies"), "after": after["replies"]})

    # ---- metrics.json, manifest, loss.png ---------------------------------------------------------------
    labelled, seconds = whole["trained_labelled_tokens"], whole["train_seconds"]
    metrics = {
        "method": cfg.method, "model": model_path,
        "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
        "accuracy_by_kind_before": before.get("accuracy_by_kind"), "accuracy_by_kind_after": after.get("accuracy_by_kind"),
        "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss"),
        "eval_loss_other_images_before": before.get("eval_loss_other_images"),
        "eval_loss_other_images_after": after.get("eval_loss_other_images"),
        "heldout_questions": len(eval_chats), "train_examples": len(train_features),
        "image_tokens_per_image": image_seq_length(processor), "trained_labelled_tokens": labelled,
        "labelled_tokens_per_second": round(labelled / seconds, 2) if seconds else None,
        "trainable_params": trainable, "total_params": total, "parameter_groups": groups,
        "train_vision_tower": cfg.train_vision_tower, "train_projector": cfg.train_projector,
        "lora_on_vision_tower": cfg.lora_on_vision_tower, "data": run.datasets,
    }
    return run.finish(trainer, whole, metrics, f"{RECIPE} {cfg.method} on {Path(model_path).name}", headline=(
        "final_train_loss", "accuracy_before", "accuracy_after", "eval_loss_before", "eval_loss_after",
        "eval_loss_other_images_after",
        "peak_memory_bytes", "wall_seconds"))


CONFIGS = (Config, TrainingArguments)

if __name__ == "__main__":
    run_recipe(main, CONFIGS)
