"""Load exports with stock transformers in a fresh process; run as `python -I common/fresh_load.py INPUTS OUT TARGETS`.

-I keeps this repository off sys.path: only transformers' own from_pretrained loads each (folder, gguf_file)
in TARGETS (JSON), as vLLM/TGI/users would. HF folders load in their saved dtype; a GGUF is dequantized to
fp32; a vision-language folder (INPUTS with `images`) loads with AutoProcessor + AutoModelForImageTextToText. For each
it writes the token ids of INPUTS' texts, the logits at the real positions, the dtype, the generation config's
eos/pad ids and the chat template to OUT (torch.save); common/verify.py compares them.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(inputs_file: str, out_file: str, targets: list) -> None:
    data = torch.load(inputs_file)
    results = []
    for folder, gguf_file in targets:
        if "images" in data:
            results.append(load_vlm(folder, data))
            continue
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, **kw, **({"dtype": torch.float32} if gguf_file else {})).eval()
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.float()
        gen = model.generation_config
        results.append({"ids": [tok(t, add_special_tokens=False)["input_ids"] for t in data["texts"]],
                        "logits": logits[data["attention_mask"].bool()], "dtype": str(model.dtype),
                        "eos_token_id": gen.eos_token_id, "pad_token_id": gen.pad_token_id,
                        "chat_template": tok.chat_template})
        del model
    torch.save(results, out_file)


def load_vlm(folder: str, data: dict) -> dict:
    """A vision-language folder: its own processor expands each text's <image> placeholders (the ids) and turns
    the image files into pixel_values; AutoModelForImageTextToText computes the logits."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    images = [[Image.open(p).convert("RGB") for p in paths] for paths in data["images"]]
    ids = [processor(text=t, images=im or None, return_tensors="pt")["input_ids"][0].tolist()
           for t, im in zip(data["texts"], images)]
    flat = [im for ims in images for im in ims]
    extra = {"pixel_values": processor.image_processor(flat, return_tensors="pt")["pixel_values"].to(model.dtype)} if flat else {}
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], **extra).logits.float()
    gen = model.generation_config
    return {"ids": ids, "logits": logits[data["attention_mask"].bool()], "dtype": str(model.dtype),
            "eos_token_id": gen.eos_token_id, "pad_token_id": gen.pad_token_id,
            "chat_template": processor.tokenizer.chat_template}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
