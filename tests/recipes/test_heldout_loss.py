"""One held-out loss for every recipe: the token-weighted mean NLL over every labelled token of the eval set,
each example counted once (common.evaluation.heldout_loss), whatever the batch size or the number of ranks.

transformers' Trainer.evaluate on 2 ranks reported a loss 0.5 nats off the adapter's real one (CHRONICLES):
it rescales each rank's batch loss by that rank's share of the labelled tokens and keeps only some ranks'
copies of the last round. The 2-rank test runs this file under torchrun (see __main__ at the bottom).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest, also under torchrun
from conftest import REPO, run  # noqa: E402

EVAL_SET = REPO / "data/samples/chat.jsonl"  # 12 conversations of different lengths


def features(tokenizer, path=EVAL_SET, limit=None):
    from common.collator import tokenize_sft
    from common.data import load_dataset_file, to_messages

    records, fmt = load_dataset_file(path)
    return tokenize_sft([(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in records[:limit]],
                        tokenizer, 256)[0]


def per_example_nll(model, feats):
    """Brute force: one example at a time, no padding at all."""
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            ids = torch.tensor([f["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            target = ids[0, 1:]
            labelled = torch.tensor(f["loss_mask"][1:], dtype=torch.bool)
            total -= float(logp.gather(-1, target[:, None])[:, 0][labelled].sum())
            count += int(labelled.sum())
    return total, count


def test_token_weighted_nll_counts_every_labelled_token_once_whatever_the_batch(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from common.collator import CausalLMCollator
    from common.evaluation import heldout_loss, token_weighted_nll

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    feats = features(tiny_tokenizer)
    total, count = per_example_nll(model, feats)
    assert count == sum(sum(f["loss_mask"][1:]) for f in feats)
    for batch_size in (1, 5, 8, 12):
        got_total, got_count = token_weighted_nll(model, feats, tiny_tokenizer.pad_token_id, batch_size)
        assert got_count == count and got_total == pytest.approx(total, rel=1e-5), batch_size
    assert heldout_loss(model, feats, tiny_tokenizer.pad_token_id) == pytest.approx(total / count, rel=1e-5)
    assert heldout_loss(model, [], tiny_tokenizer.pad_token_id) is None
    # the Trainer's definition (mean of per-batch means) is another number on the same model and set
    collate = CausalLMCollator(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        means = [float(model(**collate(feats[i:i + 8])).loss) for i in range(0, len(feats), 8)]
    assert abs(sum(means) / len(means) - total / count) > 1e-4


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_ranks_report_the_single_process_loss(tiny_dir, tiny_tokenizer, tmp_path):
    """11 conversations on 2 gloo ranks (uneven shards: one rank runs a discarded batch to stay in step):
    token_weighted_nll and TokenCountingTrainer.evaluate give the 1-process figure; the stock Trainer does not."""
    from transformers import AutoModelForCausalLM

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), __file__, str(tiny_dir), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    total, count = per_example_nll(model, features(tiny_tokenizer, limit=11))
    for r in ranks:
        assert r["tokens"] == count
        assert r["token_weighted_nll"] == pytest.approx(total / count, abs=1e-5)
        assert r["trainer_evaluate"] == pytest.approx(total / count, abs=1e-5)
        assert r["trainer_eval_tokens"] == count
    # transformers 5's own evaluate on the same 2 ranks: each rank's loss scaled by its token share
    assert abs(ranks[0]["stock_trainer_evaluate"] - total / count) > 0.05


def _two_rank_worker(tiny_dir: str, out: str) -> None:
    """Under torchrun: the three evaluations on this rank, written to rank<r>.json."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from common.collator import CausalLMCollator
    from common.evaluation import token_weighted_nll
    from common.trainer import TokenCountingTrainer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    feats = features(tok, limit=11)
    total, count = token_weighted_nll(model, feats, tok.pad_token_id, batch_size=4)
    args = TrainingArguments(output_dir=f"{out}/trainer", use_cpu=True, ddp_backend="gloo", report_to="none",
                             per_device_eval_batch_size=4, remove_unused_columns=False, prediction_loss_only=True)
    collate = CausalLMCollator(tok.pad_token_id)
    ours = TokenCountingTrainer(model=model, args=args, eval_dataset=feats, data_collator=collate,
                                processing_class=tok).evaluate()
    stock = Trainer(model=model, args=args, eval_dataset=feats, data_collator=collate,
                    processing_class=tok).evaluate()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"token_weighted_nll": total / count, "tokens": count, "trainer_evaluate": ours["eval_loss"],
                   "trainer_eval_tokens": ours["eval_tokens"], "stock_trainer_evaluate": stock["eval_loss"]}, f)


# ---------------------------------------------------------------------------------------------
# the same number from every recipe: sft_memory_diet, sft_multigpu_qlora at world size 1 and 2, evaluate.py
# ---------------------------------------------------------------------------------------------
def evaluate_py_loss(adapter, out) -> float:
    from recipes.evaluate import Config, main

    m = main(Config(model_name_or_path=str(adapter), output_dir=str(out), compare_baseline=False,
                    domain_dataset_path=str(REPO / "data/persona/heldout.jsonl"), general_dataset_path=None,
                    max_new_tokens=1, precision="fp32"))
    return m["results"]["domain"]["loss"]


@pytest.mark.slow
def test_every_recipe_and_world_size_report_the_loss_evaluate_py_measures(tiny_dir, tmp_path):
    """Same training data, eval set and global batch; fp32 LoRA (evaluate.py loads an unquantized base). Each
    recipe's eval_loss_after equals evaluate.py on the adapter it saved; the multi-GPU recipe gives the same
    figure on 1 and 2 ranks."""
    common = ["--model_name_or_path", str(tiny_dir), "--precision", "fp32", "--max_steps", "2",
              "--dataset_path", "data/persona/train.jsonl", "--eval_dataset_path", "data/persona/heldout.jsonl"]
    runs = {"memory_diet": (["bash", "launch/memory_diet.sh", *common, "--method", "lora", "--sample_generations", "0",
                             "--max_new_tokens", "1", "--lora_dropout", "0.0"], {})}
    for world in (1, 2):
        runs[f"multigpu_x{world}"] = (["bash", "launch/multigpu_qlora.sh", *common, "--method", "lora",
                                       "--global_batch_size", "8", "--lora_dropout", "0.0"],
                                      {"NPROC": str(world), "MASTER_PORT": free_port()})
    reported, measured = {}, {}
    for name, (cmd, env) in runs.items():
        proc = run(cmd + ["--output_dir", str(tmp_path / name)], env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        reported[name] = json.loads((tmp_path / name / "metrics.json").read_text())["eval_loss_after"]
        measured[name] = evaluate_py_loss(tmp_path / name / "adapter", tmp_path / f"{name}_eval")
    print("eval_loss_after", reported, "evaluate.py", measured)  # shown with pytest -s
    for name in runs:
        assert reported[name] == pytest.approx(measured[name], abs=1e-4), (name, reported, measured)
    assert reported["multigpu_x1"] == pytest.approx(reported["multigpu_x2"], abs=1e-4), reported


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from common.distributed import exit_process

    _two_rank_worker(sys.argv[1], sys.argv[2])
    exit_process(0)  # a finished gloo rank can abort at interpreter exit (CHRONICLES 47)
