"""common.lora_fast: peft's LoRA forward with the scale folded into the rank-r intermediate, and the cheaper CPU
dropout mask. Each is checked against peft's own layer on the tiny model: same outputs and gradients, the same
fallbacks, the same saved adapter."""
import copy
import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.helpers import disable_input_dtype_casting
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from common.lora_fast import LEVELS, CpuDropout, FusedLoraLinear, keep_mask, speed_up_lora, use_cpu_dropout
from common.models import LoraOptions, attach_lora

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 23, 42, 77, 3, 11, 64, 8, 19, 2]])


def peft_model(tiny_dir, dtype=torch.float32, **lora):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora))
    with torch.no_grad():  # peft starts B at zero, which would hide any error in the adapter path
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


def loss_and_grads(model, autocast=False, ids=IDS):
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), disable_input_dtype_casting(model):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach().float(), grads


def fused_copy(model):
    fast = copy.deepcopy(model)
    counts = speed_up_lora(fast)
    assert counts["fused_lora_linear"] == 4 * fast.config.num_hidden_layers
    return fast


def test_the_fused_forward_gives_peft_loss_and_gradients(tiny_dir):
    model = peft_model(tiny_dir)
    loss, logits, grads = loss_and_grads(model)
    fast = fused_copy(model)
    assert all(type(m) is FusedLoraLinear for m in fast.modules() if isinstance(m, PeftLoraLinear))
    fast_loss, fast_logits, fast_grads = loss_and_grads(fast)
    assert abs(fast_loss.item() - loss.item()) < 1e-5
    assert torch.allclose(fast_logits, logits, atol=1e-4)
    assert grads.keys() == fast_grads.keys() and len(grads) == 8 * model.config.num_hidden_layers
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name  # B is non-zero, so A's gradient is too
        assert torch.allclose(fast_grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4), name


def test_under_bf16_autocast_the_fused_forward_is_as_close_to_fp32_as_peft(tiny_dir):
    """bf16 rounds differently (one rounding less in the fused add): both sit the same distance from fp32."""
    model = peft_model(tiny_dir)
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(100))
    loss, _, grads = loss_and_grads(model, ids=ids)
    peft_loss, _, peft_grads = loss_and_grads(model, autocast=True, ids=ids)
    fast_loss, _, fast_grads = loss_and_grads(fused_copy(model), autocast=True, ids=ids)
    assert abs(fast_loss - loss) <= 2 * abs(peft_loss - loss) + 1e-3
    peft_error, fast_error = (torch.stack([(g[n] - grad).norm() / grad.norm() for n, grad in grads.items()])
                              for g in (peft_grads, fast_grads))
    assert peft_error.max() < 0.05  # bf16 is close to fp32 here, so the comparison means something
    assert fast_error.max() < 0.05 and fast_error.mean() <= 1.25 * peft_error.mean(), (fast_error, peft_error)


def test_the_fused_forward_leaves_everything_else_to_peft(tiny_dir):
    """Merged, adapters disabled, two active adapters, DoRA: peft's forward, so the same logits."""
    model = peft_model(tiny_dir)
    model.eval()
    fast = fused_copy(model)
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)
        with fast.disable_adapter(), model.disable_adapter():
            assert torch.allclose(fast(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-6)
        base = model.get_base_model()
        fast.merge_adapter(), model.merge_adapter()
        assert torch.allclose(fast(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)
        fast.unmerge_adapter(), model.unmerge_adapter()
        assert base is model.get_base_model()
    dora = peft_model(tiny_dir, use_dora=True)
    dora.eval()
    fast_dora = fused_copy(dora)
    with torch.no_grad():
        assert torch.allclose(fast_dora(input_ids=IDS).logits, dora(input_ids=IDS).logits, atol=1e-5)


def test_a_fused_model_saves_the_adapter_stock_peft_loads(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir),
                        LoraOptions(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=TARGETS))
    assert any(type(m) is FusedLoraLinear for m in model.modules())  # attach_lora applies it
    assert sum(type(m) is CpuDropout for m in model.modules()) == 4 * model.config.num_hidden_layers
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1 and config["r"] == 4
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
    assert not any(type(m) is FusedLoraLinear for m in stock.modules())
    stock.eval()
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=IDS).logits, expected, atol=1e-5)


def test_the_keep_mask_is_bernoulli_with_the_asked_probability_in_each_quarter():
    torch.manual_seed(0)
    p = 0.05
    mask = keep_mask((1000, 1001), p)  # not a multiple of 4 elements
    assert mask.shape == (1000, 1001) and mask.dtype == torch.bool
    dropped = 1 - mask.float()
    expected = round(p * LEVELS) / LEVELS
    assert abs(expected - p) < 1 / LEVELS
    assert abs(dropped.mean().item() - expected) < 1e-3  # 1e6 draws: std 2.2e-4
    quarters = dropped.flatten()[:1000 * 1000].view(-1, 4).mean(0)  # each 16-bit quarter of a 64-bit draw
    assert (quarters - expected).abs().max() < 2e-3, quarters
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 1001), p), mask)  # torch's seeded generator: reproducible
    assert not torch.equal(keep_mask((1000, 1001), p), mask)


def test_cpu_dropout_scales_the_kept_values_and_their_gradient():
    torch.manual_seed(1)
    x = torch.randn(64, 300, requires_grad=True)
    dropout = CpuDropout(0.25)
    y = dropout(x)
    kept = y != 0
    assert 0.7 < kept.float().mean().item() < 0.8
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / 0.75)
    dropout.eval()
    assert torch.equal(dropout(x), x)
    assert torch.equal(CpuDropout(0.0)(x), x)
    assert CpuDropout(1.0)(x).abs().sum() == 0


def test_use_cpu_dropout_swaps_only_lora_dropouts_with_a_probability(tiny_dir):
    with_dropout = peft_model(tiny_dir, lora_dropout=0.05)
    assert use_cpu_dropout(with_dropout) == 4 * with_dropout.config.num_hidden_layers
    assert all(m.p == 0.05 for m in with_dropout.modules() if isinstance(m, CpuDropout))
    assert use_cpu_dropout(peft_model(tiny_dir, lora_dropout=0.0)) == 0  # peft's nn.Identity stays
