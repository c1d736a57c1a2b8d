"""The PEFT variant options on the multi-GPU recipe: DoRA/rsLoRA reach peft; PiSSA/OLoRA init and LoRA+ are refused
up front with the recipe that has them (they are not silently ignored)."""
import pytest
import torch

from common import checks, distributed as ddp
from common.config import load_recipe, parse_config
from conftest import REPO

RANK = ddp.Rank(rank=0, local_rank=0, world_size=2, local_world_size=2, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(REPO / "recipes" / "sft_multigpu_qlora.py")


@pytest.mark.parametrize("option", [["--lora_init", "pissa"], ["--lora_init", "olora"], ["--loraplus_lr_ratio", "16"]])
def test_pissa_olora_and_loraplus_are_refused_with_the_recipe_that_has_them(recipe, option):
    cfg, args = parse_config(recipe.CONFIGS, ["--method", "lora", *option])
    with pytest.raises(checks.CheckFailed, match="recipes/sft_memory_diet.py only"):
        recipe.validate(cfg, args, RANK)


def test_dora_and_rslora_pass_validation_and_reach_the_lora_config(recipe):
    cfg, args = parse_config(recipe.CONFIGS, ["--method", "lora", "--use_dora", "true", "--use_rslora", "true"])
    recipe.validate(cfg, args, RANK)
    config = cfg.lora_config()
    assert config.use_dora and config.use_rslora
