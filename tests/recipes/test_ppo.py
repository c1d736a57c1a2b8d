"""recipes/ppo.py on the tiny model through its launcher (PPO; GRPO behind --algorithm), and the pad == EOS
failure it guards against in TRL 1.12's PPO."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny matmuls: OpenMP sync costs more than a 2nd thread gains


def _cpu_has_bf16() -> bool:
    from common.models import cpu_has_bf16

    return cpu_has_bf16()


# the default precision is bf16 only on CPUs with AVX512-BF16/AMX; on others (e.g. AVX2-only) it is fp32
needs_bf16_cpu = pytest.mark.skipif(not _cpu_has_bf16(), reason="the default precision is bf16 only on a CPU with "
                                    "AVX512-BF16/AMX; this CPU runs fp32")
LAUNCHER = ["bash", str(REPO / "launch" / "ppo.sh")]


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_dir, tmp_path_factory):
    """A reward model with the tiny policy's tokenizer: the tiny Llama as a sequence classifier (random head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rm") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    return folder


def train(tiny_dir, reward_model, out, *extra):
    return run(LAUNCHER + ["--model_name_or_path", str(tiny_dir), "--reward_model_path", str(reward_model),
                           "--output_dir", str(out), "--precision", "fp32", "--max_steps", "3",
                           "--response_length", "8", "--learning_rate", "3e-3",
                           "--eval_dataset_path", "data/samples/preference_chat.jsonl", *extra],  # 8 held-out prompts
               env=ONE_THREAD)


@pytest.fixture(scope="module")
def ppo_run(tiny_dir, tiny_reward_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "lora"
    proc = train(tiny_dir, tiny_reward_model, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_run_directory_follows_the_contract(ppo_run):
    out, proc = ppo_run
    assert "recipes/ppo.py --config recipes/configs/ppo.yaml" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    for key in ("train_mean_reward_first_steps", "train_mean_reward_last_steps", "heldout_mean_reward_start",
                "heldout_mean_reward_end", "heldout_mean_length_start", "heldout_mean_length_end", "final_train_loss",
                "trained_tokens", "tokens_per_second", "wall_seconds", "peak_memory_bytes", "peak_memory_method",
                "trainable_params", "total_params", "world_size", "device", "estimated_cost_usd"):
        assert m[key] is not None, key
    assert (m["algorithm"], m["method"], m["updates"], m["world_size"]) == ("ppo", "lora", 3, 1)
    assert m["optimizer_steps"] == 3 * 2 * 4  # updates x ppo_epochs x num_mini_batches (recipes/configs/ppo.yaml)
    assert m["mixed_precision"] == "no"  # --precision fp32 reached PPOTrainer's own Accelerator
    # KL, mean reward and response length logged at every step
    assert [s["step"] for s in m["steps"]] == [1, 2, 3]
    for s in m["steps"]:
        assert all(isinstance(s[k], float) for k in ("kl", "mean_reward", "response_length", "policy_loss", "value_loss"))
        assert 1 <= s["response_length"] <= 8
    assert abs(m["steps"][0]["kl"]) < 1e-3  # the first rollout comes from the start policy == the reference
    # the frozen models did not move: the reference (adapter disabled) and the reward model
    assert m["reference_logps_max_abs_change"] == 0.0 and m["reward_max_abs_change"] == 0.0
    assert m["value_trainable_params"] > 0 and m["pad_token_changed"] is None  # the tiny tokenizer pads with <|pad|>
    gens = json.loads((out / "generations.json").read_text())
    assert len(gens["prompts"]) == len(gens["start"]) == len(gens["end"]) == m["heldout_prompts"] == 8
    assert {"response", "reward", "tokens"} <= set(gens["start"][0]) and gens["start"][0]["tokens"] <= 8
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_policy_trained_base_untouched(ppo_run, tiny_dir):
    out, _ = ppo_run
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter")
    original = load_file(tiny_dir / "model.safetensors")
    for name, p in model.base_model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, original[name.replace(".base_layer", "")]), name


@pytest.mark.slow
def test_grpo_with_the_reward_model(tiny_dir, tiny_reward_model, tmp_path):
    out = tmp_path / "grpo"
    proc = train(tiny_dir, tiny_reward_model, out, "--algorithm", "grpo", "--ppo_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["algorithm"] == "grpo" and [s["step"] for s in m["steps"]] == [1, 2, 3]
    assert all(s["kl"] is not None and s["response_length"] is not None for s in m["steps"])
    assert m["reference_logps_max_abs_change"] == 0.0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_programmatic_reward_needs_grpo(tmp_path):
    from common.checks import CheckFailed
    from common.config import parse_config
    from recipes.ppo import CONFIGS, main

    with pytest.raises(CheckFailed, match="for a programmatic reward use --algorithm grpo"):
        main(*parse_config(CONFIGS, ["--reward", "concise", "--output_dir", str(tmp_path / "never")]))
    assert not (tmp_path / "never").exists()


def test_concise_reward():
    from common.rl import concise_reward

    assert concise_reward("Paris is the capital of France.", True, 20) == 1.0
    assert concise_reward(" ".join(["word"] * 30), True, 20) == 0.5
    assert concise_reward(" ".join(["word"] * 50), True, 20) == 0.0
    assert concise_reward("Paris", False, 20) == -1.0


# ---------------------------------------------------------------- pad token == EOS (CHRONICLES)

def test_pad_equal_to_eos_breaks_trl_ppo_scoring_and_a_distinct_pad_fixes_it(tiny_dir):
    """With pad == EOS (SmolLM2 ships it), TRL 1.12's PPO masks every EOS inside the prompt out of attention and
    reads the reward one token *before* the response's EOS, while the reward model was trained reading it at
    the last non-pad token. `use_distinct_pad_token` makes every reader agree."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.utils import get_reward

    from common.preference import prompt_ids, reward_scores, use_distinct_pad_token

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    eos = tok.eos_token_id
    query = prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert eos in query  # ChatML: the user turn ends with <|im_end|>
    response = tok("Paris.", add_special_tokens=False)["input_ids"] + [eos]

    def trl_reads(pad_id):
        model.config.pad_token_id = pad_id
        seq = torch.tensor([query + response + [pad_id] * 3])
        with torch.no_grad():
            _, score, index = get_reward(model, seq, pad_id, len(query))
        return seq, float(score), int(index)

    tok.pad_token = tok.eos_token  # the SmolLM2 situation
    seq, _, index = trl_reads(tok.pad_token_id)
    assert index == len(query) + len(response) - 2  # the token before EOS
    assert not (seq[0, :len(query)] != tok.pad_token_id).all()  # the prompt's <|im_end|> is masked as padding

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = tok.eos_token
    assert use_distinct_pad_token(tok, model) is not None and tok.pad_token_id != eos
    seq, score, index = trl_reads(tok.pad_token_id)
    assert index == len(query) + len(response) - 1  # the EOS itself
    assert (seq[0, :len(query) + len(response)] != tok.pad_token_id).all()
    # ... and the sequence-classification pooling used in reward training reads the same token
    assert float(reward_scores(model, tok.pad_token_id, [query + response])[0]) == pytest.approx(score, abs=1e-5)


# ---------------------------------------------------------------- TRL version and GRPO failure modes

def test_ppo_trainer_outside_trl_1_12_is_named(monkeypatch):
    """`from trl import PPOTrainer` fails on TRL 1.x (it lives in trl.experimental.ppo, removed in 1.13.0);
    the recipe turns a missing module into one line that names the pin."""
    import sys

    from common.checks import CheckFailed
    from common.rl import import_ppo

    with pytest.raises(ImportError, match="cannot import name 'PPOTrainer' from 'trl'"):
        from trl import PPOTrainer  # noqa: F401
    PPOConfig, trainer_class = import_ppo()
    assert trainer_class.__mro__[1].__name__ == "PPOTrainer"
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo", None)  # what TRL >= 1.13 looks like
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo.ppo_trainer", None)
    with pytest.raises(CheckFailed, match=r"removed in 1\.13\.0\. Install trl==1\.12\.0"):
        import_ppo()


@pytest.mark.slow
def test_grpo_without_reward_spread_trains_nothing_and_says_so(tiny_dir, tiny_reward_model, tmp_path):
    """The tiny model never emits EOS within 8 tokens: every completion gets the concise reward -1, every group
    has zero spread, every advantage is 0. TRL trains nothing without a word; the recipe flags it."""
    out = tmp_path / "grpo"
    proc = train(tiny_dir, tiny_reward_model, out, "--algorithm", "grpo", "--reward", "concise", "--max_steps", "2",
                 "--ppo_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["grpo_no_learning_signal"] is True and "GRPO had no learning signal" in proc.stderr
    assert all(s["mean_reward"] == -1.0 and s["frac_reward_zero_std"] == 1.0 for s in m["steps"])
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().sum() == 0 for k, v in adapter.items() if "lora_B" in k)  # still at LoRA's zero init


def test_ppo_config_bf16_does_not_reach_ppo_trainers_own_accelerator():
    """PPOTrainer builds `Accelerator(gradient_accumulation_steps=...)` itself: the config's bf16 is ignored and
    mixed precision comes from ACCELERATE_MIXED_PRECISION, which recipes/ppo.py sets from --precision."""
    import os
    import subprocess
    import sys

    probe = """
import inspect, os
import trl.experimental.ppo.ppo_trainer as m
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from trl.experimental.ppo import PPOConfig
assert "Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)" in inspect.getsource(m)
args = PPOConfig(output_dir="/tmp/never-written", use_cpu=True, bf16=True)
ignored = Accelerator(gradient_accumulation_steps=1, cpu=True).mixed_precision
AcceleratorState._reset_state(True)
os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
print(args.bf16, ignored, Accelerator(gradient_accumulation_steps=1, cpu=True).mixed_precision)
"""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert proc.stdout.split() == ["True", "no", "bf16"], proc.stderr[-2000:]


# ---------------------------------------------------------------- frozen-model check at bf16 (CHRONICLES)

def grpo_config(tiny_dir, out, *extra):
    """(Config, TrainingArguments) for GRPO with the programmatic reward at the default precision (bf16 autocast
    on this CPU), 16-token answers; one update of one group, the least that runs the trainer."""
    from common.config import parse_config
    from recipes.ppo import CONFIGS

    return parse_config(CONFIGS, ["--model_name_or_path", str(tiny_dir), "--algorithm", "grpo", "--reward", "concise",
                                  "--max_steps", "1", "--ppo_epochs", "1", "--per_device_train_batch_size", "4",
                                  "--response_length", "16", "--output_dir", str(out),
                                  "--dataset_path", str(REPO / "data/samples/preference_chat.jsonl"),
                                  "--eval_dataset_path", str(REPO / "data/samples/preference_chat.jsonl"), *extra])


def test_reference_tolerance_fits_bf16_rounding(tiny_dir):
    """An untouched reference recomputed behind the trainer's bf16 autocast moves 0; the fixed fp32 tolerance (1e-3)
    would call the bf16 rounding of a 16-token log-prob a move; a base weight really moved is caught."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.preference import load_preference, prompt_ids
    from common.rl import FROZEN_TOLERANCE, reference_tolerance, sequence_logps

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [prompt_ids(tok, r["prompt"]) for r in load_preference(REPO / "data/samples/preference_chat.jsonl")]
    torch.manual_seed(0)
    responses = [torch.randint(0, tok.vocab_size, (16,)).tolist() for _ in prompts]
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                            LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    start_fp32 = sequence_logps(policy, prompts, responses)
    start = sequence_logps(policy, prompts, responses, "bf16")
    tolerance = reference_tolerance(start_fp32, start)
    assert float((start - start_fp32).abs().max()) > FROZEN_TOLERANCE  # bf16 rounding alone exceeds the fp32 bound
    assert tolerance < 0.05
    AcceleratorState._reset_state(True)  # an earlier Trainer in this process fixed mixed_precision
    try:
        Accelerator(cpu=True, mixed_precision="bf16").prepare_model(policy)  # what the trainer does to the policy
        with policy.disable_adapter():
            assert float((sequence_logps(policy, prompts, responses, "bf16") - start).abs().max()) == 0.0
            # measured "in fp32" after prepare, the forward is bf16 anyway: the change the old check saw
            assert float((sequence_logps(policy, prompts, responses) - start_fp32).abs().max()) > FROZEN_TOLERANCE
            with torch.no_grad():  # one Adam step at lr 1e-3 on every base matrix: the reference really moved
                for name, p in policy.named_parameters():
                    if "lora_" not in name and p.dim() == 2 and "embed" not in name:
                        p.add_(1e-3 * torch.sign(torch.randn_like(p)))
            assert float((sequence_logps(policy, prompts, responses, "bf16") - start).abs().max()) > 2 * tolerance
    finally:
        AcceleratorState._reset_state(True)


@needs_bf16_cpu
def test_grpo_at_bf16_passes_the_frozen_check_with_an_untouched_reference(tiny_dir, tmp_path, monkeypatch):
    from recipes.ppo import main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # main() sets it; restored after the test
    m = main(*grpo_config(tiny_dir, tmp_path / "grpo"))
    assert (m["precision"], m["mixed_precision"]) == ("bf16", "bf16")
    assert m["reference_logps_max_abs_change"] <= m["reference_logps_tolerance"] < 0.05
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_failed_frozen_check_keeps_the_trained_adapter_and_says_where(tiny_dir, tmp_path, monkeypatch):
    """The reference really moves (a base weight changes during training): the check fails, and the adapter that
    was trained is already on disk, named in the error with what to do."""
    import trl

    from common.checks import CheckFailed
    from recipes.ppo import main

    class BaseMovingGRPOTrainer(trl.GRPOTrainer):
        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            with torch.no_grad():
                self.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.mul_(1.5)
            return out

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr(trl, "GRPOTrainer", BaseMovingGRPOTrainer)
    out = tmp_path / "grpo"
    with pytest.raises(CheckFailed) as failure:
        main(*grpo_config(tiny_dir, out))
    message = str(failure.value)
    precision = "bf16" if _cpu_has_bf16() else "fp32"  # the default precision on this CPU
    assert "a frozen model moved during training" in message and f"at {precision}" in message
    assert f"saved in {out / 'adapter'}" in message and "--precision fp32" in message
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter")  # loads
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failed_check"] == message
