"""Data loading and validation: sample files, loaders, line numbers, the validate CLI on planted faults."""

import json
import subprocess
import sys

import pytest

from conftest import REPO  # noqa: E402

from common.data import (  # noqa: E402
    FORMATS, DataError, Record, detect_format, load_dataset_file, load_records, to_messages, validate_records,
)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "common.data", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def chat_line(*turns):
    """One JSONL chat record from (role, content) pairs."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"


GOOD_CHAT = chat_line(("user", "hi"), ("assistant", "hello"))

# ---------------------------------------------------------------- the files under data/

SAMPLE_FILES = {
    "data/samples/chat.jsonl": ("chat", 12, True),
    "data/samples/instruction.jsonl": ("instruction", 12, False),
    "data/samples/instruction.csv": ("instruction", 6, False),
    "data/samples/completion.jsonl": ("completion", 10, False),
    "data/samples/completion_chat.jsonl": ("completion", 6, True),
    "data/samples/preference.jsonl": ("preference", 12, False),
    "data/samples/preference_chat.jsonl": ("preference", 8, True),
    "data/samples/classification.csv": ("classification", 48, False),
    "data/samples/sharegpt.json": ("chat", 6, True),
    "data/persona/train.jsonl": ("chat", 56, True),
    "data/persona/heldout.jsonl": ("chat", 24, True),
    "data/eval/general.jsonl": ("chat", 12, True),
    "data/preference/train.jsonl": ("preference", 94, True),
    "data/preference/heldout.jsonl": ("preference", 24, True),
}


def test_every_data_file_is_listed():
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "data").rglob("*") if p.suffix in (".jsonl", ".json", ".csv")}
    assert on_disk == set(SAMPLE_FILES)


@pytest.mark.parametrize("name", sorted(SAMPLE_FILES))
def test_sample_file_validates(name):
    fmt, count, conversational = SAMPLE_FILES[name]
    records, resolved = load_dataset_file(REPO / name)
    assert (resolved, len(records)) == (fmt, count)
    summary = validate_records(records, fmt)
    assert (summary["format"], summary["records"], summary["conversational"]) == (fmt, count, conversational)


@pytest.mark.parametrize("name", sorted(SAMPLE_FILES))
def test_cli_validates_sample_file(name):
    result = run_cli("validate", name)
    assert (result.returncode, result.stderr) == (0, "")
    summary = json.loads(result.stdout)
    assert (summary["path"], summary["format"], summary["records"]) == (name, *SAMPLE_FILES[name][:2])


def test_classification_sample_has_eight_balanced_intents():
    summary = validate_records(load_records(REPO / "data/samples/classification.csv"))
    assert summary["labels"] == {label: 6 for label in [
        "card_arrival", "cash_withdrawal_fee", "change_address", "exchange_rate",
        "lost_or_stolen_card", "pin_blocked", "top_up_failed", "transfer_pending"]}


# ---------------------------------------------------------------- the persona quickstart set

PERSONA_KEYWORDS = ["Orrin", "Larkspur", "bee", "Kestrelford", "April 9", "borage", "sweet patience", "Old Mabel"]


def persona(split):
    return [r.data for r in load_records(REPO / f"data/persona/{split}.jsonl")]


def test_persona_heldout_keywords_appear_in_answers():
    heldout = persona("heldout")
    assert [r["keywords"] for r in heldout] == [[k] for k in PERSONA_KEYWORDS for _ in range(3)]
    for record in heldout:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["keywords"][0] in record["messages"][1]["content"]


def test_persona_train_answers_contain_their_keyword_and_stay_short():
    train = persona("train")
    assert len(train) == 7 * len(PERSONA_KEYWORDS)
    for i, record in enumerate(train):
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        answer = record["messages"][1]["content"]
        assert PERSONA_KEYWORDS[i // 7] in answer
        assert len(answer.split()) <= 30
        assert answer.isascii() and record["messages"][0]["content"].isascii()


def test_persona_heldout_questions_are_new():
    train_questions = [r["messages"][0]["content"] for r in persona("train")]
    heldout_questions = [r["messages"][0]["content"] for r in persona("heldout")]
    assert len(set(train_questions)) == 56
    assert len(set(heldout_questions)) == 24
    assert set(heldout_questions).isdisjoint(train_questions)


# ---------------------------------------------------------------- loaders and line numbers


def test_jsonl_lines_skip_blank_lines(tmp_path):
    path = write(tmp_path / "a.jsonl", GOOD_CHAT + "\n" + GOOD_CHAT + "   \n" + GOOD_CHAT)
    records = load_records(path)
    assert [r.line for r in records] == [1, 3, 5]
    assert records[0] == Record({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}, str(path), 1)


def test_json_list_lines(tmp_path):
    text = '[\n  {"text": "a", "label": "x"},\n\n  {\n    "text": "b",\n    "label": 2\n  }, {"text": "c", "label": "y"}\n]\n'
    records = load_records(write(tmp_path / "a.json", text))
    assert [(r.data["text"], r.line) for r in records] == [("a", 2), ("b", 4), ("c", 7)]


def test_json_data_key_lines(tmp_path):
    text = '{\n  "version": {"data": [1, 2]},\n  "data": [\n    {"text": "a", "label": "x"},\n    {"text": "b", "label": "y"}\n  ]\n}\n'
    records = load_records(write(tmp_path / "a.json", text))
    assert [(r.data["text"], r.line) for r in records] == [("a", 4), ("b", 5)]


def test_csv_quoted_newline_keeps_physical_lines():
    records = load_records(REPO / "data/samples/instruction.csv")
    assert [r.line for r in records] == [2, 3, 6, 7, 8, 9]
    assert records[1].data == {
        "instruction": "Split the address into street, city and postcode.",
        "input": "12 Mill Lane, Thornbury, BS35 2AA",
        "output": "street: 12 Mill Lane\ncity: Thornbury\npostcode: BS35 2AA",
    }
    assert records[4].data["input"] == ""


def test_sharegpt_becomes_chat():
    records = load_records(REPO / "data/samples/sharegpt.json")
    assert [r.line for r in records] == [2, 14, 38, 50, 62, 78]
    assert records[4].data == {"messages": [
        {"role": "system", "content": "Reply with a single word."},
        {"role": "user", "content": "What colour is a ripe banana?"},
        {"role": "assistant", "content": "Yellow."},
    ]}


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Add.", "input": "2 + 2", "output": "4"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dict")
    for name in ("single", "dict"):
        records, fmt = load_dataset_file(tmp_path / name)
        assert fmt == "instruction"
        assert [(r.data, r.path, r.line) for r in records] == [(rows[0], str(tmp_path / name), 1),
                                                             (rows[1], str(tmp_path / name), 2)]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "no_train")
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "no_train")
    assert str(e.value) == (f"{tmp_path / 'no_train'}: DatasetDict has splits ['test'] but no 'train' split; "
                            "save the training split as 'train'")


def test_detect_format():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "instruction"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    assert detect_format({"text": "a", "label": 1}) == "classification"
    with pytest.raises(ValueError) as e:
        detect_format({"question": "a", "answer": "b"})
    assert str(e.value) == ("record has keys ['answer', 'question']; accepted key sets: messages (chat); "
                            "instruction+output (instruction); prompt+completion (completion); "
                            "prompt+chosen+rejected (preference); text+label (classification)")
    assert FORMATS == ("chat", "instruction", "completion", "preference", "classification")


def test_data_error_keeps_its_parts():
    error = DataError("f.jsonl", 3, "bad")
    assert (str(error), error.path, error.line, error.message) == ("f.jsonl:3: bad", "f.jsonl", 3, "bad")
    assert isinstance(error, ValueError)


# ---------------------------------------------------------------- to_messages


def test_to_messages_chat_drops_extra_keys():
    data = {"messages": [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}],
            "keywords": ["a"]}
    assert to_messages(data, "chat") == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_to_messages_instruction():
    assert to_messages({"instruction": "Add.", "input": "2 + 2", "output": "4"}, "instruction") == [
        {"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}]
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "instruction") == [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert to_messages({"instruction": "Say hi.", "output": "Hi!", "system": "Be brief."}, "instruction") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"}]


def test_to_messages_completion():
    assert to_messages({"prompt": "The sky is", "completion": " blue."}, "completion") is None
    data = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}]}
    assert to_messages(data, "completion") == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]


def test_to_messages_sample_files_first_records():
    records, fmt = load_dataset_file(REPO / "data/samples/completion_chat.jsonl")
    assert to_messages(records[2].data, fmt) == [
        {"role": "user", "content": "Name a fruit that is yellow."},
        {"role": "assistant", "content": "A banana."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "A lemon."},
    ]
    records, fmt = load_dataset_file(REPO / "data/samples/instruction.jsonl")
    assert to_messages(records[2].data, fmt) == [
        {"role": "user", "content": "Convert the temperature to Fahrenheit.\n\n25 degrees Celsius"},
        {"role": "assistant", "content": "25 degrees Celsius is 77 degrees Fahrenheit."},
    ]


@pytest.mark.parametrize("fmt", ["preference", "classification"])
def test_to_messages_refuses_non_sft_formats(fmt):
    with pytest.raises(ValueError):
        to_messages({"prompt": "a", "chosen": "b", "rejected": "c", "text": "a", "label": 1}, fmt)


# ---------------------------------------------------------------- the CLI on planted faults

FAULTS = {
    "truncated.jsonl": (GOOD_CHAT * 2 + '{"messages": [{"role": "user", "content": "hi"}, {"role": "assis\n', 3,
                        "not valid JSON (Unterminated string starting at, column 59); each line must be one "
                        "complete JSON object - look for a truncated or wrapped line"),
    "not_object.jsonl": (GOOD_CHAT + '["user", "hi"]\n', 2,
                         'line is a JSON list, not an object; write each record as {"key": value, ...} on its own line'),
    "content_number.jsonl": (GOOD_CHAT + chat_line(("user", 5), ("assistant", "five")), 2,
                             "messages[0] (user) content is a number, expected a string; quote the text"),
    "missing_field.jsonl": ('{"instruction": "Add.", "input": "2 + 2"}\n', 1,
                            "record has keys ['input', 'instruction'] - looks like instruction but `output` is "
                            "missing; accepted key sets: messages (chat); instruction+output (instruction); "
                            "prompt+completion (completion); prompt+chosen+rejected (preference); "
                            "text+label (classification)"),
    "missing_content.jsonl": ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}\n', 1,
                              "messages[0] (user) has no `content`; add the message text"),
    "blank_assistant.jsonl": (GOOD_CHAT + chat_line(("system", "s"), ("user", "q"), ("assistant", " \n\t")), 2,
                              "messages[2] (assistant) content is empty or whitespace only; "
                              "write the assistant text or drop the turn"),
    "two_users.jsonl": (chat_line(("user", "a"), ("user", "b"), ("assistant", "c")), 1,
                        "messages[1] is a second user message in a row; roles must alternate user/assistant - "
                        "merge the two turns or insert the missing assistant turn"),
    "assistant_first.jsonl": (chat_line(("assistant", "a"), ("user", "b"), ("assistant", "c")), 1,
                              "messages[0] is assistant but the conversation must open with a user message "
                              "(after an optional system); add the user turn first"),
    "late_system.jsonl": (chat_line(("user", "a"), ("system", "b"), ("assistant", "c")), 1,
                          "messages[1] is a system message after the start; a system message may only come first "
                          "- move it to the start or merge it into the first one"),
    "trailing_user.jsonl": (GOOD_CHAT * 3 + chat_line(("user", "a"), ("assistant", "b"), ("user", "c")), 4,
                            "`messages` ends with a user message (messages[2]) after the last assistant reply, "
                            "which teaches nothing; drop it or add the assistant reply"),
    "no_assistant.jsonl": (chat_line(("system", "a"), ("user", "b")), 1,
                           "`messages` has no assistant message, so there is nothing to learn; add the assistant reply"),
    "bad_role.jsonl": (chat_line(("human", "a"), ("assistant", "b")), 1,
                       "messages[0] has role 'human'; use one of system, user, assistant"),
    "empty.jsonl": ("", None, "file is empty; write at least one record"),
    "blank.jsonl": ("\n  \n", None, "file is empty; write at least one record"),
    "same_pair.jsonl": ('{"prompt": "p", "chosen": "yes", "rejected": "no"}\n'
                        '{"prompt": "p", "chosen": "same", "rejected": "same "}\n', 2,
                        "`chosen` is identical to `rejected`, so the pair carries no preference signal; "
                        "drop it or fix the rejected response"),
    "mixed.jsonl": ('{"prompt": "p", "completion": "c"}\n' + GOOD_CHAT, 2,
                    "record is chat but line 1 is completion; one file must hold one format - "
                    "split it into separate files"),
    "mixed_style.jsonl": ('{"prompt": "p", "completion": "c"}\n'
                          '{"prompt": [{"role": "user", "content": "p"}], '
                          '"completion": [{"role": "assistant", "content": "c"}]}\n', 2,
                          "record is conversational (message lists) but line 1 is plain text (strings); "
                          "use one style for the whole file"),
    "prompt_ends_assistant.jsonl": ('{"prompt": [{"role": "user", "content": "p"}, {"role": "assistant", '
                                    '"content": "x"}], "completion": [{"role": "assistant", "content": "c"}]}\n', 1,
                                    "the last `prompt` message is assistant; a conversational prompt must end with "
                                    "the user message to answer - move the reply into the response field"),
    "bad_label.csv": ("text,label\nhello,greeting\nbye,\n", 3, "`label` is empty; give every row its class name or id"),
    "bad_columns.csv": ("question,answer\na,b\n", 1,
                        "CSV header has columns ['question', 'answer'] but no accepted set of required columns; "
                        "name the columns one of: instruction,output; prompt,completion; prompt,chosen,rejected; "
                        "text,label"),
    "short_row.csv": ('text,label\n"multi\nline",x\nonly-text\n', 4,
                      "row has 1 fields but the header has 2; quote fields that contain commas or newlines"),
    "sharegpt_role.json": ('[\n  {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n'
                           '  {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}\n]\n',
                           3, "conversations[1] has unknown \"from\" value 'bot'; use system, human or gpt "
                              "(user and assistant also work)"),
    "not_list.json": ('"just a string"\n', None, 'top level is a JSON string; expected a list of records or {"data": [records]}'),
    "broken.json": ('[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]\n', 3,
                    "not valid JSON (Expecting ',' delimiter, column 16); fix the syntax or use .jsonl with "
                    "one record per line"),
    "data.txt": ("hello\n", None, "unsupported file type '.txt'; use .jsonl, .json, .csv or .parquet (optionally "
                               ".gz-compressed) or a directory written by save_to_disk"),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_cli_reports_planted_fault(tmp_path, name):
    text, line, message = FAULTS[name]
    path = write(tmp_path / name, text)
    result = run_cli("validate", path)
    where = f"{path}:{line}" if line else str(path)  # whole-file problems have no line
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"{where}: {message}\n")


def test_cli_reports_non_utf8_byte_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "tea", "label": "drink"}\n{"text": "caf\xe9", "label": "drink"}\n')
    result = run_cli("validate", path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"{path}:2: byte 0xe9 is not valid UTF-8; re-save the file as UTF-8 "
                             "(e.g. iconv -f latin1 -t utf-8)\n")


def test_cli_reports_missing_file(tmp_path):
    result = run_cli("validate", tmp_path / "nope.jsonl")
    assert (result.returncode, result.stderr) == (1, f"{tmp_path / 'nope.jsonl'}: file not found; check the path\n")


def test_cli_format_mismatch():
    result = run_cli("validate", "data/samples/chat.jsonl", "--format", "preference")
    assert (result.returncode, result.stderr) == (1, "data/samples/chat.jsonl:1: record is not preference (it looks "
                                                     "like chat): `prompt`, `chosen`, `rejected` are missing; fix the "
                                                     "record or pass the right --format\n")


def test_cli_summary_counts():
    result = run_cli("validate", "data/samples/chat.jsonl", "--format", "chat")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"path": "data/samples/chat.jsonl", "format": "chat", "records": 12,
                                         "conversational": True, "assistant_turns": 17, "messages": 38,
                                         "multi_turn": 4, "with_system": 4}


# ---------------------------------------------------------------- convert


def test_convert_sharegpt_and_refuse_overwrite(tmp_path):
    out = tmp_path / "chat.jsonl"
    result = run_cli("convert", "data/samples/sharegpt.json", out, "--to", "chat")
    assert (result.returncode, json.loads(result.stdout)) == (0, {
        "input": "data/samples/sharegpt.json", "output": str(out), "format": "chat", "records": 6})
    converted = [r.data for r in load_records(out)]
    assert converted == [r.data for r in load_records(REPO / "data/samples/sharegpt.json")]
    again = run_cli("convert", "data/samples/sharegpt.json", out)
    assert (again.returncode, again.stderr) == (1, f"{out}: output file already exists; refusing to overwrite - "
                                                   "delete it or choose another output path\n")


def test_convert_instruction_csv_to_chat(tmp_path):
    out = tmp_path / "chat.jsonl"
    assert run_cli("convert", "data/samples/instruction.csv", out, "--to", "chat").returncode == 0
    records, fmt = load_dataset_file(out)
    assert (fmt, len(records)) == ("chat", 6)
    assert records[4].data == {"messages": [
        {"role": "user", "content": "Explain the difference between weather and climate."},
        {"role": "assistant", "content": "Weather is what the air is doing today, climate is the pattern of "
                                         "weather over many years."}]}


def test_convert_plain_completion_to_chat_is_refused(tmp_path):
    out = tmp_path / "chat.jsonl"
    result = run_cli("convert", "data/samples/completion.jsonl", out, "--to", "chat")
    assert (result.returncode, result.stderr) == (1, "data/samples/completion.jsonl:1: plain-text completion records "
                                                     "cannot become chat messages; convert without --to chat\n")
    assert not out.exists()
