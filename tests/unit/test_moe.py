"""LoRA on Mixture-of-Experts models (common/moe.py) on tiny random Mixtral, Qwen2-MoE and OLMoE models: the
`experts` choice reaches every routed expert, the router stays frozen unless asked, targets that would leave the
experts frozen stop with the fix, the one-batch check proves each expert the router used gets a gradient, and the
router's load-balancing loss and expert load are what transformers computes."""
import pytest
import torch

from common import moe
from common.checks import CheckFailed, check_gradient_flow, check_lora_targets
from common.models import LoraOptions, attach_lora

ARCHS = ("mixtral", "qwen2_moe", "olmoe")
DENSE_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: moe.build_tiny_moe(arch, root / arch) for arch in ARCHS}


def lora_model(path, targets, train_router=False, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opts = LoraOptions(lora_r=4, lora_alpha=8, lora_target_modules=targets, lora_train_router=train_router)
    return attach_lora(model, opts), opts


def batch(tokens=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (2, tokens // 2), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_choice_reaches_every_expert_and_leaves_the_router_frozen(tiny_moe, arch):
    model, opts = lora_model(tiny_moe[arch], ["q_proj", "v_proj", "experts"])
    counts = moe.check_expert_targets(model, opts.lora_targets)
    assert counts == {"expert_lora_modules": 4, "router_lora_modules": 0, "num_experts": 4, "experts_per_token": 2,
                      "moe_layers": 2}  # gate_up_proj and down_proj in each of the 2 MoE layers
    names = trainable(model)
    assert not [n for n in names if ".gate." in n or "shared_expert_gate" in n]
    wrappers = moe.expert_lora_layers(model)
    assert sorted(w.parameter_name for w in wrappers.values()) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    # peft stacks the factors per expert: lora_A [experts x r, in], lora_B [out, r x experts]; rank r per expert
    for w in wrappers.values():
        assert w.lora_A["default"].weight.shape[0] == 4 * 4 and w.lora_B["default"].weight.shape[1] == 4 * 4
    assert check_lora_targets(model, opts.lora_targets) == 4 + 4  # q, v + 2 ParamWrappers (nested) per layer


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_means_linears_plus_experts_router_only_when_asked(tiny_moe, arch):
    model, opts = lora_model(tiny_moe[arch], ["all-linear"])
    assert moe.check_expert_targets(model, opts.lora_targets)["router_lora_modules"] == 0
    assert not [n for n in trainable(model) if ".gate.lora" in n or "shared_expert_gate" in n]
    assert len(moe.expert_lora_layers(model)) == 4
    routed, ropts = lora_model(tiny_moe[arch], ["all-linear"], train_router=True)
    got = moe.check_expert_targets(routed, ropts.lora_targets, train_router=True)
    assert got["router_lora_modules"] == (4 if arch == "qwen2_moe" else 2)  # + Qwen's shared_expert_gate
    assert routed.get_base_model().config.output_router_logits is True  # a learning router keeps its balancing loss


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_dense_targets_that_leave_the_experts_frozen_stop_with_the_fix(tiny_moe, arch):
    # peft 0.21 attaches these without complaint: attention (Qwen2-MoE: + the shared expert) trains, experts stay frozen
    model, opts = lora_model(tiny_moe[arch], DENSE_DEFAULT)
    assert not moe.expert_lora_layers(model)
    with pytest.raises(CheckFailed, match=r"LoRA would leave the experts frozen: .*names gate_proj up_proj down_proj.*"
                                          r"Fix: add `experts` to --lora_target_modules"):
        check_lora_targets(model, opts.lora_targets)


def test_qwen2_moe_shared_expert_alone_is_named_by_its_dotted_names(tiny_moe):
    targets = ["q_proj", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
    model, opts = lora_model(tiny_moe["qwen2_moe"], targets)
    assert check_lora_targets(model, opts.lora_targets) == 2 * 4 and not moe.expert_lora_layers(model)


def test_olmoe_dense_names_reach_the_experts_through_peft_and_pass(tiny_moe):
    model, opts = lora_model(tiny_moe["olmoe"], DENSE_DEFAULT)  # peft maps OLMoE's pre-fusion names onto the experts
    assert moe.check_expert_targets(model, opts.lora_targets)["expert_lora_modules"] == 4


def test_a_router_named_without_train_router_is_refused(tiny_moe):
    model, opts = lora_model(tiny_moe["mixtral"], ["q_proj", "gate", "experts"])  # peft maps Mixtral's `gate` to the router
    with pytest.raises(CheckFailed, match="--lora_train_router is off"):
        moe.check_expert_targets(model, opts.lora_targets)


def test_experts_on_a_dense_model_and_bad_variants_are_refused(tiny_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(CheckFailed, match="--lora_target_modules experts: llama has no routed experts"):
        attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraOptions(lora_target_modules=["q_proj", "experts"]))
    with pytest.raises(CheckFailed, match="--lora_dropout 0.05 with `experts`.*use --lora_dropout 0"):
        LoraOptions(lora_target_modules=["experts"], lora_dropout=0.05).check_lora_variants()
    with pytest.raises(CheckFailed, match="--use_dora with --lora_train_router"):
        LoraOptions(lora_train_router=True, use_dora=True).check_lora_variants()
    # recipes that build their LoraConfig without the model (dpo, ppo, reward_model, fsdp2_lora) refuse the MoE options
    with pytest.raises(CheckFailed, match="this recipe attaches LoRA without resolving MoE targets"):
        LoraOptions(lora_target_modules=["q_proj", "experts"]).lora_config()


# ---------------------------------------------------------------------------------------------
# The one-batch gradient check on MoE: every expert the router used gets a gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_gradient_check_passes_and_names_experts_that_got_tokens(tiny_moe, arch, caplog):
    model, _ = lora_model(tiny_moe[arch], ["q_proj", "v_proj", "experts"])
    with caplog.at_level("INFO", logger="common.checks"):
        assert check_gradient_flow(model, batch()) > 0
    assert "MoE: experts that got tokens reaching the loss in this batch (per layer, of 4)" in caplog.text
    assert all(p.grad is None for p in model.parameters())


def route_to_first_two_experts(module, args, out):
    """Router forward hook: every token to experts 0 and 1 (logits of 2 and 3 at -1e9)."""
    logits = out[0].clone()
    logits[:, 2:] = -1e9
    top, idx = logits.float().softmax(-1).topk(2, dim=-1)
    return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx


def test_an_expert_without_a_token_may_have_zero_gradient_but_one_with_tokens_may_not(tiny_moe):
    model, _ = lora_model(tiny_moe["mixtral"], ["q_proj", "v_proj", "experts"])
    for layer in model.get_base_model().model.layers:
        layer.mlp.gate.register_forward_hook(route_to_first_two_experts)
    model.train()
    recorder = moe.RouterRecorder(model)
    model(**batch()).loss.backward()
    recorder.remove()
    assert len(recorder.hits) == 2 and all(h[2:].sum() == 0 and h[:2].sum() > 0 for h in recorder.hits.values())
    assert moe.experts_without_gradient(model, recorder) == []
    for w in moe.expert_lora_layers(model).values():
        g = w.lora_B["default"].weight.grad.reshape(w.lora_B["default"].weight.shape[0], -1, 4).abs().sum(dim=(0, 1))
        assert (g[:2] > 0).all() and (g[2:] == 0).all()  # the unused experts' LoRA columns: exactly zero
    model.zero_grad(set_to_none=True)
    assert check_gradient_flow(model, batch()) > 0        # zero for starved experts is legitimate
    # an expert whose LoRA cannot learn although it got tokens: the check names it
    first = next(iter(moe.expert_lora_layers(model).values()))
    first.lora_B["default"].weight.requires_grad_(False)
    with pytest.raises(CheckFailed, match=r"experts the router sent tokens to got no LoRA gradient.*expert 0"):
        check_gradient_flow(model, batch())


# ---------------------------------------------------------------------------------------------
# Router metrics: the aux loss transformers returns, expert load per layer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_router_recorder_matches_the_models_own_aux_loss(tiny_moe, arch):
    model, _ = lora_model(tiny_moe[arch], ["q_proj", "v_proj", "experts"])
    model.train()
    recorder = moe.RouterRecorder(model)
    b = {k: v for k, v in batch(64).items() if k != "attention_mask"}
    out = model(**b, output_router_logits=True)
    recorder.remove()
    assert recorder.aux_losses == [pytest.approx(float(out.aux_loss), rel=1e-6)]
    m = recorder.metrics()
    assert m["routed_tokens"] == 64 and m["num_experts"] == 4 and m["experts_per_token"] == 2
    for layer in m["layers"].values():
        assert sum(layer["expert_load"]) == pytest.approx(1.0, abs=1e-3)
        assert layer["max_over_mean"] == pytest.approx(max(layer["expert_load"]) / 0.25, abs=1e-3)
    assert sum(int(h.sum()) for h in recorder.hits.values()) == 2 * 64 * 2  # layers x tokens x top-k
    model.eval()  # eval passes (evaluation, generation) are not counted
    recorder = moe.RouterRecorder(model)
    with torch.no_grad():
        model(**b)
    assert recorder.metrics() == {}


def test_only_tokens_that_reach_the_loss_oblige_an_expert_to_get_a_gradient(tiny_moe):
    # labels on the first 8 positions only: with causal attention, later tokens cannot move the loss, so the
    # experts that only they use (2 and 3 here) legitimately get no gradient even though the router used them
    model, _ = lora_model(tiny_moe["mixtral"], ["q_proj", "v_proj", "experts"])
    seq = 24

    def by_position(module, args, out):
        logits = out[0].clone()
        late = (torch.arange(logits.shape[0]) % seq) >= 8
        logits[late, :2] = -1e9
        logits[~late, 2:] = -1e9
        top, idx = logits.float().softmax(-1).topk(2, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx

    for layer in model.get_base_model().model.layers:
        layer.mlp.gate.register_forward_hook(by_position)
    b = batch(2 * seq)
    b["labels"] = b["labels"].clone()
    b["labels"][:, 8:] = -100
    model.train()
    recorder = moe.RouterRecorder(model, gradient_path=True)
    model(**b).loss.backward()
    recorder.remove()
    for block in recorder.hits:
        assert (recorder.hits[block] > 0).all()                                 # all 4 experts got tokens
        assert (recorder.hits_on_path[block][:2] > 0).all() and (recorder.hits_on_path[block][2:] == 0).all()
    assert moe.experts_without_gradient(model, recorder) == []
    model.zero_grad(set_to_none=True)
    assert check_gradient_flow(model, b) > 0
