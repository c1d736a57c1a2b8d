"""Mixture-of-Experts models under LoRA: the experts and the router named on purpose, proof that the experts
train, and what the router did.

transformers 5 stores an MoE block's routed experts as fused 3D parameters (`mlp.experts.gate_up_proj`
[experts, 2 x inter, hidden], `mlp.experts.down_proj`) and its router as a custom module (`mlp.gate`), not as
nn.Linear layers. peft 0.21 reaches them only through `target_parameters` (a `ParamWrapper` per parameter,
LoRA factors stacked per expert: lora_A [experts x r, in], lora_B [out, r x experts]), and what a target list
gives differs per architecture (measured on tiny random models, peft 0.21.2):
  - `q_proj ... gate_proj up_proj down_proj` (the dense default): Mixtral and Qwen2-MoE keep every routed
    expert frozen (Qwen2-MoE trains its shared expert only); OLMoE gets the experts through peft's v4 name map;
  - `all-linear`: Mixtral and OLMoE get the experts AND the router; Qwen2-MoE gets neither (shared expert and
    its sigmoid gate only).
So here the choice is explicit: `experts` in --lora_target_modules puts LoRA on every routed expert's fused
parameters; `all-linear` means every Linear except the LM head, plus the experts; the router (top-k gate,
Qwen's shared_expert_gate) stays frozen unless --lora_train_router. `check_expert_targets` stops a run whose
targets name expert projections that reach no expert, and the one-batch gradient check
(common.checks.check_gradient_flow) requires a non-zero gradient on the LoRA factors of every expert that the
router sent a token to (an expert with no token in that batch legitimately gets none).

    python -m common.moe mixtral --output_dir DIR   # tiny random Mixtral + the repo's tiny tokenizer (seconds)
    python -m common.moe qwen2_moe --output_dir DIR  # ... Qwen2-MoE (shared expert); olmoe likewise
    python -m common.moe mixtral --size small --output_dir DIR   # 4 layers, 8 experts, 54M parameters
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.checks import CheckFailed

# what per-expert projections were called before the experts were fused (Mixtral w1/w3/w2, the others' MLP names)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
ROUTER_LINEARS = ("shared_expert_gate",)  # Qwen2-MoE's sigmoid gate on its shared expert: router-like, frozen by default


@dataclass
class MoeLayout:
    """Where a model keeps its routed experts and its routers (names relative to the MoE block)."""
    model_type: str
    num_experts: int
    top_k: int
    moe_layers: int
    expert_params: list[str] = field(default_factory=list)   # target_parameters: experts.gate_up_proj, experts.down_proj
    router_params: list[str] = field(default_factory=list)   # target_parameters of custom router modules: gate.weight
    router_linears: list[str] = field(default_factory=list)  # target_modules: Linear routers (gate on older layouts, shared_expert_gate)
    blocks: list[str] = field(default_factory=list)          # full names of the MoE blocks (parents of `experts`)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def moe_layout(model) -> MoeLayout | None:
    """The MoE layout of a (peft-wrapped or plain) causal LM, or None for a dense model."""
    base = _base(model)
    modules = dict(base.named_modules())
    blocks, expert_params, router_params, router_linears, num_experts = [], set(), set(), set(), 0
    for name, module in modules.items():
        if name.rsplit(".", 1)[-1] != "experts":
            continue
        inner = module
        while hasattr(inner, "base_layer") and not isinstance(inner, torch.nn.Linear):  # peft ParamWrappers nest
            inner = inner.base_layer
        fused = {p: t for p, t in inner.named_parameters(recurse=False) if t.ndim == 3}
        if not fused:
            continue
        blocks.append(name.rsplit(".", 1)[0])
        expert_params.update(f"experts.{p}" for p in fused)
        num_experts = next(iter(fused.values())).shape[0]
        parent = name.rsplit(".", 1)[0]
        gate = modules.get(f"{parent}.gate")
        if isinstance(gate, torch.nn.Linear):
            router_linears.add("gate")
        elif gate is not None:
            router_params.add("gate.weight")
        router_linears.update(r for r in ROUTER_LINEARS if f"{parent}.{r}" in modules)
    if not blocks:
        return None
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return MoeLayout(model_type=getattr(base.config, "model_type", "?"), num_experts=int(num_experts),
                     top_k=int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "top_k", 0) or 1),
                     moe_layers=len(blocks), expert_params=sorted(expert_params), router_params=sorted(router_params),
                     router_linears=sorted(router_linears), blocks=blocks)


def _names(targets) -> list[str]:
    return ["all-linear"] if targets == "all-linear" else list(targets)


def resolve_lora_targets(model, targets, train_router: bool = False) -> dict:
    """`targets` (Linear names, 'all-linear', and `experts`) -> LoraConfig's target_modules and target_parameters.

    Dense model: unchanged (`experts` and train_router are refused). MoE model: `experts` becomes the fused expert
    parameters; 'all-linear' every Linear but the LM head and the router Linears, plus the experts; the router
    only with `train_router`."""
    names, layout = _names(targets), moe_layout(model)
    if layout is None:
        if "experts" in names or train_router:
            what = "--lora_target_modules experts" if "experts" in names else "--lora_train_router"
            raise CheckFailed(f"{what}: {getattr(_base(model).config, 'model_type', 'this model')} has no routed experts "
                              "(no MoE block); drop it, or pick an MoE model (Mixtral, Qwen2-MoE, OLMoE)")
        return {"target_modules": targets, "target_parameters": None}
    if "all-linear" in names:
        base = _base(model)
        head = base.get_output_embeddings()
        modules = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                          if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in n}
                         - set(layout.router_linears))
        wants_experts = True
    else:
        modules, wants_experts = [n for n in names if n != "experts"], "experts" in names
    params = list(layout.expert_params) if wants_experts else []
    if train_router:
        params += layout.router_params
        modules += [r for r in layout.router_linears if r not in modules]
    return {"target_modules": modules, "target_parameters": params or None}


def apply_lora_targets(lora_config, model, targets, train_router: bool = False):
    """Set a LoraConfig's targets from resolve_lora_targets; refuses what peft's ParamWrapper cannot do."""
    resolved = resolve_lora_targets(model, targets, train_router)
    if resolved["target_parameters"]:
        if lora_config.lora_dropout:
            raise CheckFailed(f"--lora_dropout {lora_config.lora_dropout} with LoRA on the experts/router: peft's LoRA "
                              "on fused expert parameters (ParamWrapper) has no dropout; use --lora_dropout 0")
        if lora_config.use_dora:
            raise CheckFailed("--use_dora with LoRA on the experts/router: peft's ParamWrapper has no DoRA; drop "
                              "--use_dora or `experts`")
    lora_config.target_modules = resolved["target_modules"]
    lora_config.target_parameters = resolved["target_parameters"]
    return lora_config


def expert_lora_layers(model) -> dict[str, torch.nn.Module]:
    """name -> peft ParamWrapper whose parameter is stacked per expert (num_experts > 1)."""
    return {n: m for n, m in model.named_modules()
            if type(m).__name__ == "ParamWrapper" and getattr(m, "num_experts", 1) > 1 and len(m.lora_A) > 0}


def router_lora_layers(model, layout: MoeLayout) -> list[str]:
    wanted = {r.split(".")[0] for r in layout.router_params} | set(layout.router_linears)
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0
            and n.rsplit(".", 1)[-1] in wanted]


def check_expert_targets(model, targets, train_router: bool = False) -> dict:
    """After get_peft_model: what was asked of the experts and the router is what got LoRA. Returns counts."""
    layout = moe_layout(model)
    if layout is None:
        return {}
    names = _names(targets)
    experts = expert_lora_layers(model)
    routers = router_lora_layers(model, layout)
    named = [n for n in names if n in EXPERT_PROJECTIONS]
    asked = "experts" in names or "all-linear" in names
    if not experts and (asked or named):
        raise CheckFailed(
            f"LoRA would leave the experts frozen: --lora_target_modules {' '.join(names)} names "
            f"{' '.join(named) or 'the experts'}, but this {layout.model_type} model's {layout.num_experts} routed "
            f"experts per layer are fused 3D parameters ({', '.join(layout.expert_params)}) that no LoRA reached. "
            f"Fix: add `experts` to --lora_target_modules (e.g. q_proj k_proj v_proj o_proj experts), or drop "
            f"{' '.join(named) or 'experts'} to train attention only")
    if asked:
        per_param: dict[str, int] = {}
        for m in experts.values():
            per_param[m.parameter_name] = per_param.get(m.parameter_name, 0) + 1
        short = {p: per_param.get(p.split(".")[-1], 0) for p in layout.expert_params
                 if per_param.get(p.split(".")[-1], 0) != layout.moe_layers}
        if short:
            raise CheckFailed(f"LoRA reached only part of the experts (wrapped MoE layers of {layout.moe_layers}): "
                              f"{short}; check --lora_target_modules")
    if routers and not train_router:
        raise CheckFailed(f"LoRA reached the router ({len(routers)} modules, e.g. {routers[0]}) although "
                          "--lora_train_router is off: routers are frozen by default (a drifting router unbalances "
                          "the experts); drop the router's name from --lora_target_modules, or set --lora_train_router true")
    if train_router and not routers:
        raise CheckFailed(f"--lora_train_router true but no router module got LoRA ({layout.router_params + layout.router_linears})")
    return {"expert_lora_modules": len(experts), "router_lora_modules": len(routers), "num_experts": layout.num_experts,
            "experts_per_token": layout.top_k, "moe_layers": layout.moe_layers}


# ---------------------------------------------------------------------------------------------
# What the router does: which experts got tokens, the load-balancing loss, expert load
# ---------------------------------------------------------------------------------------------
class RouterRecorder:
    """Forward hooks on every MoE block's router: the router logits of each training forward pass.

    `.hits[block]` counts the tokens routed to each expert (top-k slots) since the recorder started. With
    `gradient_path` (the one-batch check) `.hits_on_path[block]` counts, after backward, only the tokens whose
    hidden state at that block got a gradient: a token after the last labelled position of its sequence (causal
    attention), or one in the last layer whose logit is not labelled, cannot move any expert. Passes in eval mode,
    and the recomputation of checkpointed layers during backward, are not counted."""

    def __init__(self, model, gradient_path: bool = False):
        self.layout = moe_layout(model)
        self.gradient_path = gradient_path
        self.hits: dict[str, torch.Tensor] = {}
        self.hits_on_path: dict[str, torch.Tensor] = {}
        self.prob_sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.aux_losses: list[float] = []
        self._pending: dict[str, torch.Tensor] = {}
        self.handles = []
        if self.layout is None:
            return
        self.expert_lora_modules = len(expert_lora_layers(model))
        self.router_lora_modules = len(router_lora_layers(model, self.layout))
        modules = dict(model.named_modules())
        prefix = next((n[: -len(self.layout.blocks[0])] for n in modules if n.endswith(self.layout.blocks[0])), "")
        for block in self.layout.blocks:
            gate = modules[f"{prefix}{block}.gate"]
            self.handles.append(gate.register_forward_hook(self._hook(block)))
        self.handles.append(model.register_forward_hook(self._end_of_pass))

    def _hook(self, block: str):
        def record(module, args, output):
            if not module.training or torch._C._current_graph_task_id() != -1:  # eval, or recompute in backward
                return
            logits = (output[0] if isinstance(output, tuple) else output).detach().float().reshape(-1, self.layout.num_experts)
            self._pending[block] = logits
            hidden = args[0] if args else None
            if self.gradient_path and torch.is_tensor(hidden) and hidden.requires_grad:
                chosen = logits.topk(self.layout.top_k, dim=-1).indices

                def on_path(grad, block=block, chosen=chosen):
                    reached = grad.reshape(chosen.shape[0], -1).abs().sum(-1) > 0
                    self.hits_on_path[block] = self.hits_on_path.get(block, 0) + torch.bincount(
                        chosen[reached].reshape(-1).cpu(), minlength=self.layout.num_experts)
                hidden.register_hook(on_path)
        return record

    def _end_of_pass(self, module, args, output):
        if not self._pending:
            return
        k, e = self.layout.top_k, self.layout.num_experts
        for block, logits in self._pending.items():
            chosen = logits.topk(k, dim=-1).indices.reshape(-1)
            self.hits[block] = self.hits.get(block, 0) + torch.bincount(chosen.cpu(), minlength=e)
            self.prob_sums[block] = self.prob_sums.get(block, 0) + logits.softmax(-1).sum(0).cpu()
        self.tokens += next(iter(self._pending.values())).shape[0]
        self.aux_losses.append(float(load_balancing_loss(list(self._pending.values()), e, k)))
        self._pending = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def metrics(self) -> dict:
        """metrics.json's `moe`: the load-balancing loss (mean and last over the training passes) and per layer the
        fraction of routed slots per expert with max/mean (1.0 = perfectly balanced)."""
        if not self.hits:
            return {}
        per_layer = {}
        for block, hits in self.hits.items():
            frac = hits.float() / hits.sum()
            per_layer[block] = {"expert_load": [round(float(x), 4) for x in frac],
                                "max_over_mean": round(float(frac.max() / frac.mean()), 4),
                                "experts_without_tokens": int((hits == 0).sum())}
        layout = self.layout
        return {"model_type": layout.model_type, "num_experts": layout.num_experts, "experts_per_token": layout.top_k,
                "moe_layers": layout.moe_layers, "expert_lora_modules": self.expert_lora_modules,
                "router_lora_modules": self.router_lora_modules,
                "router_aux_loss_mean": round(sum(self.aux_losses) / len(self.aux_losses), 6),
                "router_aux_loss_last": round(self.aux_losses[-1], 6), "routed_tokens": self.tokens,
                "max_over_mean_load": max(v["max_over_mean"] for v in per_layer.values()), "layers": per_layer}


def load_balancing_loss(layer_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as transformers' MoE models return it (`aux_loss` with
    output_router_logits=True, no attention mask): num_experts x sum_e(token share_e x mean router prob_e)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(tuple(layer_logits), num_experts, top_k)


def experts_without_gradient(model, recorder: RouterRecorder) -> list[str]:
    """After backward on the recorded batch: '<wrapper> expert <e>' for every expert the router sent a token on the
    gradient path to (recorder.hits_on_path; every routed token without gradient_path) whose LoRA factors got no
    gradient (lora_B's columns of that expert; lora_A's rows once lora_B is non-zero)."""
    bad = []
    hits = recorder.hits_on_path if recorder.gradient_path else recorder.hits
    for name, wrapper in expert_lora_layers(model).items():
        block = next((b for b in hits if name.endswith(f"{b}.experts") or f"{b}.experts." in name), None)
        if block is None:
            continue
        hit = hits[block] > 0
        for adapter in wrapper.lora_A:
            a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
            e = wrapper.num_experts
            grads = []
            if b.grad is not None:
                grads.append(b.grad.reshape(b.shape[0], -1, e).abs().sum(dim=(0, 1)))
            if a.grad is not None and b.detach().any():
                grads.append(a.grad.reshape(e, -1, a.shape[-1]).abs().sum(dim=(1, 2)))
            got = sum(grads) if grads else torch.zeros(e)
            bad += [f"{name} ({wrapper.parameter_name}) expert {i}" for i in range(e) if hit[i] and not got[i] > 0]
    return bad


# ---------------------------------------------------------------------------------------------
# Tiny random MoE models (tests, docs): the repo's tiny tokenizer, 2 layers, 4 experts, top-2
# ---------------------------------------------------------------------------------------------
SIZES = {  # tiny: tests (seconds); small: memory validation (activations and folded experts well above the baseline)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 experts=4, expert=32, dense=64),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  experts=8, expert=1024, dense=1024),
}


def tiny_moe_config(arch: str, tokenizer=None, size: str = "tiny"):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    dims = dict(SIZES[size])
    experts, expert, dense = dims.pop("experts"), dims.pop("expert"), dims.pop("dense")
    common = dict(vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False, num_experts_per_tok=2,
                  **dims, **ids)
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=expert, num_local_experts=experts, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=dense, moe_intermediate_size=expert, shared_expert_intermediate_size=dense,
                              num_experts=experts, norm_topk_prob=True, **common)
    if arch == "olmoe":
        return OlmoeConfig(intermediate_size=expert, num_experts=experts, norm_topk_prob=True, **common)
    raise SystemExit(f"unknown tiny MoE {arch!r}: choose mixtral, qwen2_moe or olmoe")


def build_tiny_moe(arch: str, output_dir, size: str = "tiny") -> Path:
    """A random-init MoE causal LM of `arch` with the repo's tiny tokenizer, saved as a plain HF folder."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from common.assets import build_tiny

    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    config = tiny_moe_config(arch, tokenizer, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.moe", description="build a tiny random MoE model")
    ap.add_argument("arch", choices=["mixtral", "qwen2_moe", "olmoe"])
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    a = ap.parse_args(argv)
    print(build_tiny_moe(a.arch, a.output_dir, a.size))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
