"""Vision-language (LLaVA-style) fine-tuning: image-chat data, its collator, a generated image set, offline VLMs.

Image-chat records (the shape TRL and LLaMA-Factory use), one per line of a .jsonl/.json file:
    {"messages": [{"role": "user", "content": "<image>\\nWhat colour is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/0001.png"]}
Each `<image>` placeholder in a user turn takes the next path of `images` (relative to the data file's
folder); TRL's structured content ([{"type": "image"}, {"type": "text", "text": ...}]) is read the same way.
Refused with `file:line: what; fix`: a missing, unreadable or too large image (over --max_image_pixels),
a placeholder count that differs from the number of images, a placeholder outside user turns, and
everything the text chat format refuses (common.data).

    chats = load_image_chats("data.jsonl")                        # validated, or DataError (file:line)
    features = tokenize_image_chats(chats, processor, max_length)  # input_ids + loss_mask + image paths
    batch = VLMCollator(processor)(features[:4])                   # input_ids, attention_mask, labels, pixel_values

Labels: only assistant text and its end-of-turn token (the chat template's {% generation %} marks); image
tokens, prompts and padding are -100, and labels are built after padding (common.collator).
The placeholder expansion is LlavaProcessor's own (one `<image>` -> image_seq_length image tokens), done per
turn so the assistant mask stays exact; tests/unit/test_vlm.py checks the ids against the processor's.

Offline models (common.assets): `asset:tiny_vlm` (tiny random Llama + 2-layer SigLIP, seconds, for tests) and
`asset:smollm2_vlm` (SmolLM2-135M-Instruct + a 4-layer SigLIP at 64 px pretrained on rendered shapes by
`pretrain_vision_tower` + a random-init projector). Both are
LlavaForConditionalGeneration folders with a LlavaProcessor that AutoProcessor loads in a fresh process.
The generated image set (`write_shapes_dataset`): coloured circles/squares/triangles, 1-3 per image, with
one-word answers to "what colour / what shape / how many".
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.data import DataError, _check_chat, load_records

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
MAX_IMAGE_PIXELS = 4096 * 4096  # default refusal: the processor would resize it anyway, after decoding it all
GENERATED = "generated:shapes"  # --dataset_path value for the generated image set


# ---- image-chat data ----------------------------------------------------------------------------
@dataclass
class ImageChat:
    where: str  # "file:line"
    messages: list[dict]  # string contents, `<image>` placeholders in user turns
    images: list[str]  # absolute paths, in placeholder order
    data: dict


def is_image_chat(data: dict) -> bool:
    return isinstance(data, dict) and "images" in data


def _content_text(content, field: str) -> str:
    """String content as it is; TRL's list of parts as text with one `<image>` per image part."""
    if isinstance(content, str) or not isinstance(content, list):
        return content
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append(IMAGE_TOKEN)
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise ValueError(f"{field}[{j}] is not {{\"type\": \"image\"}} or {{\"type\": \"text\", \"text\": ...}}; "
                             "fix the part or write the content as a string with <image> placeholders")
    return "".join(out)


def check_image(path: Path, field: str, max_pixels: int) -> None:
    """The file exists, decodes completely, and is not larger than `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{field}: image {str(path)!r} not found; fix the path (relative paths are read from the "
                         "data file's folder) or drop the record")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"{field}: image {str(path)!r} is too large ({width}x{height} = {width * height} "
                                 f"pixels > --max_image_pixels {max_pixels}); downscale it or raise --max_image_pixels")
            img.load()  # decodes every byte: a truncated file fails here, not in the middle of training
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{field}: cannot read image {str(path)!r} ({type(e).__name__}: {e}); re-export it as "
                         "PNG/JPEG or drop the record") from None


def check_image_chat(data: dict, base_dir: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[dict], list[str]]:
    """(messages with string contents, absolute image paths) of one record, or ValueError saying what and the fix."""
    if "messages" not in data:
        raise ValueError("image-chat record has `images` but no `messages`; add the conversation")
    images = data["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
        raise ValueError("`images` must be a list of image file paths (strings); fix the field")
    messages = data["messages"]
    if isinstance(messages, list):
        messages = [{**m, "content": _content_text(m.get("content"), f"messages[{i}].content")}
                    if isinstance(m, dict) else m for i, m in enumerate(messages)]
    _check_chat({"messages": messages}, Counter())  # roles, order, blank text: the text chat format's rules
    placed = 0
    for i, m in enumerate(messages):
        n = m["content"].count(IMAGE_TOKEN)
        if n and m["role"] != "user":
            raise ValueError(f"messages[{i}] ({m['role']}) holds {IMAGE_TOKEN}; images go in user turns only - "
                             "move the placeholder into the user message")
        placed += n
    if placed != len(images):
        raise ValueError(f"{placed} {IMAGE_TOKEN} placeholder(s) in the user turns but {len(images)} path(s) in "
                         f"`images`; each image needs exactly one {IMAGE_TOKEN} where it belongs in the text")
    paths = [Path(p) if os.path.isabs(p) else base_dir / p for p in images]
    for j, path in enumerate(paths):
        check_image(path, f"images[{j}]", max_pixels)
    return messages, [str(p.resolve()) for p in paths]


def load_image_chats(path, max_pixels: int = MAX_IMAGE_PIXELS) -> list[ImageChat]:
    """Every record of an image-chat file, validated; the first problem is a DataError naming file:line."""
    records = load_records(path)
    base_dir = Path(path).resolve().parent
    chats = []
    for record in records:
        if not is_image_chat(record.data):
            raise DataError(record.path, record.line, "record has no `images` list, but this is an image-chat file; "
                            "add \"images\": [...] (an empty list for a text-only turn) or use a text recipe")
        try:
            messages, images = check_image_chat(record.data, base_dir, max_pixels)
        except ValueError as e:
            raise DataError(record.path, record.line, str(e)) from None
        chats.append(ImageChat(f"{record.path}:{record.line}", messages, images, record.data))
    return chats


def image_chat_summary(path, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """`python -m common.data validate FILE` for image-chat files."""
    chats = load_image_chats(path, max_pixels)
    return {"path": str(path), "format": "image_chat", "records": len(chats),
            "images": sum(len(c.images) for c in chats),
            "assistant_turns": sum(m["role"] == "assistant" for c in chats for m in c.messages)}


# ---- tokenization and the collator -----------------------------------------------------------------
def image_seq_length(processor) -> int:
    """Image tokens one `<image>` becomes, as LlavaProcessor computes it."""
    size = processor.image_processor.size
    height, width = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
    n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def expand_placeholders(messages: list[dict], processor) -> list[dict]:
    """Each `<image>` -> image_seq_length image tokens (what LlavaProcessor does to the whole text)."""
    n = image_seq_length(processor)
    return [{**m, "content": m["content"].replace(IMAGE_TOKEN, processor.image_token * n)} for m in messages]


def tokenize_image_chats(chats: list[ImageChat], processor, max_length: int) -> list[dict]:
    """input_ids + loss_mask (assistant text only) + the image paths, per chat. A chat longer than
    max_length is refused (cutting inside an image's tokens would break the model's image/feature match)."""
    from common.collator import encode_chat

    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    features = []
    for chat in chats:
        ids, mask = encode_chat(expand_placeholders(chat.messages, processor), tokenizer)
        path, line = chat.where.rsplit(":", 1)
        if not any(mask):
            raise DataError(path, int(line), "no assistant token is marked for training; the chat template "
                            "must wrap assistant turns in {% generation %} (common.assets.chatml_template)")
        if len(ids) > max_length:
            raise DataError(path, int(line), f"takes {len(ids)} tokens with its {len(chat.images)} image(s) "
                            f"({image_seq_length(processor)} tokens each) > --max_length {max_length}; raise "
                            f"--max_length to {len(ids)} or shorten the text")
        mask = [0 if t == image_id else m for t, m in zip(ids, mask)]  # image tokens are never targets
        features.append({"input_ids": ids, "loss_mask": mask, "images": chat.images})
    return features


def vlm_sample_chats(path, adapter_dir, count: int) -> tuple[list[ImageChat], str]:
    """(the first `count` image chats, their file) to verify a VLM export on: `path` when it holds image chats,
    else the generated held-out set of the run that wrote the adapter (<run>/shapes/heldout.jsonl)."""
    from common.checks import CheckFailed

    candidates = [Path(path)] + [Path(adapter_dir).parent / "shapes" / "heldout.jsonl"]
    for candidate in candidates:
        if candidate.is_file() and is_image_chat(load_records(candidate)[0].data):
            if candidate != Path(path):
                log.info("--sample_dataset_path %s holds no image chats: verifying on %s", path, candidate)
            return load_image_chats(candidate)[:max(count, 1)], str(candidate)
    raise CheckFailed(f"--sample_dataset_path {path}: a vision-language adapter is verified on image chats "
                      "({\"messages\", \"images\"} records); pass such a file")


def load_images(paths: list[str]):
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.convert("RGB"))
    return out


class VLMCollator:
    """Pads the text like CausalLMCollator (labels from the loss mask, after padding), masks every image
    token, and adds `pixel_values` for the batch's images in placeholder order."""

    def __init__(self, processor, pad_to_multiple_of: int = 8):
        from common.collator import CausalLMCollator

        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.text = CausalLMCollator(pad, pad_to_multiple_of)
        self.pad_token_id = pad
        self.processor, self.image_token_id = processor, processor.image_token_id

    def __call__(self, features: list[dict]) -> dict:
        batch = self.text([{"input_ids": f["input_ids"], "loss_mask": f["loss_mask"]} for f in features])
        batch["labels"][batch["input_ids"] == self.image_token_id] = -100
        paths = [p for f in features for p in f.get("images", [])]
        if paths:
            batch["pixel_values"] = self.processor.image_processor(load_images(paths), return_tensors="pt")["pixel_values"]
        return batch


# ---- answers and accuracy ---------------------------------------------------------------------------
def first_word(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def answer_questions(model, processor, chats: list[ImageChat], max_new_tokens: int = 8,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies to each chat without its last (assistant) turn; prompts padded on the left."""
    import torch

    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    replies = []
    try:
        for i in range(0, len(chats), batch_size):
            part = chats[i:i + batch_size]
            prompts = [tokenizer.apply_chat_template(expand_placeholders(c.messages[:-1], processor), tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"]
                       for c in part]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            paths = [p for c in part for p in c.images]
            extra = {}
            if paths:
                pixels = processor.image_processor(load_images(paths), return_tensors="pt")["pixel_values"]
                extra["pixel_values"] = pixels.to(device, dtype)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, use_cache=True, **extra)  # training set it off
            replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    finally:
        model.train(was_training)
    return replies


def heldout_loss(model, features: list[dict], collator, batch_size: int = 8, other_images: bool = False) -> float | None:
    """Token-weighted NLL over every labelled token of `features` (images included), each example once.
    other_images: each chat gets the next chat's image in its batch instead of its own (pixel_values rolled by one):
    that loss minus the true one is how much the model reads the images (near 0: it ignores them)."""
    import torch

    if not features:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(features), batch_size):
                batch = {k: v.to(device) for k, v in collator(features[i:i + batch_size]).items()}
                if other_images and "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].roll(1, 0)
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()
                shift = labels[:, 1:]
                total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), shift.flatten(),
                                                           ignore_index=-100, reduction="sum").item()
                count += int((shift != -100).sum())
    finally:
        model.train(was_training)
    return total / count if count else None


def answer_accuracy(chats: list[ImageChat], replies: list[str]) -> dict:
    """Exact first-word match with each chat's last assistant reply, overall and per record `kind`."""
    hits, by_kind = [], {}
    for chat, reply in zip(chats, replies):
        ok = first_word(reply) == first_word(chat.messages[-1]["content"])
        hits.append(ok)
        by_kind.setdefault(str(chat.data.get("kind", "all")), []).append(ok)
    return {"accuracy": round(sum(hits) / max(len(hits), 1), 4), "questions": len(hits),
            "accuracy_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}}


# ---- the generated image set -------------------------------------------------------------------------
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {"colour": "What colour are the shapes?", "shape": "What shape are they?",
             "count": "How many shapes are there?"}
SYSTEM = "Answer with one word."  # short: it replaces a chat template's default system prompt (SmolLM2's: ~20 tokens)


def render_shapes(colour: str, shape: str, count: int, size: int, rng: random.Random):
    """`count` shapes of one colour and kind, each in its own cell of a 2x2 grid, jittered."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for index in rng.sample(range(4), count):
        r = int(cell * rng.uniform(0.28, 0.4))
        cx = (index % 2) * cell + cell // 2 + rng.randint(-cell // 10, cell // 10)
        cy = (index // 2) * cell + cell // 2 + rng.randint(-cell // 10, cell // 10)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_shapes_dataset(folder, train_examples: int, eval_examples: int, image_size: int = 64,
                         seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl (image chats) with their PNGs under `folder`; the same arguments write the
    same files, so a resumed run reuses them. Held-out images are new renders (positions, sizes, combinations)."""
    folder = Path(folder)
    spec = {"train": train_examples, "eval": eval_examples, "size": image_size, "seed": seed, "version": 1}
    marker = folder / "spec.json"
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    if marker.is_file() and json.loads(marker.read_text()) == spec and train.is_file() and heldout.is_file():
        return train, heldout
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n, out in (("train", train_examples, train), ("heldout", eval_examples, heldout)):
        rows = []
        for i in range(n):
            colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(COUNTS))
            kind = list(QUESTIONS)[i % len(QUESTIONS)]
            name = f"images/{split}_{i:04d}.png"
            render_shapes(colour, shape, count, image_size, rng).save(folder / name)
            answer = {"colour": colour, "shape": shape, "count": COUNTS[count]}[kind]
            rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTIONS[kind]}"},
                                      {"role": "assistant", "content": answer}],
                         "images": [name], "kind": kind})
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marker.write_text(json.dumps(spec))
    return train, heldout


# ---- the model: load, choose what trains ----------------------------------------------------------------
LM_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # SigLIP / CLIP encoder layers


def is_vlm_folder(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return "vision_config" in data and "text_config" in data


def lora_target_regex(lm_names, vision_names=()) -> str:
    """peft's target_modules as a regex (full match): the language model's layers, optionally the vision tower's."""
    parts = [rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(lm_names)})"]
    if vision_names:
        parts.append(rf"model\.vision_tower\..*\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(vision_names)})")
    return "|".join(f"({p})" for p in parts)


def load_vlm(path, device, precision: str, quantize_4bit: bool = False):
    """LlavaForConditionalGeneration (via AutoModelForImageTextToText) in the training precision; QLoRA: the
    language model in NF4, the vision tower, projector and LM head kept in the training precision."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from common.models import DTYPES

    kwargs = {"dtype": DTYPES[precision], "device_map": {"": str(device)}}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[precision], bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def attach_vlm_lora(model, lora_options, train_vision_tower: bool, train_projector: bool,
                    lora_on_vision_tower: bool, quantized: bool = False):
    """peft LoRA on the language model (and, if asked, the vision tower's encoder layers); the vision tower and
    the projector train fully when asked, as peft `modules_to_save` (saved in the adapter, merged by
    merge_and_unload). Returns the PeftModel."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from common.checks import enable_input_grads
    from common.lora_fast import speed_up_lora

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = lora_options.lora_config(quantized=quantized, loraplus_built=True)
    lm_names = LM_LORA_NAMES if lora_options.lora_targets == "all-linear" else tuple(lora_options.lora_targets)
    config.target_modules = lora_target_regex(lm_names, VISION_LORA_NAMES if lora_on_vision_tower else ())
    config.modules_to_save = ([n for n, on in (("vision_tower", train_vision_tower),
                                               ("multi_modal_projector", train_projector)) if on] or None)
    model = get_peft_model(model, config)
    speed_up_lora(model)  # peft's maths, fewer passes (common/lora_fast.py)
    if train_vision_tower:  # LLaVA reads an encoder layer's output, not the final norm or pooling head
        for name, p in model.named_parameters():
            if ".vision_tower." in name and (".post_layernorm." in name or ".head." in name):
                p.requires_grad_(False)
    enable_input_grads(model)
    return model


def trained_weights_in_fp32(model) -> None:
    """Trained weights in fp32 while bf16 autocast computes (bf16 weights lose the small updates), and with them
    every parameter of a module trained in full (peft `modules_to_save`), frozen ones included: the vision tower's
    frozen final norm left in bf16 meets fp32 input under autocast and fails with `RuntimeError: mixed dtype
    (CPU): expect parameter to have scalar type of Float` (CHRONICLES 97)."""
    import torch

    for name, p in model.named_parameters():
        if (p.requires_grad or ".modules_to_save." in name) and p.dtype != torch.float32:
            p.data = p.data.float()


def parameter_groups(model) -> dict:
    """Trainable and total parameters of the vision tower, the projector and the language model (LoRA included)."""
    groups = {}
    for name, p in model.named_parameters():
        part = ("vision_tower" if ".vision_tower." in name else "projector" if ".multi_modal_projector." in name
                else "language_model")
        g = groups.setdefault(part, {"trainable": 0, "total": 0})
        g["total"] += p.numel()
        g["trainable"] += p.numel() if p.requires_grad else 0
    return groups


# ---- the offline VLM builders (common.assets BUILDERS) -------------------------------------------------
def pretrain_vision_tower(tower, image_processor, feature_layer: int = -1, steps: int = 200, batch_size: int = 64,
                          seed: int = 1234, learning_rate: float = 1e-3) -> dict:
    """Teach a random-init vision tower to see the shapes set's attributes, the job a pretrained encoder (CLIP,
    SigLIP) does for a real VLM: linear heads on the mean of the features LLaVA reads (`feature_layer`) classify
    colour, shape and count of freshly rendered images (their own seed: none is a recipe's training or held-out
    image). Without it the recipe's LoRA learns the answer format and ignores the image (CHRONICLES 95).
    Returns the held-out accuracy per attribute on 256 new renders, and the seconds it took."""
    import math
    import time

    import torch

    rng, start = random.Random(seed), time.time()
    size = image_processor.size["height"]
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(tower.config.hidden_size, len(COLOURS)),
                                 "shape": torch.nn.Linear(tower.config.hidden_size, len(SHAPES)),
                                 "count": torch.nn.Linear(tower.config.hidden_size, len(COUNTS))})

    def draw(n):
        labels = {k: [rng.randrange(len(heads[k].bias)) for _ in range(n)] for k in heads}
        images = [render_shapes(list(COLOURS)[c], SHAPES[s], k + 1, size, rng)
                  for c, s, k in zip(labels["colour"], labels["shape"], labels["count"])]
        return (image_processor(images, return_tensors="pt")["pixel_values"],
                {k: torch.tensor(v) for k, v in labels.items()})

    def pooled(pixels):
        return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer].mean(1)

    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=0.01)
    threads = torch.get_num_threads()
    # One thread: these matmuls are tiny, and with a second busy process on a 2-core machine two OpenMP threads
    # ran 50 steps in 154 s against 9 s for one (measured here, load average ~4.5; CHRONICLES 96).
    torch.set_num_threads(1)
    try:
        tower.train()
        for step in range(1, steps + 1):
            for group in optimizer.param_groups:  # 20 warm-up steps, then cosine to 0
                group["lr"] = learning_rate * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            pixels, labels = draw(batch_size)
            features = pooled(pixels)
            loss = sum(torch.nn.functional.cross_entropy(heads[k](features), labels[k]) for k in heads)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tower.eval()
        with torch.no_grad():
            pixels, labels = draw(256)
            features = pooled(pixels)
            accuracy = {k: round((heads[k](features).argmax(-1) == labels[k]).float().mean().item(), 4) for k in heads}
    finally:
        torch.set_num_threads(threads)
    return {"steps": steps, "batch_size": batch_size, "seed": seed, "heldout_accuracy": accuracy,
            "seconds": round(time.time() - start, 1)}


def build_vlm(lm_dir, output_dir, vision: dict, image_size: int, patch_size: int, pretrain_steps: int = 0) -> None:
    """A LLaVA folder: the causal LM in `lm_dir` (its weights, tokenizer + `<image>`), a SigLIP vision tower
    (random-init, or pretrained on the shapes set for `pretrain_steps`: vision_pretraining.json says how well) and
    a random-init projector, and a LlavaProcessor (SigLIP image processor, PIL backend) saved beside it."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig)
    from transformers.models.siglip import SiglipImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    lm.resize_token_embeddings(len(tokenizer))  # the new row starts at the mean embedding
    text_config = AutoConfig.from_pretrained(lm_dir)
    text_config.vocab_size = len(tokenizer)
    vision_config = SiglipVisionConfig(image_size=image_size, patch_size=patch_size, vision_use_head=False, **vision)
    n_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_id,
                         image_seq_length=n_tokens, vision_feature_select_strategy="full", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.tie_weights()
    model.generation_config = lm.generation_config
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    if pretrain_steps:
        report = pretrain_vision_tower(model.model.vision_tower, image_processor, config.vision_feature_layer,
                                       pretrain_steps)
        log.info("vision tower pretrained on rendered shapes: %s", report)
        (Path(output_dir) / "vision_pretraining.json").write_text(json.dumps(report, indent=2))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=0, chat_template=tokenizer.chat_template)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def build_tiny_vlm(output_dir) -> None:
    import tempfile

    from common.assets import build_tiny

    with tempfile.TemporaryDirectory() as lm_dir:
        build_tiny(Path(lm_dir))
        build_vlm(lm_dir, output_dir, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                       "num_attention_heads": 4}, image_size=32, patch_size=8)


def build_smollm2_vlm(output_dir) -> None:
    from common.assets import resolve_model_path

    build_vlm(resolve_model_path("asset:smollm2"), output_dir,
              {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4},
              image_size=64, patch_size=16, pretrain_steps=200)
