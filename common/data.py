"""Load, validate and convert the small datasets the recipes train on.

A data problem should stop a run before the model loads, with one line that says
where it is and what to do: `<file>:<line>: <what is wrong>; <how to fix it>`, or
`<file>: <message>` when the problem is the whole file (not found, empty, wrong kind of file).

Formats (one per file, detected from the keys of each record):
  chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  instruction     {"instruction": str, "input": str (optional), "output": str}
  completion      {"prompt": str, "completion": str}, or message lists (conversational)
  preference      {"prompt": ..., "chosen": ..., "rejected": ...}, strings or message lists
  classification  {"text": str, "label": str | int}
Files (the kind is read from the bytes, the format from the records):
  .jsonl          one JSON object per line
  .json           a list of records, {"data": [...]}, or ShareGPT {"conversations": [...]} records
                  (which become chat records)
  .csv            header row; formats without message lists
  .parquet        one record per row (messages as list<struct<role, content>>); "line" = row number
  .gz             any of the above, gzip-compressed (.jsonl.gz, .json.gz, .csv.gz, .parquet.gz)
  directory       written by `datasets.save_to_disk` (the "train" split of a DatasetDict)
  Text is UTF-8 (a UTF-8, UTF-16 or UTF-32 byte order mark is honoured). Refused with a line that
  says what the file is and what to do: UTF-16 without a byte order mark, other binary files
  (zip, NUL bytes), a pretty-printed JSON array or object inside a .jsonl file.
Refused in any record (file:line and the field): duplicate JSON keys (JSON keeps the last one
silently), lone UTF-16 surrogates such as an escaped "\\ud800" (no tokenizer can encode them), text
that is empty, whitespace or only invisible characters (zero-width spaces, soft hyphens, BOMs), and
chat control tokens inside text ("<|im_end|>", "</s>", "[INST]", ...: the tokenizer would read them
as real turn boundaries). Without a tokenizer the control tokens checked are CONTROL_MARKERS; the
recipes check against their tokenizer's own special tokens instead (check_control_tokens).

    python -m common.data validate data/persona/train.jsonl
    python -m common.data validate images.jsonl       # image chats ({"messages", "images"}: common/vlm.py)
    python -m common.data convert data/samples/sharegpt.json /tmp/chat.jsonl --to chat

Recipes load SFT data with `load_sft_data` (each file's format detected on its own; `--eval_split`
holds out part of the training file with `split_eval`).
"""

import argparse
import csv
import functools
import gzip
import io
import json
import logging
import os
import random
import re
import sys
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

FORMATS = ("chat", "instruction", "completion", "preference", "classification")
SFT_FORMATS = ("chat", "instruction", "completion")
REQUIRED_KEYS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Turn and sequence markers of common chat templates (ChatML, Llama 2/3, Mistral, Gemma, Phi, Zephyr,
# gpt-oss). Checked when no tokenizer is at hand; with one, its own special tokens are checked.
CONTROL_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|start|>", "<|message|>", "<|channel|>", "<|return|>",
)
# Characters that render as nothing but are not whitespace to str.strip(): format characters (Cf:
# zero-width space/joiners, word joiner, BOM, soft hyphen, ...), separators, controls, and fillers.
INVISIBLE_CATEGORIES = ("Cf", "Cc", "Zs", "Zl", "Zp")
INVISIBLE_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
GZIP_MAGIC, PARQUET_MAGIC, ZIP_MAGIC = b"\x1f\x8b", b"PAR1", b"PK\x03\x04"
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


class DataError(ValueError):
    """A problem in a data file: str(e) == f"{path}:{line}: {message}", or f"{path}: {message}" when
    `line` is None (the problem is the whole file, not one record)."""

    def __init__(self, path, line, message):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}" if line is not None else f"{self.path}: {message}")


@dataclass
class Record:
    data: dict  # the record; ShareGPT records are already converted to {"messages": [...]}
    path: str  # file it came from
    line: int  # 1-based line where the record starts (row index + 1 for parquet and save_to_disk)


# ---------------------------------------------------------------- loading


def load_records(path):
    """Read every record of a data file (see the module docstring for the kinds) or a save_to_disk directory."""
    path = str(path)
    if os.path.isdir(path):
        records = _load_saved_dataset(path)
    else:
        records = _load_file(path)
    if not records:
        raise DataError(path, None, "file holds no records; add at least one record")
    for record in records:
        if "conversations" in record.data:
            record.data = _sharegpt_to_chat(record)
    return records


def _load_file(path):
    raw = _read_bytes(path)
    name = path
    if raw[:2] == GZIP_MAGIC:  # by content: a gzip file named .jsonl is read too
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, None, f"gzip data is damaged or cut off ({e}); re-download or re-compress "
                                        "the file (gzip -t FILE tests it)") from None
        name = path[:-3] if path.lower().endswith(".gz") else path
        if not raw.strip():
            raise DataError(path, None, "file is empty once decompressed; write at least one record")
    elif path.lower().endswith(".gz"):
        raise DataError(path, None, "file is named .gz but is not gzip-compressed (it does not start with the "
                                    "bytes 1f 8b); rename it without .gz")
    suffix = os.path.splitext(name)[1].lower()
    if raw[:4] == PARQUET_MAGIC or suffix == ".parquet":
        return _load_parquet(path, raw)
    if suffix not in TEXT_SUFFIXES:
        inner = " inside the gzip file" if name != path else ""
        raise DataError(path, None, f"unsupported file type {suffix or '(no suffix)'!r}{inner}; use .jsonl, .json, "
                                    ".csv or .parquet (optionally .gz-compressed) or a directory written by "
                                    "save_to_disk")
    text = _decode_text(path, raw)
    return {".jsonl": _load_jsonl, ".json": _load_json, ".csv": _load_csv}[suffix](path, text)


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(path, None, "file not found; check the path") from None
    except OSError as e:
        raise DataError(path, None, f"cannot read file ({e.strerror}); check the path and permissions") from None
    if not raw.strip():
        raise DataError(path, None, "file is empty; write at least one record")
    return raw


def _decode_text(path, raw):
    """UTF-8 text (a byte order mark decides UTF-8/16/32); other encodings and binary files are refused."""
    for bom, codec in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                       (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(codec)
            except UnicodeDecodeError as e:
                raise DataError(path, None, f"file starts with a {codec.upper()} byte order mark but byte {e.start} "
                                            f"is not valid {codec.upper()}; re-save it as UTF-8") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is harmless; drop it
    if raw[:4] == ZIP_MAGIC:
        raise DataError(path, None, "file is a ZIP archive (a .zip, or a spreadsheet such as .xlsx), not text; "
                                    "unzip it, or export the sheet as .csv")
    if b"\x00" in raw:
        head = raw[:4096]
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if max(even, odd) > 0.3 * len(head) / 2 and min(even, odd) < 0.05 * len(head) / 2:
            codec = "UTF-16LE" if odd > even else "UTF-16BE"
            name = os.path.basename(path)
            stem, suffix = os.path.splitext(name)
            raise DataError(path, None, f"file looks like {codec} text without a byte order mark (every other byte "
                                        f"is 0); convert it to UTF-8: iconv -f {codec} -t UTF-8 {name} > "
                                        f"{stem}.utf8{suffix}")
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise DataError(path, line, "NUL byte: this is a binary file, not UTF-8 text; pass the .jsonl/.json/.csv/"
                                    ".parquet file itself")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, f"byte 0x{raw[e.start]:02x} is not valid UTF-8; "
                                    "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs):
    """json object_pairs_hook: a key that occurs twice in one object is an error, not "last one wins"."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _duplicate_key_message(key):
    return (f"duplicate key {key!r} in one JSON object; JSON keeps only the last value, silently - "
            f"keep one {key!r} and delete (or rename) the other")


def _load_jsonl(path, text):
    records = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = STRICT.decode(line)
        except _DuplicateKey as e:
            raise DataError(path, number, _duplicate_key_message(e.key)) from None
        except json.JSONDecodeError as e:
            if not records:
                _refuse_pretty_json(path, text, line, number)
            raise DataError(path, number, f"not valid JSON ({e.msg}, column {e.colno}); each line must be "
                                          "one complete JSON object - look for a truncated or wrapped line") from None
        if not isinstance(data, dict):
            raise DataError(path, number, f"line is a JSON {_json_type(data)}, not an object; "
                                          "write each record as {\"key\": value, ...} on its own line")
        records.append(Record(data, path, number))
    return records


def _refuse_pretty_json(path, text, first_line, number):
    """The first record line does not parse: say so when the file is pretty-printed JSON, not JSON Lines."""
    name = os.path.basename(path)
    head = first_line.strip()
    if head.startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            raise DataError(path, None, f"file is one JSON array of {len(whole)} elements spread over "
                                        f"{len(text.splitlines())} lines (pretty-printed JSON), not JSON Lines; "
                                        "rename it to .json (a list of records is read as is), or write one record "
                                        f"per line: jq -c '.[]' {name} > fixed.jsonl")
    if head == "{":
        raise DataError(path, number, "records are pretty-printed over several lines (this line is only '{'), but "
                                      "JSON Lines needs each record on one line; rewrite it with one record per "
                                      f"line (jq -c . {name} > fixed.jsonl), or rename it to .json if it is a "
                                      "single JSON document")


def _load_json(path, text):
    duplicate = None
    try:
        try:
            data = STRICT.decode(text)
        except _DuplicateKey as e:
            data, duplicate = json.loads(text), e.key  # parse again to find the record's line below
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            raise DataError(path, e.lineno, "not valid JSON (Extra data): a second value follows the first, so "
                                            "this looks like JSON Lines (one object per line); rename it to .jsonl") from None
        raise DataError(path, e.lineno, f"not valid JSON ({e.msg}, column {e.colno}); fix the syntax "
                                        "or use .jsonl with one record per line") from None
    start = len(text) - len(text.lstrip())  # where the top-level value begins
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        items, start = data["data"], _find_data_list(text, start)
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(path, None, f"top level is a JSON {_json_type(data)}; "
                                    "expected a list of records or {\"data\": [records]}")
    lines = _element_lines(text, start)
    if duplicate is not None:
        raise DataError(path, _duplicate_line(text, start, lines), _duplicate_key_message(duplicate))
    records = []
    for item, line in zip(items, lines):
        if not isinstance(item, dict):
            raise DataError(path, line, f"list element is a JSON {_json_type(item)}, not an object; "
                                        "every record must be {\"key\": value, ...}")
        records.append(Record(item, path, line))
    return records


def _duplicate_line(text, start, lines):
    """Line of the first list element (of the array at text[start]) holding a duplicate key; else None."""
    pos = start + 1
    for line in lines:
        pos = _skip(text, pos)
        try:
            _, pos = STRICT.raw_decode(text, pos)
        except _DuplicateKey:
            return line
    return None  # the duplicate is outside the records (e.g. two "data" keys): the whole file


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
    twice = [name for name, n in Counter(header).items() if n > 1]
    if twice:
        raise DataError(path, 1, f"CSV header names the column {twice[0]!r} {header.count(twice[0])} times; only the "
                                 "last one would be kept, silently - rename or delete the others")
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


def _load_parquet(path, raw):
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(pyarrow.BufferReader(raw))
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(path, None, f"cannot read it as parquet ({e}); re-export the file, or pass .jsonl/.csv") from None
    twice = [name for name, n in Counter(table.column_names).items() if n > 1]
    if twice:
        raise DataError(path, None, f"parquet file has the column {twice[0]!r} twice; rename or drop one")
    # Arrow fills keys a row lacks with None (also inside structs); drop them so the row looks like a JSON record.
    return [Record(_drop_none(row), path, index + 1) for index, row in enumerate(table.to_pylist())]


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _load_saved_dataset(path):
    import datasets  # imported here: the validate CLI should start fast

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(path, None, "directory is not a dataset written by save_to_disk; pass a .jsonl/.json/"
                                    ".csv/.parquet file or a save_to_disk directory") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(path, None, f"DatasetDict has splits {sorted(dataset)} but no 'train' split; "
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


def validate_records(records, fmt="auto", option="--format", control_tokens=CONTROL_MARKERS):
    """Check every record against its format; raise DataError for the first problem, else return a summary.

    `option` names the flag that sets the format where the caller is (the hint in a format mismatch);
    `control_tokens`: strings no text may contain (() = skip; recipes check their tokenizer's instead).
    """
    if not records:
        raise ValueError("no records to validate")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    first = None  # (record, format, conversational) that fixes the file's format
    counts = Counter()
    labels = Counter()
    for record in records:
        try:
            _check_encodable(record.data)
            record_fmt = _record_format(record.data, fmt, option)
            if first and record_fmt != first[1]:
                raise ValueError(f"record is {record_fmt} but line {first[0].line} is {first[1]}; "
                                 "one file must hold one format - split it into separate files")
            conversational = CHECKS[record_fmt](record.data, counts)
            if first and conversational != first[2]:
                kinds = {True: "conversational (message lists)", False: "plain text (strings)"}
                raise ValueError(f"record is {kinds[conversational]} but line {first[0].line} is "
                                 f"{kinds[first[2]]}; use one style for the whole file")
            if control_tokens:
                _check_control_tokens(record.data, record_fmt, control_tokens)
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


def _record_format(data, fmt, option):
    if fmt == "auto":
        return detect_format(data)
    missing = [k for k in REQUIRED_KEYS[fmt] if k not in data]
    if missing:
        try:
            looks_like = f" (it looks like {detect_format(data)})"
        except ValueError:
            looks_like = ""
        raise ValueError(f"record is not {fmt}{looks_like}: {_missing(missing)}; "
                         f"fix the record or pass the right {option}")
    return fmt


def _missing(keys):
    return f"`{'`, `'.join(keys)}` {'is' if len(keys) == 1 else 'are'} missing"


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)


def _strings(value, where=""):
    """(what, string) for every string in a JSON value, dict keys included; `what` names it for a message."""
    if isinstance(value, str):
        yield f"`{where}`", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (f"a key of `{where}`" if where else "a key of the record"), key
            yield from _strings(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


def _check_encodable(data):
    """No lone surrogate anywhere: JSON lets "\\ud800" through, and every tokenizer fails on it."""
    for what, text in _strings(data):
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} holds a lone UTF-16 surrogate \\u{ord(text[e.start]):04x} at character "
                             f"{e.start} (half of an escaped pair, e.g. an emoji cut in two), which no tokenizer can "
                             "encode; delete it or write the whole character") from None


def _invisible(ch):
    return ch.isspace() or ch in INVISIBLE_FILLERS or unicodedata.category(ch) in INVISIBLE_CATEGORIES


def _blank(text):
    """None when `text` has a visible character, else why it is blank ("empty or whitespace only" / which
    invisible characters it holds)."""
    stripped = text.strip()
    if not stripped:
        return "empty or whitespace only"
    if not all(_invisible(ch) for ch in stripped):
        return None
    names = [f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}" for ch in dict.fromkeys(stripped)]
    return f"only invisible characters ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _check_text(data, field, optional_empty=False):
    """`field` must be a string; non-blank unless optional_empty."""
    value = data[field]
    if not isinstance(value, str):
        raise ValueError(f"`{field}` is a {_json_type(value)}, expected a string; quote the value")
    blank = None if optional_empty else _blank(value)
    if blank:
        raise ValueError(f"`{field}` is {blank}; write the text or drop the record")


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
        blank = _blank(content)
        if blank:
            raise ValueError(f"{field}[{i}] ({role}) content is {blank}; "
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




# ---------------------------------------------------------------- chat control tokens in text


def _texts(data, fmt):
    """(what, text) for every string of a (validated) record that is tokenized, named as in other messages."""
    fields = {"chat": ("messages",), "instruction": ("system", "instruction", "input", "output"),
              "completion": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
              "classification": ("text", "label")}[fmt]
    for field in fields:
        value = data.get(field)
        if isinstance(value, str):
            yield f"`{field}`", value
        elif isinstance(value, list):
            for i, message in enumerate(value):
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield f"{field}[{i}] ({message.get('role')}) content", message["content"]


@functools.lru_cache(maxsize=16)
def _token_pattern(tokens):
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _check_control_tokens(data, fmt, tokens, source=None):
    pattern = _token_pattern(tuple(sorted(tokens)))
    for what, text in _texts(data, fmt):
        found = pattern.search(text)
        if found:
            token = found.group()
            whose = f" (a special token of {source})" if source else ""
            raise ValueError(f"{what} contains the chat control token {token!r}{whose}: the tokenizer reads it as a "
                             "real turn or sequence boundary, not as text, so the words after it would be trained "
                             f"as another turn; remove it (or break it up, e.g. {token[0] + ' ' + token[1:]!r}, "
                             "where the text is about the token itself)")


def tokenizer_control_tokens(tokenizer):
    """The strings `tokenizer` turns into special tokens: its named special tokens and every added token
    marked special (ChatML's <|im_start|> is often only the latter). Whitespace and 1-character tokens are
    left out: text cannot avoid them."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []))
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return tuple(sorted(t for t in tokens if isinstance(t, str) and len(t.strip()) > 1))


def check_control_tokens(records, fmt, tokenizer, source="the tokenizer"):
    """Refuse any record whose text holds one of `tokenizer`'s special tokens (DataError at file:line).

    `records`: Record objects, or dicts with a `where` ("file:line") key (common.preference records).
    Run it after the tokenizer loads and before the model does.
    """
    tokens = tokenizer_control_tokens(tokenizer)
    if not tokens:
        return
    for record in records:
        data, (path, line) = (record.data, (record.path, record.line)) if isinstance(record, Record) else \
            (record, _split_where(record["where"]))
        try:
            _check_control_tokens(data, fmt, tokens, source)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None


def _split_where(where):
    path, _, line = where.rpartition(":")
    return (path, int(line)) if line.isdigit() else (where, None)


# ---------------------------------------------------------------- loading for the recipes


def load_dataset_file(path, fmt="auto", option="--dataset_format", control_tokens=CONTROL_MARKERS):
    """Load and validate a data file; returns (records, resolved format). `option`: the flag that sets
    `fmt` where the caller is (recipes: --dataset_format)."""
    records = load_records(path)
    return records, validate_records(records, fmt, option, control_tokens)["format"]


def load_sft_data(train_path, eval_path=None, train_format="auto", eval_split=0.0, seed=42, control_tokens=()):
    """(train records, train format, eval records, eval format) for supervised fine-tuning.

    `train_format` (--dataset_format) applies to the training file only: the eval file's format is detected
    on its own, so a CSV instruction file trains with the default chat-format held-out set. Both must be
    SFT formats (chat, instruction, completion). `eval_split` > 0 holds out that fraction of the training
    records (split_eval, seeded) instead of reading `eval_path`. `control_tokens`: () because the recipes
    check their tokenizer's special tokens (check_control_tokens) once it is loaded.
    """
    check_format_option(train_format, SFT_FORMATS)
    if eval_split:
        check_eval_split(eval_split)
    train, fmt = load_dataset_file(train_path, train_format, control_tokens=control_tokens)
    _require_sft(train_path, fmt)
    if eval_split:
        if eval_path:
            log.info("--eval_split %g: the held-out set comes from %s; --eval_dataset_path %s is not used",
                     eval_split, train_path, eval_path)
        train, held_out = split_eval(train, eval_split, seed)
        log.info("--eval_split %g: %d of %d training records held out (seed %d), %d left to train on",
                 eval_split, len(held_out), len(train) + len(held_out), seed, len(train))
        return train, fmt, held_out, fmt
    if not eval_path:
        return train, fmt, [], None
    held_out, eval_fmt = load_dataset_file(eval_path, "auto", control_tokens=control_tokens)
    _require_sft(eval_path, eval_fmt)
    return train, fmt, held_out, eval_fmt


def check_format_option(value, allowed, option="--dataset_format"):
    """A recipe's format option is auto or one of `allowed` (the formats that recipe trains on)."""
    if value != "auto" and value not in allowed:
        raise DataError(option, None, f"{value!r} is not a format this recipe trains on; use auto or "
                                      f"{' | '.join(allowed)}")


def _require_sft(path, fmt):
    if fmt not in SFT_FORMATS:
        use = {"preference": "recipes/dpo.py or recipes/reward_model.py",
               "classification": "recipes/evaluate.py --classification_dataset_path"}[fmt]
        raise DataError(path, None, f"holds {fmt} records, which are not SFT data; SFT trains on chat, instruction "
                                    f"or completion records ({fmt} data goes to {use})")


def check_eval_split(fraction, option="--eval_split"):
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(option, None, f"{fraction!r} is not a fraction between 0 and 1 (exclusive); e.g. 0.1 holds "
                                      "out 10% of the training records as the evaluation set (0 = no split)")


def split_eval(records, fraction, seed, option="--eval_split"):
    """(train, held out): a seeded random `fraction` of `records` (at least one) held out, both in file order.

    The same records, fraction and seed always give the same split (every rank of a multi-process run
    computes it alike); the two parts are disjoint and together are `records`.
    """
    check_eval_split(fraction, option)
    n = len(records)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(option, None, f"{fraction} of {n} records holds out {k}, leaving none to train on; "
                                      "use a smaller fraction, more records, or an --eval_dataset_path file")
    held = set(random.Random(seed).sample(range(n), k))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


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


def sft_items(records, fmt):
    """common.collator.tokenize_sft's input: ("file:line", messages or None, record data) per record."""
    return [(f"{r.path}:{r.line}", to_messages(r.data, fmt), r.data) for r in records]


# ---------------------------------------------------------------- CLI


def _convert(args):
    records = load_records(args.input)
    fmt = validate_records(records, args.format)["format"]
    if os.path.exists(args.output):
        raise DataError(args.output, None, "output file already exists; refusing to overwrite - "
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
    validate.add_argument("--format", choices=("auto",) + FORMATS + ("image_chat",), default="auto")
    convert.add_argument("--format", choices=("auto",) + FORMATS, default="auto")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate" and (args.format == "image_chat" or (
                args.format == "auto" and any("images" in r.data for r in load_records(args.path)[:1]))):
            from common.vlm import image_chat_summary  # {"messages", "images"} records: every image opened too

            try:
                summary = image_chat_summary(args.path)
            except ValueError as e:  # common.data's DataError, a different class from this __main__ module's
                raise DataError(e.path, e.line, e.message) if hasattr(e, "message") else e from None
        elif args.command == "validate":
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
