"""Bad input: every malformed input in tests/bad_inputs/ stops the real entry point before a model loads.

Each case must end with a non-zero exit, ONE `error:` / `<file>:<line>:` line that says what is wrong
and how to fix it, no traceback, and nothing previously written changed. Entry points:
  - `python -m common.data validate FILE [--format ...]` (data cases: in-process main(), plus the real CLI)
  - recipes/sft_memory_diet.py and recipes/dpo.py, executed as `__main__` in-process (runpy: the real
    script, its argument parsing and its `except ... sys.exit(1)`), with model loading patched to raise:
    a check that ran after the model loaded would fail the test with "model loaded"
  - bash launch/memory_diet.sh in a real subprocess for two cases (exit code and stderr of a real run)
"""
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, run

CORPUS = REPO / "tests" / "bad_inputs"
ACCEPTED_KEYS = ("accepted key sets: messages (chat); instruction+output (instruction); prompt+completion (completion); "
                 "prompt+chosen+rejected (preference); text+label (classification)")
NOT_JSON = "each line must be one complete JSON object - look for a truncated or wrapped line"
SAME_PAIR = ("`chosen` is identical to `rejected`, so the pair carries no preference signal; "
             "drop it or fix the rejected response")

# file -> (extra validate args, line, message): `python -m common.data validate` prints f"{file}:{line}: {message}",
# or f"{file}: {message}" for a whole-file problem (line None)
DATA_CASES = {
    "truncated_line.jsonl": ((), 3, f"not valid JSON (Unterminated string starting at, column 79); {NOT_JSON}"),
    "wrong_type_content.jsonl": ((), 2, "messages[1] (assistant) content is a number, expected a string; quote the text"),
    "wrong_type_messages.jsonl": ((), 2, "`messages` is a string; it must be a non-empty list of "
                                         '{"role": ..., "content": ...} messages'),
    "wrong_type_label.jsonl": ((), 2, "`label` is a number; use a label name (string) or a class id (integer)"),
    "missing_output.jsonl": ((), 2, "record has keys ['input', 'instruction'] - looks like instruction but `output` "
                                    f"is missing; {ACCEPTED_KEYS}"),
    "missing_content.jsonl": ((), 2, "messages[1] (assistant) has no `content`; add the message text"),
    "empty_assistant.jsonl": ((), 3, "messages[1] (assistant) content is empty or whitespace only; "
                                     "write the assistant text or drop the turn"),
    "whitespace_assistant.jsonl": ((), 2, "messages[2] (assistant) content is empty or whitespace only; "
                                          "write the assistant text or drop the turn"),
    "two_users_in_a_row.jsonl": ((), 2, "messages[1] is a second user message in a row; roles must alternate "
                                        "user/assistant - merge the two turns or insert the missing assistant turn"),
    "assistant_first.jsonl": ((), 1, "messages[0] is assistant but the conversation must open with a user message "
                                     "(after an optional system); add the user turn first"),
    "system_in_the_middle.jsonl": ((), 4, "messages[1] is a system message after the start; a system message may only "
                                          "come first - move it to the start or merge it into the first one"),
    "non_utf8.jsonl": ((), 2, "byte 0xe9 is not valid UTF-8; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
    "empty.jsonl": ((), None, "file is empty; write at least one record"),
    "whitespace_only.jsonl": ((), None, "file is empty; write at least one record"),
    "chosen_equals_rejected.jsonl": (("--format", "preference"), 2, SAME_PAIR),
    "chosen_equals_rejected_chat.jsonl": (("--format", "preference"), 1, SAME_PAIR),
    # hostile data (tests/recipes/test_hostile_data.py covers each in depth)
    "control_token_in_content.jsonl": ((), 2, "messages[1] (assistant) content contains the chat control token "
                                              "'<|im_end|>': the tokenizer reads it as a real turn or sequence boundary, "
                                              "not as text, so the words after it would be trained as another turn; "
                                              "remove it (or break it up, e.g. '< |im_end|>', where the text is about "
                                              "the token itself)"),
    "duplicate_key.jsonl": ((), 2, "duplicate key 'output' in one JSON object; JSON keeps only the last value, "
                                   "silently - keep one 'output' and delete (or rename) the other"),
    "invisible_assistant.jsonl": ((), 3, "messages[1] (assistant) content is only invisible characters (U+200B ZERO "
                                         "WIDTH SPACE, U+200D ZERO WIDTH JOINER, U+2060 WORD JOINER, ...); write the "
                                         "assistant text or drop the turn"),
    "lone_surrogate.jsonl": ((), 2, "`messages[1].content` holds a lone UTF-16 surrogate \\ud800 at character 6 (half "
                                    "of an escaped pair, e.g. an emoji cut in two), which no tokenizer can encode; "
                                    "delete it or write the whole character"),
    "pretty_array.jsonl": ((), None, "file is one JSON array of 3 elements spread over 38 lines (pretty-printed JSON), "
                                     "not JSON Lines; rename it to .json (a list of records is read as is), or write "
                                     "one record per line: jq -c '.[]' pretty_array.jsonl > fixed.jsonl"),
    "utf16_no_bom.jsonl": ((), None, "file looks like UTF-16LE text without a byte order mark (every other byte is 0); "
                                     "convert it to UTF-8: iconv -f UTF-16LE -t UTF-8 utf16_no_bom.jsonl > utf16_no_bom.utf8.jsonl"),
}
# valid data that goes wrong only at a given max_length, and a config file: used by the recipe cases below
RECIPE_INPUTS = {"long_system_prompt.jsonl", "some_too_long.jsonl", "unknown_key.yaml"}


def test_every_corpus_file_has_a_case():
    on_disk = {p.name for p in CORPUS.iterdir()} - {"README.md"}
    assert on_disk == set(DATA_CASES) | RECIPE_INPUTS


# ---------------------------------------------------------------- data: python -m common.data validate


def located(path, line):
    return f"{path}:{line}" if line is not None else str(path)


def validate_in_process(capsys, path, *args):
    from common.data import main

    rc = main(["validate", str(path), *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_validate_names_file_line_and_fix(capsys, name):
    args, line, message = DATA_CASES[name]
    path = CORPUS / name
    before = path.read_bytes()
    assert validate_in_process(capsys, path, *args) == (1, "", f"{located(path, line)}: {message}\n")
    assert path.read_bytes() == before


def test_validate_cli_real_processes():
    """The same cases through the real `python -m common.data validate`: exit 1, the one line, no traceback."""
    for name, (args, line, message) in sorted(DATA_CASES.items()):
        proc = run([sys.executable, "-m", "common.data", "validate", f"tests/bad_inputs/{name}", *args])
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"{located(f'tests/bad_inputs/{name}', line)}: "
                                                                      f"{message}\n")


@pytest.fixture(scope="module")
def huge_lines(tmp_path_factory):
    """Two 10-20 MB lines (generated: too big to commit): a whole JSON array saved as one .jsonl line, and a
    huge record cut off mid-string (an interrupted download or write)."""
    folder = tmp_path_factory.mktemp("huge")
    record = {"messages": [{"role": "user", "content": "What is the capital of France? " * 20},
                           {"role": "assistant", "content": "Paris. " * 50}]}
    (folder / "array_on_one_line.jsonl").write_text(json.dumps([record] * 20000) + "\n")
    big = json.dumps({"messages": [{"role": "user", "content": "Summarize: " + "the hive is quiet " * 1_100_000},
                                   {"role": "assistant", "content": "Quiet."}]})
    (folder / "cut_off.jsonl").write_text(json.dumps(record) + "\n" + big[: len(big) // 2])
    return folder


@pytest.mark.parametrize("name, line, message", [
    ("array_on_one_line.jsonl", 1, 'line is a JSON list, not an object; write each record as {"key": value, ...} '
                                   "on its own line"),
    ("cut_off.jsonl", 2, f"not valid JSON (Unterminated string starting at, column 43); {NOT_JSON}"),
])
def test_huge_line_gives_one_short_line_fast(capsys, huge_lines, name, line, message):
    path = huge_lines / name
    assert path.stat().st_size > 8_000_000
    start = time.perf_counter()
    rc, out, err = validate_in_process(capsys, path)
    assert time.perf_counter() - start < 10
    assert (rc, out, err) == (1, "", f"{path}:{line}: {message}\n")  # the line's content is never echoed


# ---------------------------------------------------------------- truncation: all unlabelled = error, some = warning


def test_some_examples_unlabelled_after_truncation_is_a_warning(tiny_tokenizer, caplog):
    from common.collator import tokenize_sft
    from common.data import load_dataset_file, to_messages

    records, fmt = load_dataset_file(CORPUS / "some_too_long.jsonl")
    items = [(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in records]
    features, report = tokenize_sft(items, tiny_tokenizer, max_length=64)
    assert (len(features), report.kept, report.truncated_examples) == (2, 2, 1)
    assert report.dropped_examples == [f"{CORPUS / 'some_too_long.jsonl'}:1"]
    with caplog.at_level("WARNING", logger="common.collator"):
        report.log(64)
    assert (f"dropped 1 examples with no assistant token left after truncation to max_length=64: "
            f"{CORPUS / 'some_too_long.jsonl'}:1") in caplog.text


# ---------------------------------------------------------------- recipes, executed as __main__ in-process

SFT = REPO / "recipes" / "sft_memory_diet.py"
DPO = REPO / "recipes" / "dpo.py"
FIX_TEMPLATE = ("Fix: give the tokenizer a training-compatible template, e.g. `tokenizer.chat_template = "
                "common.assets.chatml_template()` for ChatML models, or wrap each assistant message and its "
                "end-of-turn token in {% generation %} ... {% endgeneration %}")
OFFLINE = ("use an offline model: --model_name_or_path asset:tiny (or asset:smollm2), or build one with "
           "`python -m common.assets tiny --output_dir DIR`")


@pytest.fixture(scope="module")
def tokenizers(tiny_dir, tmp_path_factory):
    """Copies of the tiny model: one with no chat template at all, one with a template that has no
    {% generation %} markers (most stock templates)."""
    root = tmp_path_factory.mktemp("tokenizers")
    none, plain = root / "no_template", root / "no_generation_markers"
    for folder in (none, plain):
        shutil.copytree(tiny_dir, folder)
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = (tiny_dir / "chat_template.jinja").read_text()
    plain_template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert plain_template != template
    (plain / "chat_template.jinja").write_text(plain_template)
    return none, plain


def recipe_cases(tiny_dir, tokenizers):
    """case -> (script, argv without --output_dir, exit code, the expected error line)."""
    none, plain = tokenizers
    long_system = CORPUS / "long_system_prompt.jsonl"
    two_users = CORPUS / "two_users_in_a_row.jsonl"
    return {
        "bad data": (SFT, ["--dataset_path", str(two_users)], 1,
                     f"error: {two_users}:2: {DATA_CASES['two_users_in_a_row.jsonl'][2]}"),
        "truncation leaves no labelled token": (
            SFT, ["--dataset_path", str(long_system), "--max_length", "16"], 1,
            f"error: {long_system}:1: no example has a labelled token within max_length=16: all 3 examples lose every "
            "assistant token to truncation (lines 1, 2, 3); raise --max_length above 208 (the fewest tokens any "
            "example has before its first assistant reply) or shorten the system/user text"),
        "tokenizer without chat template": (
            SFT, ["--model_name_or_path", str(none)], 1,
            f"error: {none} has no chat template, so chat data cannot be formatted. {FIX_TEMPLATE}"),
        "template without generation markers": (
            SFT, ["--model_name_or_path", str(plain)], 1,
            f"error: {plain}'s chat template has no {{% generation %}} markers, so the assistant-token mask would be "
            f"all zeros and nothing would be learned. {FIX_TEMPLATE}"),
        "nonexistent model path": (
            SFT, ["--model_name_or_path", "/nonexistent/model"], 1,
            f"error: --model_name_or_path /nonexistent/model: no such folder; check the path, or {OFFLINE}"),
        "hub id, offline, not cached": (
            SFT, ["--model_name_or_path", "no-such-org/no-such-model"], 1,
            "error: --model_name_or_path no-such-org/no-such-model: no such local folder, and HF_HUB_OFFLINE=1 while "
            f"it is not in the hub cache; check the path, or {OFFLINE}"),
        "model folder without config.json": (
            SFT, ["--model_name_or_path", str(CORPUS)], 1,
            f"error: --model_name_or_path {CORPUS}: the folder holds no config.json; pass the folder save_pretrained "
            f"wrote, or {OFFLINE}"),
        "unknown YAML key": (
            SFT, ["--config", str(CORPUS / "unknown_key.yaml")], 2,
            f"error: {CORPUS / 'unknown_key.yaml'}: unknown key 'lerning_rate' (did you mean 'learning_rate'?); "
            "`--help` lists the valid options"),
        "unknown CLI flag": (
            SFT, ["--lerning_rate", "1e-3"], 2,
            "error: unknown option '--lerning_rate' (did you mean --learning_rate?); `--help` lists the valid options"),
        "DPO: chosen == rejected": (
            DPO, ["--config", "recipes/configs/dpo.yaml", "--dataset_path", str(CORPUS / "chosen_equals_rejected.jsonl")],
            1, f"error: {CORPUS / 'chosen_equals_rejected.jsonl'}:2: {SAME_PAIR}"),
    }


RECIPE_CASES = ["bad data", "truncation leaves no labelled token", "tokenizer without chat template",
                "template without generation markers", "nonexistent model path", "hub id, offline, not cached",
                "model folder without config.json", "unknown YAML key", "unknown CLI flag", "DPO: chosen == rejected"]


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run(out):
    """An output dir holding a finished run's files, as a recipe leaves them."""
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
    (out / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (out / "metrics.json").write_text('{"final_train_loss": 1.25}\n')
    (out / "manifest.json").write_text('{"status": "finished", "config": {"seed": 42}}\n')
    (out / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)


@pytest.mark.parametrize("output_dir_state", ["finished run", "absent"])
@pytest.mark.parametrize("case", RECIPE_CASES)
def test_recipe_fails_before_the_model_with_one_line(case, output_dir_state, tiny_dir, tokenizers, tmp_path,
                                                     monkeypatch, capsys, no_model_loads):
    script, argv, code, expected = recipe_cases(tiny_dir, tokenizers)[case]
    out = tmp_path / "out"
    if output_dir_state == "finished run":
        finished_run(out)
    before = digest(out) if out.exists() else None
    if "--model_name_or_path" not in argv:
        argv = ["--model_name_or_path", str(tiny_dir)] + argv
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [str(script), *argv, "--output_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == code
    assert [line for line in err.splitlines() if line.startswith("error:")] == [expected]
    assert "Traceback" not in err
    if before is None:
        assert not out.exists()  # nothing written: the output dir is created only just before the model loads
    else:
        assert digest(out) == before


# ---------------------------------------------------------------- the launcher, real processes


def test_launcher_real_processes(tiny_dir, tokenizers, tmp_path):
    """Two cases through bash launch/memory_diet.sh, run side by side (each process spends ~7 s importing)."""
    cases = recipe_cases(tiny_dir, tokenizers)
    procs = {}
    for i, case in enumerate(["truncation leaves no labelled token", "nonexistent model path"]):
        _, argv, code, expected = cases[case]
        out = tmp_path / f"out{i}"
        finished_run(out)
        if "--model_name_or_path" not in argv:
            argv = ["--model_name_or_path", str(tiny_dir)] + argv
        env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
        proc = subprocess.Popen(["bash", str(REPO / "launch" / "memory_diet.sh"), *argv, "--output_dir", str(out)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[case] = (proc, code, expected, out, digest(out))
    for case, (proc, code, expected, out, before) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, (case, err[-3000:])
        assert [line for line in err.splitlines() if line.startswith("error:")] == [expected]
        assert "Traceback" not in err and "trainable params" not in err
        assert digest(out) == before
