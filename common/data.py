"""Load, validate and convert the small datasets the recipes train on.

A data problem should stop a run before the model loads, with one line that says
where it is and what to do: `<file>:<line>: <what is wrong>; <how to fix it>`.

Formats (one per file, detected from the keys of each record):
  chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  instruction     {"instruction": str, "input": str (optional), "output": str}
  completion      {"prompt": str, "completion": str}, or message lists (conversational)
  preference      {"prompt": ..., "chosen": ..., "rejected": ...}, strings or message lists
  classification  {"text": str, "label": str | int}
Files: .jsonl, .json (a list, {"data": [...]}, or ShareGPT {"conversations": [...]} records,
which become chat records), .csv (header row), or a directory written by `save_to_disk`.

    python -m common.data validate data/persona/train.jsonl
    python -m common.data convert data/samples/sharegpt.json /tmp/chat.jsonl --to chat
"""

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

FORMATS = ("chat", "instruction", "completion", "preference", "classification")
REQUIRED_KEYS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A problem in a data file, located at a line: str(e) == f"{path}:{line}: {message}"."""

    def __init__(self, path, line, message):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}")


@dataclass
class Record:
    data: dict  # the record; ShareGPT records are already converted to {"messages": [...]}
    path: str  # file it came from
    line: int  # 1-based line where the record starts (row index + 1 for save_to_disk datasets)


# ---------------------------------------------------------------- loading


def load_records(path):
    """Read every record of a .jsonl/.json/.csv file or a save_to_disk directory."""
    path = str(path)
    if os.path.isdir(path):
        records = _load_saved_dataset(path)
    else:
        text = _read_text(path)
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".jsonl":
            records = _load_jsonl(path, text)
        elif suffix == ".json":
            records = _load_json(path, text)
        elif suffix == ".csv":
            records = _load_csv(path, text)
        else:
            raise DataError(path, 1, f"unsupported file type {suffix or '(no suffix)'!r}; "
                                     "use .jsonl, .json, .csv or a directory written by save_to_disk")
    if not records:
        raise DataError(path, 1, "file holds no records; add at least one record")
    for record in records:
        if "conversations" in record.data:
            record.data = _sharegpt_to_chat(record)
    return records


def _read_text(path):
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise DataError(path, 1, "file not found; check the path") from None
    except OSError as e:
        raise DataError(path, 1, f"cannot read file ({e.strerror}); check the path and permissions") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is harmless; drop it
    if not raw.strip():
        raise DataError(path, 1, "file is empty; write at least one record")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, f"byte 0x{raw[e.start]:02x} is not valid UTF-8; "
                                    "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _load_jsonl(path, text):
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, number, f"not valid JSON ({e.msg}, column {e.colno}); each line must be "
                                          "one complete JSON object - look for a truncated or wrapped line") from None
        if not isinstance(data, dict):
            raise DataError(path, number, f"line is a JSON {_json_type(data)}, not an object; "
                                          "write each record as {\"key\": value, ...} on its own line")
        records.append(Record(data, path, number))
    return records


def _load_json(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"not valid JSON ({e.msg}, column {e.colno}); fix the syntax "
                                        "or use .jsonl with one record per line") from None
    start = len(text) - len(text.lstrip())  # where the top-level value begins
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        items, start = data["data"], _find_data_list(text, start)
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(path, 1, f"top level is a JSON {_json_type(data)}; "
                                 "expected a list of records or {\"data\": [records]}")
    lines = _element_lines(text, start)
    records = []
    for item, line in zip(items, lines):
        if not isinstance(item, dict):
            raise DataError(path, line, f"list element is a JSON {_json_type(item)}, not an object; "
                                        "every record must be {\"key\": value, ...}")
        records.append(Record(item, path, line))
    return records


def _skip(text, pos, chars=" \t\r\n,"):
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _find_data_list(text, start):
    """Position of the '[' that opens the "data" list of the (valid JSON) object at text[start]."""
    decoder = json.JSONDecoder()
    pos = _skip(text, start + 1)
    while text[pos] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos, " \t\r\n:")
        if key == "data":
            return pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
    raise AssertionError("no data key")  # unreachable: the caller checked data["data"] exists


def _element_lines(text, start):
    """1-based line where each element of the (valid JSON) array at text[start] begins."""
    decoder = json.JSONDecoder()
    lines, line, pos = [], text.count("\n", 0, start) + 1, start + 1
    while True:
        next_pos = _skip(text, pos)
        line += text.count("\n", pos, next_pos)
        if text[next_pos] == "]":
            return lines
        lines.append(line)
        _, pos = decoder.raw_decode(text, next_pos)
        line += text.count("\n", next_pos, pos)


def _load_csv(path, text):
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader)]
    known = [keys for keys in REQUIRED_KEYS.values() if set(keys) <= set(header)]
    if not known:
        accepted = "; ".join(",".join(keys) for fmt, keys in REQUIRED_KEYS.items() if fmt != "chat")
        raise DataError(path, 1, f"CSV header has columns {header} but no accepted set of required columns; "
                                 f"name the columns one of: {accepted}")
    records, row_start = [], reader.line_num + 1
    for row in reader:
        if any(cell.strip() for cell in row):
            if len(row) != len(header):
                raise DataError(path, row_start, f"row has {len(row)} fields but the header has {len(header)}; "
                                                 "quote fields that contain commas or newlines")
            records.append(Record(dict(zip(header, row)), path, row_start))
        row_start = reader.line_num + 1
    return records


def _load_saved_dataset(path):
    import datasets  # imported here: the validate CLI should start fast

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(path, 1, "directory is not a dataset written by save_to_disk; "
                                 "pass a .jsonl/.json/.csv file or a save_to_disk directory") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(path, 1, f"DatasetDict has splits {sorted(dataset)} but no 'train' split; "
                                     "save the training split as 'train'")
        dataset = dataset["train"]
    # Arrow fills columns a row lacks with None; drop them so the row looks like the original record.
    return [Record({k: v for k, v in row.items() if v is not None}, path, index + 1)
            for index, row in enumerate(dataset)]


def _sharegpt_to_chat(record):
    """{"conversations": [{"from": "human", "value": ...}]} -> {"messages": [{"role": "user", "content": ...}]}."""
    turns = record.data["conversations"]
    if not isinstance(turns, list):
        raise DataError(record.path, record.line, f"`conversations` is a JSON {_json_type(turns)}; it must be "
                                                  "a list of {\"from\": ..., \"value\": ...} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(record.path, record.line, f"conversations[{i}] is not a {{\"from\", \"value\"}} "
                                                      "object; write it as {\"from\": \"human\", \"value\": \"...\"}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(record.path, record.line, f"conversations[{i}] has unknown \"from\" value "
                                                      f"{turn['from']!r}; use system, human or gpt "
                                                      "(user and assistant also work)")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    data = {k: v for k, v in record.data.items() if k != "conversations"}
    return {"messages": messages, **data}


# ---------------------------------------------------------------- format detection


def detect_format(data):
    """Name the format of one record from its keys; ValueError when no format matches."""
    keys = set(data)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"text", "label"} <= keys:
        return "classification"
    accepted = "; ".join(f"{'+'.join(required)} ({fmt})" for fmt, required in REQUIRED_KEYS.items())
    closest = _closest_format(keys)
    hint = f" - looks like {closest[0]} but {_missing(closest[1])}" if closest else ""
    raise ValueError(f"record has keys {sorted(keys)}{hint}; accepted key sets: {accepted}")


def _closest_format(keys):
    """(format, missing keys) for the format whose required keys this record shares most, or None."""
    candidates = [(len(set(required) & keys), fmt, [k for k in required if k not in keys])
                  for fmt, required in REQUIRED_KEYS.items()]
    shared, fmt, missing = max(candidates, key=lambda c: (c[0], -len(c[2])))
    return (fmt, missing) if shared else None


# ---------------------------------------------------------------- validation


def validate_records(records, fmt="auto"):
    """Check every record against its format; raise DataError for the first problem, else return a summary."""
    if not records:
        raise ValueError("no records to validate")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    first = None  # (record, format, conversational) that fixes the file's format
    counts = Counter()
    labels = Counter()
    for record in records:
        try:
            record_fmt = _record_format(record.data, fmt)
            if first and record_fmt != first[1]:
                raise ValueError(f"record is {record_fmt} but line {first[0].line} is {first[1]}; "
                                 "one file must hold one format - split it into separate files")
            conversational = CHECKS[record_fmt](record.data, counts)
            if first and conversational != first[2]:
                kinds = {True: "conversational (message lists)", False: "plain text (strings)"}
                raise ValueError(f"record is {kinds[conversational]} but line {first[0].line} is "
                                 f"{kinds[first[2]]}; use one style for the whole file")
        except ValueError as e:
            raise DataError(record.path, record.line, str(e)) from None
        if record_fmt == "classification":
            labels[str(record.data["label"])] += 1
        first = first or (record, record_fmt, conversational)
    summary = {"path": records[0].path, "format": first[1], "records": len(records), "conversational": first[2]}
    summary.update(sorted(counts.items()))
    if labels:
        summary["labels"] = dict(sorted(labels.items()))
    return summary


def _record_format(data, fmt):
    if fmt == "auto":
        return detect_format(data)
    missing = [k for k in REQUIRED_KEYS[fmt] if k not in data]
    if missing:
        try:
            looks_like = f" (it looks like {detect_format(data)})"
        except ValueError:
            looks_like = ""
        raise ValueError(f"record is not {fmt}{looks_like}: {_missing(missing)}; "
                         f"fix the record or pass the right --format")
    return fmt


def _missing(keys):
    return f"`{'`, `'.join(keys)}` {'is' if len(keys) == 1 else 'are'} missing"


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)


def _check_text(data, field, optional_empty=False):
    """`field` must be a string; non-blank unless optional_empty."""
    value = data[field]
    if not isinstance(value, str):
        raise ValueError(f"`{field}` is a {_json_type(value)}, expected a string; quote the value")
    if not optional_empty and not value.strip():
        raise ValueError(f"`{field}` is empty or whitespace only; write the text or drop the record")


def _check_messages(messages, field):
    """Each message is {"role": system|user|assistant, "content": non-blank string}."""
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if messages == [] else f"a {_json_type(messages)}"
        raise ValueError(f"`{field}` is {what}; it must be a non-empty list of "
                         "{\"role\": ..., \"content\": ...} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{field}[{i}] is a {_json_type(message)}, not an object; "
                             "write it as {\"role\": ..., \"content\": ...}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{field}[{i}] has role {role!r}; use one of system, user, assistant")
        if "content" not in message:
            raise ValueError(f"{field}[{i}] ({role}) has no `content`; add the message text")
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(f"{field}[{i}] ({role}) content is a {_json_type(content)}, expected a string; "
                             "quote the text")
        if not content.strip():
            raise ValueError(f"{field}[{i}] ({role}) content is empty or whitespace only; "
                             f"write the {role} text or drop the turn")


def _check_turn_order(messages, field):
    """Optional system first, then user/assistant alternating, starting with user."""
    offset = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            raise ValueError(f"{field}[{i}] is a system message after the start; a system message may only "
                             "come first - move it to the start or merge it into the first one")
        if i < offset:
            continue
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != expected:
            if i == offset:
                raise ValueError(f"{field}[{i}] is {role} but the conversation must open with a user message "
                                 "(after an optional system); add the user turn first")
            raise ValueError(f"{field}[{i}] is a second {role} message in a row; roles must alternate "
                             f"user/assistant - merge the two turns or insert the missing {expected} turn")


def _check_chat(data, counts):
    messages = data["messages"]
    _check_messages(messages, "messages")
    _check_turn_order(messages, "messages")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("`messages` has no assistant message, so there is nothing to learn; add the assistant reply")
    if roles[-1] == "user":
        raise ValueError(f"`messages` ends with a user message (messages[{len(roles) - 1}]) after the last "
                         "assistant reply, which teaches nothing; drop it or add the assistant reply")
    if "keywords" in data:
        keywords = data["keywords"]
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
            raise ValueError("`keywords` must be a list of non-empty strings; fix or drop the field")
    counts["messages"] += len(messages)
    counts["assistant_turns"] += roles.count("assistant")
    counts["with_system"] += roles[0] == "system"
    counts["multi_turn"] += roles.count("assistant") > 1
    return True


def _check_instruction(data, counts):
    _check_text(data, "instruction")
    _check_text(data, "output")
    for optional in ("input", "system"):
        if data.get(optional) is not None:
            _check_text(data, optional, optional_empty=True)
    counts["with_input"] += bool((data.get("input") or "").strip())
    return False


def _check_prompt_messages(prompt):
    """A conversational prompt: valid messages in turn order, ending with the user turn to answer."""
    _check_messages(prompt, "prompt")
    _check_turn_order(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the last `prompt` message is {prompt[-1]['role']}; a conversational prompt must end "
                         "with the user message to answer - move the reply into the response field")


def _check_response_messages(messages, field):
    _check_messages(messages, field)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise ValueError(f"{field}[{i}] is {message['role']}; `{field}` must hold only assistant messages "
                             "- put earlier turns in `prompt`")


def _is_conversational(data, fields):
    """True when every field is a message list, False when every field is a string; ValueError when mixed."""
    kinds = {field: isinstance(data[field], list) for field in fields}
    if all(kinds.values()):
        return True
    for field in fields:
        if kinds[field]:
            plain = [f for f in fields if not kinds[f]]
            raise ValueError(f"`{field}` is a message list but `{'`, `'.join(plain)}` is not; use strings "
                             "everywhere or message lists everywhere")
        _check_text(data, field)
    return False


def _check_completion(data, counts):
    conversational = _is_conversational(data, ("prompt", "completion"))
    if conversational:
        _check_prompt_messages(data["prompt"])
        _check_response_messages(data["completion"], "completion")
    return conversational


def _check_preference(data, counts):
    conversational = _is_conversational(data, ("prompt", "chosen", "rejected"))
    if conversational:
        _check_prompt_messages(data["prompt"])
        _check_response_messages(data["chosen"], "chosen")
        _check_response_messages(data["rejected"], "rejected")
        same = [m["content"].strip() for m in data["chosen"]] == [m["content"].strip() for m in data["rejected"]]
    else:
        same = data["chosen"].strip() == data["rejected"].strip()
    if same:
        raise ValueError("`chosen` is identical to `rejected`, so the pair carries no preference signal; "
                         "drop it or fix the rejected response")
    return conversational


def _check_classification(data, counts):
    _check_text(data, "text")
    label = data["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"`label` is a {_json_type(label)}; use a label name (string) or a class id (integer)")
    if isinstance(label, str) and not label.strip():
        raise ValueError("`label` is empty; give every row its class name or id")
    return False


CHECKS = {
    "chat": _check_chat,
    "instruction": _check_instruction,
    "completion": _check_completion,
    "preference": _check_preference,
    "classification": _check_classification,
}


def load_dataset_file(path, fmt="auto"):
    """Load and validate a data file; returns (records, resolved format)."""
    records = load_records(path)
    return records, validate_records(records, fmt)["format"]


# ---------------------------------------------------------------- SFT view


def to_messages(data, fmt):
    """The record as chat messages for supervised fine-tuning; None for plain-text completion records."""
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    if fmt == "instruction":
        messages = [{"role": "system", "content": data["system"]}] if data.get("system") else []
        user = data["instruction"]
        if (data.get("input") or "").strip():
            user += "\n\n" + data["input"]
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": data["output"]}]
    if fmt == "completion":
        if isinstance(data["prompt"], str):
            return None  # plain prompt + completion text: the caller tokenizes the raw strings
        return [dict(m) for m in data["prompt"]] + [dict(m) for m in data["completion"]]
    if fmt in ("preference", "classification"):
        raise ValueError(f"{fmt} records are not a single conversation to imitate; "
                         "use them with a preference or classification recipe")
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------- CLI


def _convert(args):
    records = load_records(args.input)
    fmt = validate_records(records, args.format)["format"]
    if os.path.exists(args.output):
        raise DataError(args.output, 1, "output file already exists; refusing to overwrite - "
                                        "delete it or choose another output path")
    rows = []
    for record in records:
        if args.to != "chat":
            rows.append(record.data)
            continue
        if fmt in ("preference", "classification"):
            raise DataError(record.path, record.line, f"{fmt} records cannot become chat messages; "
                                                      "convert without --to chat")
        messages = to_messages(record.data, fmt)
        if messages is None:
            raise DataError(record.path, record.line, "plain-text completion records cannot become chat messages; "
                                                      "convert without --to chat")
        extra = {k: v for k, v in record.data.items() if k == "keywords"}
        rows.append({"messages": messages, **extra})
    with open(args.output, "x", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"input": args.input, "output": args.output, "format": "chat" if args.to == "chat" else fmt,
            "records": len(rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a data file and print a one-line JSON summary")
    validate.add_argument("path")
    convert = commands.add_parser("convert", help="validate a data file and write it as JSONL")
    convert.add_argument("input")
    convert.add_argument("output", help="new .jsonl file (never overwritten)")
    convert.add_argument("--to", choices=["chat"], default=None, help="turn SFT records into chat messages")
    for command in (validate, convert):
        command.add_argument("--format", choices=("auto",) + FORMATS, default="auto")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            summary = validate_records(load_records(args.path), args.format)
        else:
            summary = _convert(args)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
