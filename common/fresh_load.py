"""Load exports with stock transformers in a fresh process; run as `python -I common/fresh_load.py INPUTS OUT TARGETS`.

-I keeps this repository off sys.path: only transformers' own from_pretrained loads each (folder, gguf_file)
in TARGETS (JSON), as vLLM/TGI/users would. HF folders load in their saved dtype; a GGUF is dequantized to
fp32. For each it writes the token ids of INPUTS' texts, the logits at the real positions, the dtype, the
generation config's eos/pad ids and the chat template to OUT (torch.save); common/verify.py compares them.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(inputs_file: str, out_file: str, targets: list) -> None:
    data = torch.load(inputs_file)
    results = []
    for folder, gguf_file in targets:
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
