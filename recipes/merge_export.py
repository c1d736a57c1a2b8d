"""Merge a LoRA adapter into its base, export it for deployment, and verify the export.

What it is for: turn `<run>/adapter` (from recipes/sft_memory_diet.py, LoRA or QLoRA) into what
people deploy, and prove each export computes what the adapter computes:
  merged/           a plain Hugging Face folder (config.json, model.safetensors, tokenizer, chat template,
                    generation_config.json that stops at the chat template's end-of-turn token). Loads with
                    AutoModelForCausalLM; `vllm serve runs/merge_export/merged` and TGI `--model-id` take it as is.
  model-<type>.gguf --gguf_type f32|f16|bf16|q8_0, for llama.cpp / Ollama. Llama architecture only
                    (LlamaForCausalLM: SmolLM/SmolLM2, Llama 3.x without rope scaling, TinyLlama-shaped models)
                    with a byte-level BPE tokenizer (GPT-2 or Llama-3 pre-tokenizer). Anything else is refused
                    before any work; convert the merged/ folder with llama.cpp's convert_hf_to_gguf.py instead.
  adapter/          the adapter alone (PEFT), for multi-adapter serving (vLLM --enable-lora --lora-modules
                    name=DIR; TGI LORA_ADAPTERS) on the unmerged base.

The merge, for LoRA and QLoRA adapters alike: load the base UNQUANTIZED in fp32, apply the adapter, merge
in fp32 (W + scale * B @ A), cast once to the target dtype. A QLoRA adapter (the run's manifest.json says
method qlora, or --trained_on_4bit true) is never merged into 4-bit weights: peft would dequantize, add
and re-quantize, losing most of the update with only a warning. A 4-bit base is refused. For QLoRA the
merged model also differs from the model as trained (NF4 base + adapter) by the base's quantization
error; metrics.json records that gap (max_abs_logit_diff_vs_4bit_trained) for information.

Verification, in a fresh process with plain AutoModelForCausalLM / AutoTokenizer (GGUF: transformers'
GGUF loader, gguf_file=...): the exported tokenizer must give the same ids, and max |logit difference|
against the adapter model (fp32, unmerged) on --num_samples conversations must stay within tolerance,
else the run exits 1. Figures go to metrics.json.

Run:
    bash launch/merge_export.sh --adapter_path runs/sft_memory_diet/adapter
    python recipes/merge_export.py --config recipes/configs/merge_export.yaml [--key value ...]

Measured here (SmolLM2-135M-Instruct quickstart adapter, 2-core CPU): see README.md, "Merge and export".
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed  # noqa: E402

from common import checks  # noqa: E402
from common.assets import resolve_model_path  # noqa: E402
from common.checkpoints import OutputDirError, prepare_output_dir  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.data import DataError, load_dataset_file, to_messages  # noqa: E402
from common.evaluation import end_of_turn_token_id  # noqa: E402
from common.run_files import PeakMemory, device_name, file_sha256, now, write_json, write_manifest  # noqa: E402

log = logging.getLogger("merge_export")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |logit diff| allowed against the fp32 adapter model. fp32: merge reassociation only (measured ~1e-5);
# bf16/fp16: weight rounding plus bf16/fp16 compute in the fresh process (measured on SmolLM2, see README).
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.5, "bf16": 2.0}
GGUF_TOLERANCE = {"f32": 1e-3, "f16": 0.5, "bf16": 2.0, "q8_0": 2.0}


@dataclass
class Config:
    adapter_path: str = field(default="runs/sft_memory_diet/adapter", metadata={"help": "PEFT LoRA adapter folder (what sft_memory_diet.py writes to <output_dir>/adapter)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "unquantized base model (local dir or asset:...); default: the adapter's base_model_name_or_path"})
    output_dir: str = field(default="runs/merge_export", metadata={"help": "run directory: merged/, model-<type>.gguf, adapter/, metrics.json, manifest.json, loss.png"})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16: dtype of the merged weights (auto: the base checkpoint's dtype). The merge itself is always fp32"})
    trained_on_4bit: str = field(default="auto", metadata={"help": "auto | true | false: was the adapter trained on a 4-bit (QLoRA) base? auto reads the run's manifest.json next to the adapter, then the adapter's model card"})
    gguf_type: str = field(default="none", metadata={"help": "none | f32 | f16 | bf16 | q8_0: also write model-<type>.gguf for llama.cpp/Ollama (Llama architecture, byte-level BPE tokenizer)"})
    copy_adapter: bool = field(default=True, metadata={"help": "copy the adapter alone to <output_dir>/adapter for multi-adapter serving"})
    sample_dataset_path: str = field(default="data/persona/heldout.jsonl", metadata={"help": "chat/instruction data whose conversations are the verification inputs"})
    num_samples: int = field(default=8, metadata={"help": "conversations used to compare logits"})
    max_logit_diff: float | None = field(default=None, metadata={"help": "tolerance on max |logit diff| merged vs adapter (default by dtype: fp32 1e-3, fp16 0.5, bf16 2.0)"})
    gguf_max_logit_diff: float | None = field(default=None, metadata={"help": "tolerance for the GGUF (default by type: f32 1e-3, f16 0.5, bf16 2.0, q8_0 2.0)"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda: where the fp32 merge runs (fp32 needs 4 bytes per parameter)"})
    seed: int = field(default=42, metadata={"help": "random seed"})


# ---------------------------------------------------------------------------------------------
# Refusals: what must never be merged, and what the GGUF writer cannot export
# ---------------------------------------------------------------------------------------------
def quantized_layers(model) -> list[str]:
    """Names of bitsandbytes 4-/8-bit layers (the base layers inside LoRA wrappers included)."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bitLt))]


def merge_lora(peft_model):
    """W <- W + scale * B @ A in the model's own (fp32) weights; returns the plain model.

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


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def gguf_support(base_dir: Path, config) -> tuple[str | None, str]:
    """(llama.cpp pre-tokenizer name, "") when this recipe can write a GGUF for the model, else (None, why)."""
    if config.model_type != "llama" or config.architectures not in (None, ["LlamaForCausalLM"]):
        return None, (f"architecture {config.architectures or config.model_type} is not supported by this GGUF writer "
                      "(Llama only: LlamaForCausalLM)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return None, f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not written by this GGUF writer"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return None, "attention/MLP biases are not written by this GGUF writer"
    tok_file = base_dir / "tokenizer.json"
    if not tok_file.is_file():
        return None, f"{tok_file} is missing: only fast (tokenizer.json) byte-level BPE tokenizers are exported"
    spec = json.loads(tok_file.read_text())
    model, pre, norm = spec.get("model", {}), spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or norm:
        return None, ("the tokenizer is not byte-level BPE (a sentencepiece-style Llama 2 / TinyLlama / Mistral "
                      "tokenizer): not exported by this GGUF writer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2", ""
    steps = pre.get("steps", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT):
        return "llama-bpe", ""
    return None, f"pre-tokenizer {json.dumps(pre)[:120]} is neither GPT-2's nor Llama 3's byte-level split"


# ---------------------------------------------------------------------------------------------
# GGUF writer (llama.cpp's tensor names and metadata for the llama architecture)
# ---------------------------------------------------------------------------------------------
def permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores q/k rows for rotate-half RoPE; llama.cpp expects interleaved pairs (its convert script's
    `permute`; transformers' GGUF loader applies the inverse)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, state_dict: dict, config, tokenizer, pre: str, gguf_type: str, stop_ids: list[int],
               name: str) -> None:
    import gguf
    import numpy as np

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if len(vocab) > config.vocab_size or max(vocab.values()) >= config.vocab_size:
        raise checks.CheckFailed(f"tokenizer has {len(vocab)} tokens but the model's vocab_size is {config.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        a = added.get(token)
        types[i] = gguf.TokenType.NORMAL if a is None else (gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    arch = gguf.MODEL_ARCH.LLAMA
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_types[gguf_type])
    if gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # tokenizer: llama.cpp's "gpt2" (byte-level BPE) vocabulary, as its convert script writes it
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    probe = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(stop_ids[0])
    if len(stop_ids) > 1 or tokenizer.eos_token_id != stop_ids[0]:
        w.add_eot_token_id(stop_ids[0])
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0])
    w.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no output.weight: llama.cpp (and transformers' loader) tie it to token_embd
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_for_gguf(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_for_gguf(data, kv_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise checks.CheckFailed(f"no llama.cpp tensor name for {hf_name}; this GGUF writer handles Llama only")
        if data.ndim == 1 or gguf_type == "f32":  # norms stay f32, as llama.cpp writes them
            w.add_tensor(gguf_name, data.numpy())
        elif gguf_type == "f16":
            w.add_tensor(gguf_name, data.to(torch.float16).numpy())
        elif gguf_type == "bf16":
            w.add_tensor(gguf_name, data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:  # q8_0: blocks of 32 int8 values with an f16 scale
            if data.shape[-1] % 32:
                w.add_tensor(gguf_name, data.to(torch.float16).numpy())
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(data.numpy(), gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------
# Verification in a fresh process: stock from_pretrained, nothing from this repository
# ---------------------------------------------------------------------------------------------
VERIFY_SOURCE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
inputs_file, out_file, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
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
"""


def verify_in_fresh_process(targets: list[tuple[Path, str | None]], inputs: dict, reference: torch.Tensor,
                            tolerances: list[float], work: Path) -> list[dict]:
    """Load each (folder, gguf_file) with stock AutoTokenizer/AutoModelForCausalLM in ONE new Python process
    (nothing from this repository, nothing cached from this process) and compare with `reference`.
    HF folders load in their saved dtype, as vLLM/TGI would; a GGUF is dequantized to fp32 (as llama.cpp
    computes with f16/bf16/q8_0 weights and fp32 accumulation)."""
    inputs_file, out_file = work / "inputs.pt", work / "out.pt"
    torch.save(inputs, inputs_file)
    start = time.time()
    spec = json.dumps([[str(folder), gguf_file or ""] for folder, gguf_file in targets])
    proc = subprocess.run([sys.executable, "-c", VERIFY_SOURCE, str(inputs_file), str(out_file), spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise checks.CheckFailed(f"an export in {[str(t[0]) for t in targets]} does not load with stock "
                                 f"from_pretrained in a fresh process:\n{proc.stderr.strip()[-2000:]}")
    seconds = round(time.time() - start, 2)
    results = []
    for out, tolerance in zip(torch.load(out_file), tolerances):
        diff = (out["logits"] - reference).abs()
        top1 = (out["logits"].argmax(-1) == reference.argmax(-1)).float().mean().item()
        results.append({
            "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": round(top1, 6), "tolerance": tolerance, "passed": diff.max().item() <= tolerance,
            "tokenizer_ids_match": out["ids"] == inputs["ids"], "loaded_dtype": out["dtype"],
            "generation_eos_token_id": out["eos_token_id"], "generation_pad_token_id": out["pad_token_id"],
            "chat_template_kept": out["chat_template"] == inputs["chat_template"],
            "positions_compared": int(reference.shape[0]), "fresh_process_seconds": seconds,
            "per_sample_loss": per_sample_loss(out["logits"], inputs)})
    return results


def per_sample_loss(flat_logits: torch.Tensor, inputs: dict) -> list[float]:
    """Mean next-token NLL of each sample over its real tokens (for loss.png)."""
    losses, start = [], 0
    for ids in inputs["ids"]:
        n = len(ids)
        logits = flat_logits[start:start + n]
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
        start += n
    return losses


def plot_losses(path: Path, series: dict[str, list[float]], title: str) -> None:
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


def main(cfg: Config) -> dict:
    wall_start, started = time.time(), now()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # ---- validate everything that needs no model -------------------------------------------------
    adapter_dir = Path(cfg.adapter_path)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise checks.CheckFailed(f"--adapter_path {adapter_dir}: no adapter_config.json there. Pass the adapter folder "
                                 "a training run wrote (e.g. runs/sft_memory_diet/adapter)")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise checks.CheckFailed(f"{adapter_dir}: peft_type {adapter_config.get('peft_type')!r}; this recipe merges LoRA "
                                 "adapters only")
    base = resolve_model_path(cfg.model_name_or_path or adapter_config.get("base_model_name_or_path") or "")
    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise checks.CheckFailed(f"base model {base!r} is not a local model folder (no config.json); pass "
                                 "--model_name_or_path with the unquantized base the adapter was trained on")
    base_config = transformers.AutoConfig.from_pretrained(base_dir)
    quant = getattr(base_config, "quantization_config", None)
    if quant:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        raise checks.CheckFailed(
            f"base model {base} is a quantized checkpoint ({quant.get('quant_method', 'quantization_config')}, "
            f"load_in_4bit={quant.get('load_in_4bit')}); merging a LoRA into quantized weights re-quantizes W + BA and "
            "silently loses most of the update. Pass the original unquantized base with --model_name_or_path")
    checked_dtype = str(getattr(base_config, "dtype", None) or "float32").replace("torch.", "")
    dtype_name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(checked_dtype, "fp32") \
        if cfg.dtype == "auto" else cfg.dtype
    if dtype_name not in DTYPES:
        raise checks.CheckFailed(f"--dtype {cfg.dtype!r}: choose auto, fp32, bf16 or fp16")
    if cfg.gguf_type not in ("none", *GGUF_TOLERANCE):
        raise checks.CheckFailed(f"--gguf_type {cfg.gguf_type!r}: choose none, f32, f16, bf16 or q8_0")
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    pre = None
    if cfg.gguf_type != "none":
        pre, why = gguf_support(tok_source, base_config)
        if pre is None:
            raise checks.CheckFailed(f"--gguf_type {cfg.gguf_type}: {why}. Use --gguf_type none and convert "
                                     f"{output_dir / 'merged'} with llama.cpp's convert_hf_to_gguf.py")
    trained_on_4bit, detected_from = detect_4bit_training(adapter_dir, cfg.trained_on_4bit)
    device = checks.resolve_device(cfg.device)
    records, fmt = load_dataset_file(cfg.sample_dataset_path)
    conversations = [to_messages(r.data, fmt) for r in records[:cfg.num_samples]]
    if cfg.num_samples < 1 or any(c is None for c in conversations):
        raise checks.CheckFailed(f"{cfg.sample_dataset_path}: need chat or instruction records for verification "
                                 f"(and --num_samples >= 1)")
    tolerance = cfg.max_logit_diff if cfg.max_logit_diff is not None else DEFAULT_TOLERANCE[dtype_name]
    gguf_tolerance = cfg.gguf_max_logit_diff if cfg.gguf_max_logit_diff is not None else GGUF_TOLERANCE.get(cfg.gguf_type)
    prepare_output_dir(output_dir, asdict(cfg), resume=True)
    write_manifest(output_dir, cfg, [cfg.sample_dataset_path, str(adapter_dir)], started, "running")
    log.info("adapter %s on base %s; trained on a 4-bit base: %s (from %s); merged dtype %s", adapter_dir, base,
             trained_on_4bit, detected_from, dtype_name)

    # ---- the adapter model: unquantized fp32 base + LoRA (the reference) ------------------------
    from peft import PeftModel

    memory = PeakMemory(device)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": str(device)})
    model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    inputs = {"texts": texts, "ids": ids, "input_ids": input_ids, "attention_mask": attention_mask,
              "chat_template": tokenizer.chat_template}
    with torch.no_grad():
        reference = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float().cpu()
    reference = reference[attention_mask.bool()]
    metrics_4bit = {}
    if trained_on_4bit:
        metrics_4bit = compare_with_4bit_training(base_dir, adapter_dir, inputs, reference, device)

    # ---- merge in fp32, GGUF from the fp32 weights, cast once, save --------------------------------
    merge_start = time.time()
    merged, lora_layers = merge_lora(model)
    merge_seconds = time.time() - merge_start
    stop_ids = []
    for i in (end_of_turn_token_id(tokenizer), tokenizer.eos_token_id):
        if i is not None and i not in stop_ids:
            stop_ids.append(i)
    gguf_path = None
    if cfg.gguf_type != "none":
        gguf_path = output_dir / f"model-{cfg.gguf_type}.gguf"
        write_gguf(gguf_path, merged.state_dict(), merged.config, tokenizer, pre, cfg.gguf_type, stop_ids,
                   f"{base_dir.name}-{Path(output_dir).name}")
        log.info("wrote %s (%.1f MB, tokenizer pre-type %s)", gguf_path, gguf_path.stat().st_size / 1e6, pre)
    merged = merged.to(DTYPES[dtype_name])
    merged.config.use_cache = True
    merged_dir = output_dir / "merged"
    merged.generation_config = export_generation_config(base_dir, merged.config, tokenizer, stop_ids)
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    del merged, model, base_model
    adapter_copy = None
    if cfg.copy_adapter:
        adapter_copy = output_dir / "adapter"
        shutil.copytree(adapter_dir, adapter_copy, dirs_exist_ok=True)

    # ---- verify each export in a fresh process ---------------------------------------------------
    targets, tolerances = [(merged_dir, None)], [tolerance]
    if gguf_path:
        targets.append((output_dir, gguf_path.name))
        tolerances.append(gguf_tolerance)
    with tempfile.TemporaryDirectory(dir=output_dir) as work:
        hf, *rest = verify_in_fresh_process(targets, inputs, reference, tolerances, Path(work))
    gg = rest[0] if rest else None
    reference_loss = per_sample_loss(reference, inputs)

    metrics = {
        "recipe": "merge_export", "adapter_path": str(adapter_dir), "base_model": base, "device": device_name(device),
        "device_type": device.type, "world_size": 1,
        "trained_on_4bit": trained_on_4bit, "trained_on_4bit_detected_from": detected_from,
        "merge_dtype": "fp32", "export_dtype": dtype_name, "lora_layers_merged": lora_layers,
        "lora_r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
        "merge_seconds": round(merge_seconds, 3), "merged_dir": str(merged_dir), "merged_bytes": folder_bytes(merged_dir),
        "adapter_copy": str(adapter_copy) if adapter_copy else None,
        "adapter_bytes": folder_bytes(adapter_dir), "stop_token_ids": stop_ids,
        "verification_samples": len(ids), "verification_dataset": cfg.sample_dataset_path,
        "merged_vs_adapter": {k: v for k, v in hf.items() if k != "per_sample_loss"},
        "max_abs_logit_diff": hf["max_abs_logit_diff"], "tolerance": tolerance,
        **metrics_4bit,
        "gguf": None if gg is None else {
            "path": str(gguf_path), "type": cfg.gguf_type, "bytes": gguf_path.stat().st_size,
            "sha256": file_sha256(gguf_path), "tokenizer_pre": pre, "architecture": "llama",
            **{k: v for k, v in gg.items() if k != "per_sample_loss"}},
        "wall_seconds": round(time.time() - wall_start, 2), **memory.report(),
    }
    failures = []
    if not hf["passed"]:
        failures.append(f"merged model: max |logit diff| {hf['max_abs_logit_diff']:.3g} > tolerance {tolerance:g}")
    if not hf["tokenizer_ids_match"]:
        failures.append("merged tokenizer gives different token ids than the adapter's tokenizer")
    if gg and not gg["passed"]:
        failures.append(f"GGUF: max |logit diff| {gg['max_abs_logit_diff']:.3g} > tolerance {gguf_tolerance:g}")
    if gg and not gg["tokenizer_ids_match"]:
        failures.append("GGUF tokenizer (read back by transformers) gives different token ids")
    metrics["verified"] = not failures
    series = {"adapter (fp32, unmerged)": reference_loss, f"merged/ ({dtype_name})": hf["per_sample_loss"]}
    if gg:
        series[f"GGUF {cfg.gguf_type}"] = gg["per_sample_loss"]
    plot_losses(output_dir / "loss.png", series, f"merge_export: {adapter_dir} on {base_dir.name}")
    write_json(output_dir / "metrics.json", metrics)
    write_manifest(output_dir, cfg, [cfg.sample_dataset_path, str(adapter_dir)], started,
                   "finished" if not failures else "failed")
    summary = {"max_abs_logit_diff": hf["max_abs_logit_diff"], "top1_agreement": hf["top1_agreement"],
               "gguf_max_abs_logit_diff": gg["max_abs_logit_diff"] if gg else None, "verified": not failures}
    log.info("done: %s", json.dumps(summary))
    if failures:
        raise checks.CheckFailed("verification failed: " + "; ".join(failures) + f" (figures in {output_dir / 'metrics.json'})")
    return metrics


def export_generation_config(base_dir: Path, config, tokenizer, stop_ids: list[int]) -> GenerationConfig:
    """The base's generation config, made to stop at the chat template's end-of-turn token and to have a pad id.

    A generation config whose eos_token_id lacks the end-of-turn token (e.g. a base model's
    <|endoftext|> on a ChatML fine-tune) makes vLLM, TGI and generate() run every reply to max_tokens.
    """
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


def compare_with_4bit_training(base_dir: Path, adapter_dir: Path, inputs: dict, reference: torch.Tensor,
                               device: torch.device) -> dict:
    """For a QLoRA adapter: logits of the model as trained (NF4 base + adapter) against the adapter on the
    unquantized base, i.e. what merging into the unquantized base changes. Information, not a gate."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    try:
        q = AutoModelForCausalLM.from_pretrained(base_dir, device_map={"": str(device)}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
        q = PeftModel.from_pretrained(q, adapter_dir).eval()
        with torch.no_grad():
            logits = q(input_ids=inputs["input_ids"].to(device),
                       attention_mask=inputs["attention_mask"].to(device)).logits.float().cpu()
        diff = (logits[inputs["attention_mask"].bool()] - reference).abs()
        del q
        return {"max_abs_logit_diff_vs_4bit_trained": diff.max().item(),
                "mean_abs_logit_diff_vs_4bit_trained": diff.mean().item()}
    except Exception as e:  # information only: never block a merge on it
        log.warning("could not run the 4-bit (as-trained) comparison: %s", e)
        return {"max_abs_logit_diff_vs_4bit_trained": None, "four_bit_comparison_error": str(e)[:300]}


if __name__ == "__main__":
    config = parse_config(Config)
    try:
        main(config)
    except (checks.CheckFailed, DataError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
