"""Image-chat data (validation with file:line), the VLM collator token by token, the generated shapes set,
and which parameters train under each --train_vision_tower / --train_projector / --lora_on_vision_tower choice."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.data import DataError
from common.vlm import (IMAGE_TOKEN, VLMCollator, answer_accuracy, image_seq_length, load_image_chats,
                        tokenize_image_chats, write_shapes_dataset)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vlm_dir():
    from common.assets import resolve_model_path

    return resolve_model_path("asset:tiny_vlm")


@pytest.fixture(scope="module")
def processor(vlm_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm_dir)


def chat(question="<image>\nWhat colour?", answer="red", images=("a.png",)):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": list(images)}


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (20, 10), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10), (30, 30, 200)).save(tmp_path / "b.png")
    return tmp_path


# ---- validation: file:line, what, the fix ------------------------------------------------------------
def refused(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_image_chats(path, **kw)
    return str(e.value)


def test_valid_file_loads_with_paths_relative_to_the_file(images):
    path = write(images, [chat(), chat("Two: <image> and <image>", "blue", ["a.png", "b.png"])])
    chats = load_image_chats(path)
    assert [c.images for c in chats] == [[str(images / "a.png")], [str(images / "a.png"), str(images / "b.png")]]
    assert chats[1].where == f"{path}:2"


def test_missing_image_names_file_line_and_path(images):
    path = write(images, [chat(), chat(images=["nope.png"])])
    assert refused(path).startswith(f"{path}:2: images[0]: image '{images / 'nope.png'}' not found; fix the path")


def test_unreadable_and_truncated_images(images):
    (images / "bad.png").write_bytes(b"not a png at all")
    whole = (images / "a.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "big.png")
    (images / "cut.png").write_bytes((images / "big.png").read_bytes()[:60])
    for name in ("bad.png", "cut.png"):
        path = write(images, [chat(images=[name])], f"{name}.jsonl")
        message = refused(path)
        assert message.startswith(f"{path}:1: images[0]: cannot read image '{images / name}'"), message
        assert message.endswith("re-export it as PNG/JPEG or drop the record")
    assert (images / "a.png").read_bytes() == whole  # nothing written next to the data


def test_placeholder_count_must_match_images(images):
    path = write(images, [chat(), chat("<image> and <image>", images=["a.png"])])
    assert refused(path) == (f"{path}:2: 2 <image> placeholder(s) in the user turns but 1 path(s) in `images`; each "
                             "image needs exactly one <image> where it belongs in the text")
    path = write(images, [chat("What colour?")], "none.jsonl")
    assert refused(path).startswith(f"{path}:1: 0 <image> placeholder(s) in the user turns but 1 path(s)")


def test_placeholder_in_an_assistant_turn_is_refused(images):
    path = write(images, [chat(answer=f"red {IMAGE_TOKEN}", images=["a.png", "b.png"])])
    assert refused(path).startswith(f"{path}:1: messages[1] (assistant) holds <image>; images go in user turns only")


def test_too_large_image(images):
    path = write(images, [chat(), chat(images=["a.png"])])
    assert refused(path, max_pixels=150) == (
        f"{path}:1: images[0]: image '{images / 'a.png'}' is too large (20x10 = 200 pixels > --max_image_pixels 150); "
        "downscale it or raise --max_image_pixels")


def test_text_chat_rules_still_apply(images):
    path = write(images, [{"messages": [{"role": "assistant", "content": "hi"}], "images": []}])
    assert "must open with a user message" in refused(path)


def test_trl_structured_content_reads_as_placeholders(images):
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": ["a.png"]}
    (c,) = load_image_chats(write(images, [record]))
    assert c.messages == [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}]


def test_validate_cli_checks_image_chats(images):
    good, bad = write(images, [chat()], "good.jsonl"), write(images, [chat(images=["gone.png"])], "bad.jsonl")
    ok = subprocess.run([sys.executable, "-m", "common.data", "validate", str(good)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["format"] == "image_chat", ok.stderr
    fail = subprocess.run([sys.executable, "-m", "common.data", "validate", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert fail.returncode == 1 and fail.stderr.startswith(f"{bad}:1: images[0]: image ") and "Traceback" not in fail.stderr


# ---- the collator, token by token ---------------------------------------------------------------------
def test_collator_labels_only_assistant_text_token_by_token(processor, images):
    two_turns = {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "<image>\nWhat colour?"},
                              {"role": "assistant", "content": "red"},
                              {"role": "user", "content": "And this one? <image>"},
                              {"role": "assistant", "content": "blue"}], "images": ["a.png", "b.png"]}
    chats = load_image_chats(write(images, [two_turns, chat()]))
    features = tokenize_image_chats(chats, processor, 256)
    batch = VLMCollator(processor)(features)
    tok, image_id, n = processor.tokenizer, processor.image_token_id, image_seq_length(processor)
    assert n == 16
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] % 8 == 0 and ids.shape[1] >= len(features[0]["input_ids"])
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        assert ids[row, :length].tolist() == feature["input_ids"]
        assert attention[row].tolist() == [1] * length + [0] * (ids.shape[1] - length)
        assert (labels[row, length:] == -100).all()  # padding never a target
        assert (labels[row][ids[row] == image_id] == -100).all()  # image tokens never targets
        assert int((ids[row] == image_id).sum()) == n * len(chats[row].images)
    # the labelled tokens of each row are exactly its assistant texts, each with its closing <|im_end|>
    labelled = [[(i, tok.decode([t])) for i, t in enumerate(labels[row].tolist()) if t != -100] for row in range(2)]
    assert "".join(text for _, text in labelled[0]) == "red<|im_end|>blue<|im_end|>"
    assert "".join(text for _, text in labelled[1]) == "red<|im_end|>"
    for row in range(2):  # every label equals the token at its position (the model shifts them)
        for i, _ in labelled[row]:
            assert labels[row, i] == ids[row, i]
    # the text before the first label is the prompt: system, user with 16 image tokens, assistant header
    first = labelled[0][0][0]
    prompt = tok.decode(ids[0, :first].tolist())
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + IMAGE_TOKEN * 16)
    assert prompt.endswith("<|im_start|>assistant\n")
    # the images, in placeholder order, as the processor gives them
    expected = processor.image_processor([Image.open(images / "a.png").convert("RGB"),
                                          Image.open(images / "b.png").convert("RGB"),
                                          Image.open(images / "a.png").convert("RGB")], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])


def test_ids_match_llava_processor(processor, images):
    """Our per-turn expansion of <image> gives the ids LlavaProcessor gives for the whole templated text."""
    (c,) = load_image_chats(write(images, [chat("Look: <image> what colour?")]))
    (feature,) = tokenize_image_chats([c], processor, 256)
    text = processor.tokenizer.apply_chat_template(c.messages, tokenize=False)
    enc = processor(text=text, images=[Image.open(c.images[0])], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == feature["input_ids"]


def test_too_long_is_refused_with_the_length_that_fits(processor, images):
    chats = load_image_chats(write(images, [chat()]))
    length = len(tokenize_image_chats(chats, processor, 256)[0]["input_ids"])
    with pytest.raises(DataError) as e:
        tokenize_image_chats(chats, processor, 20)
    assert str(e.value) == (f"{images / 'data.jsonl'}:1: takes {length} tokens with its 1 image(s) (16 tokens each) > "
                            f"--max_length 20; raise --max_length to {length} or shorten the text")


# ---- the generated shapes set ----------------------------------------------------------------------------
def test_shapes_dataset_is_valid_deterministic_and_reused(tmp_path):
    train, heldout = write_shapes_dataset(tmp_path / "s", 12, 6, image_size=32, seed=3)
    chats = load_image_chats(train)
    assert len(chats) == 12 and len(load_image_chats(heldout)) == 6
    assert {c.data["kind"] for c in chats} == {"colour", "shape", "count"}
    first = train.read_text()
    again, _ = write_shapes_dataset(tmp_path / "s2", 12, 6, image_size=32, seed=3)
    assert again.read_text().replace("s2", "s") == first
    assert (tmp_path / "s" / "images" / "train_0000.png").read_bytes() == (tmp_path / "s2" / "images" / "train_0000.png").read_bytes()
    colour = next(c for c in chats if c.data["kind"] == "colour")
    img = Image.open(colour.images[0]).convert("RGB")
    from common.vlm import COLOURS

    assert COLOURS[colour.messages[-1]["content"]] in {px for _, px in img.getcolors(4096)}


def test_answer_accuracy_first_word(tmp_path):
    train, _ = write_shapes_dataset(tmp_path / "s", 3, 1, image_size=32, seed=0)
    chats = load_image_chats(train)
    answers = [c.messages[-1]["content"] for c in chats]
    result = answer_accuracy(chats, [f"{answers[0].capitalize()}.", "no idea", answers[2] + " shapes"])
    assert result["accuracy"] == round(2 / 3, 4) and result["questions"] == 3
    assert result["accuracy_by_kind"] == {"colour": 1.0, "count": 1.0, "shape": 0.0}


# ---- what trains ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower, projector, vision_lora", [(True, True, False), (False, False, True), (False, True, False)])
def test_trainable_parts_follow_the_options(vlm_dir, tower, projector, vision_lora):
    from common.models import LoraOptions
    from common.vlm import attach_vlm_lora, load_vlm

    model = attach_vlm_lora(load_vlm(vlm_dir, torch.device("cpu"), "fp32"), LoraOptions(lora_r=4), tower, projector,
                            vision_lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = {n for n in trainable if ".vision_tower." in n}
    assert bool({n for n in trainable if ".multi_modal_projector." in n}) == projector
    lm = {n for n in trainable if ".language_model." in n}
    assert lm and all(".lora_" in n for n in lm)  # the language model trains through LoRA only
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    if tower:  # the whole encoder, except the final norm LLaVA never reads
        assert vision and not any(".lora_" in n for n in vision) and not any("post_layernorm" in n for n in vision)
        assert any("patch_embedding" in n for n in vision)
    elif vision_lora:
        assert vision and all(".lora_" in n for n in vision)
    else:
        assert not vision


def test_qlora_quantizes_the_language_model_only_and_the_tower_trains(vlm_dir):
    """CHRONICLES 93: skip names must be full prefixes (transformers 5 matches from the start of the module name);
    "vision_tower" alone quantized the tower and get_peft_model failed on its uint8 weights."""
    import bitsandbytes as bnb

    from common.models import LoraOptions
    from common.vlm import attach_vlm_lora, load_vlm

    base = load_vlm(vlm_dir, torch.device("cpu"), "fp32", quantize_4bit=True)
    four_bit = {n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(".language_model." in n for n in four_bit)
    assert not any(n.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")) for n in four_bit)
    model = attach_vlm_lora(base, LoraOptions(lora_r=4), True, True, False, quantized=True)
    tower = [p for n, p in model.named_parameters() if ".vision_tower." in n and p.requires_grad]
    assert tower and all(p.dtype == torch.float32 for p in tower)


def test_pretrained_tower_learns_to_see_colour_shape_and_count(processor):
    """common.vlm.pretrain_vision_tower (what asset:smollm2_vlm's tower gets at build time) on the tiny VLM's
    random 2-layer tower at 32 px: from chance to well above it on new renders, on the features LLaVA reads."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from common.vlm import pretrain_vision_tower

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, vision_use_head=False))
    none = pretrain_vision_tower(tower, processor.image_processor, steps=0)["heldout_accuracy"]
    report = pretrain_vision_tower(tower, processor.image_processor, steps=120, batch_size=32)
    seen = report["heldout_accuracy"]
    assert max(none.values()) < 0.6, none  # untrained heads: about chance (1/4, 1/3, 1/3)
    assert seen["colour"] >= 0.9 and seen["shape"] >= 0.6 and seen["count"] >= 0.5, seen


def test_heldout_loss_with_other_images_rolls_the_pixels_one_chat_over(processor, images):
    """The image-reliance probe: each chat is scored with its batch neighbour's image, the text unchanged."""
    from common.vlm import heldout_loss

    data = write(images, [chat(images=("a.png",)), chat(answer="blue", images=("b.png",))])
    features = tokenize_image_chats(load_image_chats(data), processor, 256)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, pixel_values, **kw):
            seen.append(pixel_values.clone())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 8)})()

    collator = VLMCollator(processor)
    for other in (False, True):
        heldout_loss(Spy(), [{**f, "input_ids": [1] * len(f["input_ids"]), "loss_mask": [1] * len(f["input_ids"])}
                             for f in features], collator, other_images=other)
    assert torch.equal(seen[1], seen[0].roll(1, 0)) and not torch.equal(seen[0], seen[1])


def test_trained_tower_in_bf16_keeps_its_frozen_norm_in_fp32(vlm_dir, processor, images):
    """CHRONICLES 97: a bf16-loaded VLM with the tower trained in full. Casting only the trainable parameters to fp32
    leaves the tower's frozen final norm in bf16, and the forward under bf16 autocast fails; the recipe's cast
    (trained_weights_in_fp32) takes the whole trained module and the forward runs."""
    from common.models import LoraOptions
    from common.vlm import attach_vlm_lora, load_vlm, trained_weights_in_fp32

    batch = VLMCollator(processor)(tokenize_image_chats(load_image_chats(write(images, [chat()])), processor, 256))

    def forward(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    model = attach_vlm_lora(load_vlm(vlm_dir, torch.device("cpu"), "bf16"), LoraOptions(lora_r=4), True, True, False)
    for p in model.parameters():  # the old cast: trainable parameters only
        if p.requires_grad:
            p.data = p.data.float()
    with pytest.raises(RuntimeError, match="mixed dtype"):
        forward(model)

    model = attach_vlm_lora(load_vlm(vlm_dir, torch.device("cpu"), "bf16"), LoraOptions(lora_r=4), True, True, False)
    trained_weights_in_fp32(model)
    frozen_norm = [p for n, p in model.named_parameters() if ".modules_to_save." in n and "post_layernorm" in n]
    assert frozen_norm and all(p.dtype == torch.float32 and not p.requires_grad for p in frozen_norm)
    assert torch.isfinite(forward(model))
