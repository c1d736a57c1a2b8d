"""Every fail-fast check fires on a planted fault, and passes on the healthy setup."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from common import checks
from common.checks import CheckFailed
from common.collator import CausalLMCollator, tokenize_sft

CONV = [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Orrin."}]


def lora_model(tiny_dir, targets=("q_proj", "v_proj"), **lora_kwargs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM",
                                            **lora_kwargs))


def batch_for(tok, pad=None):
    feats, _ = tokenize_sft([("t:1", CONV, {}), ("t:2", CONV + CONV, {})], tok, max_length=128)
    return CausalLMCollator(tok.pad_token_id if pad is None else pad)(feats)


# --- the severed graph (seed 000, episodes 10-13) ----------------------------------------------
def test_severed_graph_is_reproduced_and_the_input_grad_fix_repairs_it(tiny_dir, tiny_tokenizer):
    model = lora_model(tiny_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # transformers 5 adds the hook itself; remove it to show the failure
    model.train()
    batch = batch_for(tiny_tokenizer)
    loss = model(**batch).loss
    assert not loss.requires_grad and loss.grad_fn is None
    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad and does not have a grad_fn"):
        loss.backward()
    with pytest.raises(CheckFailed, match="graph is severed.*enable_input_grads"):
        checks.check_gradient_flow(model, batch)

    checks.enable_input_grads(model)
    assert checks.check_gradient_flow(model, batch) == 4 * 2  # 2 layers x (q, v) x (A, B)
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradient behind


def test_fallback_hook_fixes_models_without_enable_input_require_grads(tiny_dir, tiny_tokenizer):
    model = lora_model(tiny_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    inner = model.base_model.model

    class NoHelper:  # a model object without enable_input_require_grads
        def get_input_embeddings(self):
            return inner.get_input_embeddings()

    handle = checks.enable_input_grads(NoHelper())
    assert handle is not None
    assert checks.check_gradient_flow(model, batch_for(tiny_tokenizer)) == 8
    handle.remove()


def test_gradient_flow_flags_trainable_tensors_off_the_loss_path(tiny_dir, tiny_tokenizer):
    model = lora_model(tiny_dir)
    model.base_model.model.lm_head.weight.requires_grad_(True)  # fine: on the path
    model.base_model.model.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(CheckFailed, match=r"1 trainable tensors got no gradient.*stray"):
        checks.check_gradient_flow(model, batch_for(tiny_tokenizer))


def test_gradient_flow_flags_a_non_finite_loss(tiny_dir, tiny_tokenizer):
    model = lora_model(tiny_dir)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(CheckFailed, match="first batch's loss is nan"):
        checks.check_gradient_flow(model, batch_for(tiny_tokenizer))


# --- LoRA placement and parameter counts ------------------------------------------------------
def test_lora_targets_checked_against_the_request(tiny_dir):
    model = lora_model(tiny_dir, targets=("q_proj",))
    assert checks.check_lora_targets(model, ["q_proj"]) == 2
    with pytest.raises(CheckFailed, match=r"\['v_proj'\] matched no layer.*'k_proj'.*all-linear"):
        checks.check_lora_targets(model, ["q_proj", "v_proj"])
    partial = lora_model(tiny_dir, targets=("q_proj",), layers_to_transform=[0])
    with pytest.raises(CheckFailed, match=r"only part of the requested layers.*'q_proj': \(1, 2\)"):
        checks.check_lora_targets(partial, ["q_proj"])
    full = lora_model(tiny_dir, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert checks.check_lora_targets(full, "all-linear") == 14


def test_parameter_counts_and_nothing_trainable(tiny_dir):
    model = lora_model(tiny_dir)
    trainable, total = checks.log_parameter_counts(model)
    # q: 64->64, v: 64->32 with r=4: A is r x in, B is out x r; 2 layers
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert total == base + trainable
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(CheckFailed, match="no parameter requires grad"):
        checks.log_parameter_counts(model)


# --- labels and EOS ---------------------------------------------------------------------------
def test_labels_check_passes_and_reports_fraction(tiny_tokenizer):
    batch = batch_for(tiny_tokenizer)
    frac = checks.check_labels(batch, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    labelled = int((batch["labels"] != -100).sum())
    assert frac == pytest.approx(labelled / int(batch["attention_mask"].sum()))


def test_all_masked_row_is_an_error(tiny_tokenizer):
    batch = batch_for(tiny_tokenizer)
    batch["labels"][1] = -100
    with pytest.raises(CheckFailed, match=r"batch rows \[1\] have no labelled token"):
        checks.check_labels(batch, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)


def test_pad_equal_eos_with_labels_from_input_ids_never_learns_eos(tiny_tokenizer):
    """The classic bug: pad = eos and labels = input_ids with pad positions masked."""
    eos = tiny_tokenizer.eos_token_id
    batch = batch_for(tiny_tokenizer, pad=eos)
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == eos, -100)
    with pytest.raises(CheckFailed, match=r"never have EOS.*generate forever.*pad token equals the EOS token"):
        checks.check_labels(batch, eos, eos)
    # the collator's mask-based labels with the same pad == eos are fine
    assert checks.check_labels(batch_for(tiny_tokenizer, pad=eos), eos, eos) > 0


# --- chat template ----------------------------------------------------------------------------
def test_chat_template_checks(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    checks.check_chat_template(tok)
    original = tok.chat_template
    tok.chat_template = None
    with pytest.raises(CheckFailed, match="has no chat template"):
        checks.check_chat_template(tok)
    tok.chat_template = original.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(CheckFailed, match="no {% generation %} markers"):
        checks.check_chat_template(tok)
    # EOS outside the generation block: the model would never learn to stop
    tok.chat_template = original.replace("{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
                                         "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
    assert tok.chat_template != original
    with pytest.raises(CheckFailed, match="without the EOS token"):
        checks.check_chat_template(tok)


# --- device, precision, world size ------------------------------------------------------------
def test_device_and_world_size_checks(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(CheckFailed, match="--device cuda was requested but torch sees no GPU"):
            checks.resolve_device("cuda")
    assert checks.resolve_device("cpu").type == "cpu"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert checks.check_world_size(1) == 1
    with pytest.raises(CheckFailed, match="world size is 1 but 4 was requested"):
        checks.check_world_size(4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CheckFailed, match="world size is 2 but 1 was requested"):
        checks.check_world_size(1)


def test_precision_refuses_what_the_hardware_lacks(monkeypatch):
    from common import models

    cpu = torch.device("cpu")
    with pytest.raises(CheckFailed, match="fp16 on CPU"):
        models.resolve_precision("fp16", cpu)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    with pytest.raises(CheckFailed, match="bf16 requested but this cpu has no bf16 support"):
        models.resolve_precision("bf16", cpu)
    assert models.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.resolve_precision("auto", cpu) == "bf16"


def test_model_on_the_wrong_device_is_refused(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    checks.check_model_device(model, torch.device("cpu"))
    with pytest.raises(CheckFailed, match=r"model parameters are on \['cpu'\] but the run uses cuda"):
        checks.check_model_device(model, torch.device("cuda"))


# --- bitsandbytes 4-bit on CPU: eval-mode forward repacks weights -----------------------------
def qlora_tiny(tiny_dir):
    from common.models import attach_lora

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=q, device_map={"": "cpu"})
    return attach_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"], quantized=True, gradient_checkpointing=False)


def test_cpu_4bit_eval_forward_corrupts_gradients_and_is_caught(tiny_dir, tiny_tokenizer):
    from bitsandbytes.nn import Linear4bit

    model = qlora_tiny(tiny_dir)
    batch = batch_for(tiny_tokenizer)
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, nothing to guard")
    checks.check_gradient_flow(model, batch)
    checks.check_4bit_weights_unpacked(model)

    guard = checks.Cpu4bitEvalGuard(model)
    model.eval()
    with torch.no_grad(), pytest.raises(CheckFailed, match="eval-mode forward through a bitsandbytes 4-bit layer"):
        model(**batch)
    guard.remove()
    checks.check_4bit_weights_unpacked(model)  # the guard stopped it before anything was repacked

    # Without the guard: the eval forward repacks, and the 4-bit path then passes no gradient to its input
    with torch.no_grad():
        model(**batch)
    model.train()
    with pytest.raises(CheckFailed, match="repacked for CPU inference"):
        checks.check_4bit_weights_unpacked(model)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is None  # silently wrong: no error, no gradient


# --- version drift (seed 000, episode 3) --------------------------------------------------------
def test_version_drift_names_the_package_and_both_versions(tmp_path):
    import transformers

    from common.run_files import version_drift

    from conftest import REPO

    assert version_drift(REPO / "requirements.txt") == []  # this environment matches the pins
    req = tmp_path / "requirements.txt"
    req.write_text(f"transformers==4.28.1\npeft=={__import__('peft').__version__}\nnot-a-package==1.0\n")
    assert version_drift(req) == [f"transformers {transformers.__version__} (pinned 4.28.1)",
                                  "not-a-package not installed (pinned 1.0)"]


# --- peak memory on CPU ----------------------------------------------------------------------------
def test_peak_rss_is_this_process_not_the_parent_that_started_it():
    """ru_maxrss survives fork+exec on Linux: a child of a 600 MB parent reports >= 600 MB."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    ballast = bytearray(600 * 2**20)  # touch 600 MB in this (parent) process
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = ("import json, resource; from common.run_files import PeakMemory; "
            "print(json.dumps({'ours': PeakMemory.rss_peak()[0], "
            "'ru_maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["ru_maxrss"] >= 600 * 2**20       # inherited from this process
    assert seen["ours"] < 300 * 2**20             # the child's own peak: an interpreter, a few tens of MB
    del ballast


def test_busy_cpu_warning_names_the_load_and_the_fix(monkeypatch):
    """CHRONICLES 96: several OpenMP threads on cores other jobs fill ran 10-20x slower; the run says so at start."""
    cores = len(__import__("os").sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (cores + 2.0, 1.0, 1.0))
    message = checks.busy_cpu_warning(torch.device("cpu"))
    assert message and f"load average {cores + 2.0:.1f} on {cores} cores" in message and "OMP_NUM_THREADS=1" in message
    assert checks.busy_cpu_warning(torch.device("cuda")) is None
    monkeypatch.setattr("os.getloadavg", lambda: (cores - 0.5, 1.0, 1.0))
    assert checks.busy_cpu_warning(torch.device("cpu")) is None  # idle enough
    monkeypatch.setattr("os.getloadavg", lambda: (cores + 2.0, 1.0, 1.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert checks.busy_cpu_warning(torch.device("cpu")) is None  # one thread: nothing to spin against
