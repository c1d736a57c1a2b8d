"""Merging a LoRA adapter and proving an export computes what the adapter computes (recipes/merge_export.py).

    trained_on_4bit, why = detect_4bit_training(adapter_dir, "auto")    # the run's manifest, else the model card
    inputs = verification_inputs(tokenizer, conversations)              # templated texts, ids, padded batch
    inputs = vlm_verification_inputs(processor, image_chats)            # the same for a VLM, images included
    reference = reference_logits(adapter_model, inputs, device)         # fp32 adapter model, real positions only
    merged, n = merge_lora(adapter_model)                               # refuses 4/8-bit layers and non-fp32 weights
    (hf,) = verify_in_fresh_process([(merged_dir, None)], inputs, reference, [tolerance], work)

The fresh process is common/fresh_load.py run with `python -I`: stock from_pretrained, nothing from this
repository and nothing cached from this process, as vLLM, TGI or a user would load the export.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import checks

log = logging.getLogger(__name__)
FRESH_LOAD = Path(__file__).resolve().parent / "fresh_load.py"


# ---- what must never be merged, and the merge --------------------------------------------------------
def quantized_layers(model) -> list[str]:
    """Names of bitsandbytes 4-/8-bit layers (the base layers inside LoRA wrappers included)."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bitLt))]


def check_unquantized_base(base: str) -> str:
    """The dtype the base checkpoint was saved in (fp32 | bf16 | fp16); a quantized checkpoint is refused: peft
    would dequantize, add and re-quantize W + BA, and most of the update rounds away."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    quant = getattr(config, "quantization_config", None)
    if quant:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        raise checks.CheckFailed(
            f"base model {base} is a quantized checkpoint ({quant.get('quant_method', 'quantization_config')}, "
            f"load_in_4bit={quant.get('load_in_4bit')}); merging a LoRA into quantized weights re-quantizes W + BA and "
            "silently loses most of the update. Pass the original unquantized base with --model_name_or_path")
    saved = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(saved, "fp32")


def merge_lora(peft_model):
    """W <- W + scale * B @ A in the model's own (fp32) weights; returns (the plain model, LoRA layers merged).

    Refuses a model whose base layers are bitsandbytes-quantized: peft's merge there dequantizes,
    adds and re-quantizes (warning only: "Merge lora module to 4-bit linear may get different
    generations due to rounding errors."), which rounds away most of a LoRA update.
    """
    from peft.tuners.lora import LoraLayer

    packed = quantized_layers(peft_model)
    if packed:
        raise checks.CheckFailed(
            f"the base is loaded in 4/8-bit ({len(packed)} bitsandbytes layers, e.g. {packed[0]}); merging a LoRA into "
            "quantized weights re-quantizes W + BA and silently loses most of the update. Load the base unquantized "
            "(no quantization_config) in fp32, merge, then cast once: this recipe does that")
    lora_layers = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not lora_layers:
        raise checks.CheckFailed("the adapter attached no LoRA layer to the base; check that --model_name_or_path is "
                                 "the model the adapter was trained on")
    not_fp32 = {str(p.dtype) for p in peft_model.parameters() if p.dtype != torch.float32}
    if not_fp32:
        raise checks.CheckFailed(f"merge must run in fp32 but the model holds {sorted(not_fp32)} parameters; load the "
                                 "base with dtype=torch.float32")
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: NaN check on a copy before writing
    left = [n for n, m in merged.named_modules() if isinstance(m, LoraLayer)]
    if left:
        raise checks.CheckFailed(f"{len(left)} LoRA layers were not merged (e.g. {left[0]})")
    return merged, len(lora_layers)


def detect_4bit_training(adapter_dir: Path, requested: str) -> tuple[bool, str]:
    """(was the adapter trained on a 4-bit base, where that was read): --trained_on_4bit true/false, else the
    run's manifest.json next to the adapter (config.method), else a bitsandbytes config in its model card."""
    if requested in ("true", "false"):
        return requested == "true", "--trained_on_4bit"
    if requested != "auto":
        raise checks.CheckFailed(f"--trained_on_4bit {requested!r}: choose auto, true or false")
    manifest = adapter_dir.parent / "manifest.json"
    if manifest.is_file():
        try:
            method = json.loads(manifest.read_text()).get("config", {}).get("method")
        except ValueError:
            method = None
        if method in ("lora", "qlora"):
            return method == "qlora", f"{manifest} (config.method = {method})"
    card = adapter_dir / "README.md"
    if card.is_file() and ("load_in_4bit: True" in card.read_text() or "bnb_4bit_quant_type" in card.read_text()):
        return True, f"{card} (bitsandbytes 4-bit quantization config)"
    return False, "no manifest.json next to the adapter and no 4-bit config in its model card (assumed LoRA; " \
                  "pass --trained_on_4bit true for a QLoRA adapter)"


def export_generation_config(base_dir: Path, config, tokenizer, stop_ids: list[int]):
    """The base's generation config, made to stop at the chat template's end-of-turn token and to have a pad id.

    A generation config whose eos_token_id lacks the end-of-turn token (e.g. a base model's
    <|endoftext|> on a ChatML fine-tune) makes vLLM, TGI and generate() run every reply to max_tokens.
    """
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else ([gen.eos_token_id] if gen.eos_token_id is not None else [])
    missing = [i for i in stop_ids if i not in eos]
    if missing:
        log.warning("generation_config.eos_token_id %s lacks the end-of-turn token(s) %s (%s); adding them so "
                    "generation stops at the end of a reply", gen.eos_token_id, missing,
                    tokenizer.convert_ids_to_tokens(missing))
        eos = eos + missing
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        log.info("generation_config.pad_token_id set to %d", gen.pad_token_id)
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


# ---- the verification inputs and the reference -------------------------------------------------------
def verification_inputs(tokenizer, conversations: list[list[dict]]) -> dict:
    """The templated texts, their token ids, one right-padded batch and the chat template: what every export
    is compared on (fresh_load.py re-tokenizes the texts with the export's own tokenizer)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"texts": texts, "ids": ids, "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "chat_template": tokenizer.chat_template}


def vlm_verification_inputs(processor, chats) -> dict:
    """verification_inputs for a vision-language model (common.vlm image chats): the templated texts with their
    `<image>` placeholders (the fresh process expands them with the exported processor), the expanded ids, the
    right-padded batch, the images' paths and their pixel_values."""
    from common.vlm import VLMCollator, tokenize_image_chats

    features = tokenize_image_chats(chats, processor, max_length=1 << 30)
    batch = VLMCollator(processor, pad_to_multiple_of=1)(features)
    return {"texts": [processor.tokenizer.apply_chat_template(c.messages, tokenize=False) for c in chats],
            "ids": [f["input_ids"] for f in features], "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"], "pixel_values": batch.get("pixel_values"),
            "images": [c.images for c in chats], "chat_template": processor.tokenizer.chat_template}


@torch.no_grad()
def reference_logits(model, inputs: dict, device: torch.device) -> torch.Tensor:
    """fp32 logits of `model` at the real (unpadded) positions of `inputs`, flattened to (positions, vocab)."""
    images = {"pixel_values": inputs["pixel_values"].to(device)} if inputs.get("pixel_values") is not None else {}
    logits = model(input_ids=inputs["input_ids"].to(device),
                   attention_mask=inputs["attention_mask"].to(device), **images).logits.float().cpu()
    return logits[inputs["attention_mask"].bool()]


def compare_logits(logits: torch.Tensor, reference: torch.Tensor, tolerance: float) -> dict:
    """max/mean |logit difference|, top-1 agreement and whether the max is within `tolerance`."""
    diff = (logits - reference).abs()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": round(top1, 6), "tolerance": tolerance, "passed": diff.max().item() <= tolerance}


def per_sample_loss(flat_logits: torch.Tensor, inputs: dict) -> list[float]:
    """Mean next-token NLL of each sample over its real tokens (for loss.png)."""
    losses, start = [], 0
    for ids in inputs["ids"]:
        n = len(ids)
        logits = flat_logits[start:start + n]
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
        start += n
    return losses


# ---- the checks ---------------------------------------------------------------------------------------
def verify_in_fresh_process(targets: list[tuple[Path, str | None]], inputs: dict, reference: torch.Tensor,
                            tolerances: list[float], work: Path) -> list[dict]:
    """Load each (folder, gguf_file) with stock AutoTokenizer/AutoModelForCausalLM (a vision-language model: AutoProcessor/
    AutoModelForImageTextToText, `inputs` from vlm_verification_inputs) in ONE new Python process
    (nothing from this repository, nothing cached from this process) and compare with `reference`.
    HF folders load in their saved dtype, as vLLM/TGI would; a GGUF is dequantized to fp32 (as llama.cpp
    computes with f16/bf16/q8_0 weights and fp32 accumulation)."""
    inputs_file, out_file = work / "inputs.pt", work / "out.pt"
    torch.save(inputs, inputs_file)
    start = time.time()
    spec = json.dumps([[str(folder), gguf_file or ""] for folder, gguf_file in targets])
    proc = subprocess.run([sys.executable, "-I", str(FRESH_LOAD), str(inputs_file), str(out_file), spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise checks.CheckFailed(f"an export in {[str(t[0]) for t in targets]} does not load with stock "
                                 f"from_pretrained in a fresh process:\n{proc.stderr.strip()[-2000:]}")
    seconds = round(time.time() - start, 2)
    return [{**compare_logits(out["logits"], reference, tolerance),
             "tokenizer_ids_match": out["ids"] == inputs["ids"], "loaded_dtype": out["dtype"],
             "generation_eos_token_id": out["eos_token_id"], "generation_pad_token_id": out["pad_token_id"],
             "chat_template_kept": out["chat_template"] == inputs["chat_template"],
             "positions_compared": int(reference.shape[0]), "fresh_process_seconds": seconds,
             "per_sample_loss": per_sample_loss(out["logits"], inputs)}
            for out, tolerance in zip(torch.load(out_file), tolerances)]


def compare_with_4bit_training(base_dir: Path, adapter_dir: Path, inputs: dict, reference: torch.Tensor,
                               device: torch.device) -> dict:
    """For a QLoRA adapter: logits of the model as trained (NF4 base + adapter) against the adapter on the
    unquantized base, i.e. what merging into the unquantized base changes. Information, not a gate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        q = AutoModelForCausalLM.from_pretrained(base_dir, device_map={"": str(device)}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
        q = PeftModel.from_pretrained(q, adapter_dir).eval()
        diff = (reference_logits(q, inputs, device) - reference).abs()
        del q
        return {"max_abs_logit_diff_vs_4bit_trained": diff.max().item(),
                "mean_abs_logit_diff_vs_4bit_trained": diff.mean().item()}
    except Exception as e:  # information only: never block a merge on it
        log.warning("could not run the 4-bit (as-trained) comparison: %s", e)
        return {"max_abs_logit_diff_vs_4bit_trained": None, "four_bit_comparison_error": str(e)[:300]}


# ---- the report -----------------------------------------------------------------------------------------
def plot_losses(path: Path, series: dict[str, list[float]], title: str) -> None:
    """loss.png of a merge: each verification sample's mean next-token loss, one marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for (label, values), marker in zip(series.items(), "os^vx"):
        ax.plot(range(len(values)), values, marker, label=label, alpha=0.7)
    ax.set_xlabel("verification sample")
    ax.set_ylabel("mean next-token loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
