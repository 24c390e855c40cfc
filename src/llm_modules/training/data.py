"""Training data: record formats -> conversations -> tokens + loss masks; length filter; split; collator.

Record formats (auto-detected per file from its first record, then required of every row):

- ``sharegpt``: ``conversations: [{from, value}]`` (+ optional ``system``): Bespoke-Stratos-17k, ShareGPT.
- ``messages``: OpenAI style ``messages: [{role, content}]``.
- ``prompt_completion``: ``prompt`` + ``completion`` (strings, or lists of messages as in TRL).
- ``gsm8k``: ``question`` + ``answer``.
- ``text``: plain ``text`` (no turns: every token is trained, whatever ``loss_on`` says).

Rendering: ``template="chat"`` uses the tokenizer's chat template; ``template="plain"`` is the
paper's ``System:/User:/Assistant:`` layout; ``template="raw"`` concatenates the turns' contents as they are
(a prompt and its completion, as lm-evaluation-harness scores them: the letter formats). The assistant mask is computed from character
spans, found by rendering the conversation prefix by prefix (real chat templates lack
``{% generation %}`` markers), then mapped onto tokens with ``return_offsets_mapping``.

Every row that is not used is counted in :class:`DataReport` with its ``file:row``; a bad row
raises :class:`DataError` (or is skipped and counted with ``on_bad_row="skip"``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from ..errors import LLMModulesError
from ..model.loss import IGNORE_INDEX
from .padding import pad_rows

FORMATS = ("sharegpt", "messages", "prompt_completion", "gsm8k", "text")
TEMPLATES = ("chat", "plain", "raw")
LOSS_ON = ("assistant", "all")
OVERLENGTH = ("drop", "truncate")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
BLANK = "blank line"  # counted, never an error

Message = dict[str, str]


class DataError(LLMModulesError):
    """Bad training data: the message names the file, the row (1-based line) and the field."""

    def __init__(self, where: str, field_name: str | None, problem: str, reason: str = "bad row") -> None:
        # reason: a short stable name for counting skipped rows ("not JSON", "wrong type", ...)
        self.where, self.field, self.problem, self.reason = where, field_name, problem, reason
        at = f"{where}, field '{field_name}'" if field_name else where
        super().__init__(f"{at}: {problem}")


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Record:
    """One raw row: ``where`` is ``file:row`` (1-based line for jsonl, 1-based index otherwise)."""

    where: str
    data: Any


def _is_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not name.endswith(LOCAL_SUFFIXES)


def read_records(source: str | Path, split: str = "train") -> Iterator[Record | DataError]:
    """Raw rows of a local ``.jsonl``/``.json``/``.parquet`` file or a hub dataset ``owner/name``.

    Undecodable rows are yielded as :class:`DataError` (the caller raises or counts them), so
    one bad line never hides the others.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield Record(f"{path}:{index}", row)
        else:
            raise DataError(str(path), None, f"unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
        return
    if path.is_dir():
        raise DataError(str(path), None, "is a folder; give one .jsonl/.json/.parquet file or a hub dataset name")
    if not _is_hub_name(text):
        raise DataError(text, None, "no such file; give a .jsonl/.json/.parquet file or a hub dataset name owner/name")
    from datasets import load_dataset

    try:
        dataset = load_dataset(text, split=split)
    except Exception as error:  # noqa: BLE001 - any hub/IO failure becomes one actionable message
        raise DataError(f"hub:{text}[{split}]", None, f"could not load the dataset ({type(error).__name__}: {error}); "
                        "check the name and split, or download it and pass a local file") from error
    for index, row in enumerate(dataset, start=1):
        yield Record(f"hub:{text}[{split}]:{index}", row)


def _read_jsonl(path: Path) -> Iterator[Record | DataError]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield DataError(where, None, f"is not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8",
                                "not UTF-8")
                continue
            if not line.strip():
                yield DataError(where, None, "is blank", BLANK)
                continue
            try:
                yield Record(where, json.loads(line))
            except json.JSONDecodeError as error:
                yield DataError(where, None, f"is not valid JSON ({error.msg} at column {error.colno})", "not JSON")
            except RecursionError:
                yield DataError(where, None, "is JSON nested too deeply to read", "not JSON")


def _read_json(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(str(path), None, f"is not a valid UTF-8 JSON file ({error})") from error
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(str(path), None, "expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(str(path), None, "expected a JSON list of records")
    for index, row in enumerate(data, start=1):
        yield Record(f"{path}:{index}", row)


# ------------------------------------------------------------------------------- format -> messages
def detect_format(record: Record) -> str:
    """The format of one record, from its keys."""
    data = record.data
    if not isinstance(data, dict):
        raise DataError(record.where, None, f"expected a JSON object, got {type(data).__name__}", "not a JSON object")
    if "conversations" in data:
        return "sharegpt"
    if "messages" in data:
        return "messages"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "question" in data and "answer" in data:
        return "gsm8k"
    if "text" in data:
        return "text"
    raise DataError(
        record.where, None,
        f"cannot tell the record format from its keys {sorted(data)[:10]}; expected one of: conversations "
        "(ShareGPT/Bespoke-Stratos), messages (OpenAI), prompt+completion, question+answer (GSM8K), text",
        "unknown record format",
    )


def _string(record: Record, name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(record.where, name, f"expected a string, got {type(value).__name__}", "wrong type")
    if not allow_empty and not value.strip():
        raise DataError(record.where, name, "is empty; expected text", "empty field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(record.where, name, f"holds an unpaired surrogate {value[error.start]!r} at character "
                        f"{error.start} (not text a tokenizer can read)", "unpaired surrogate") from None
    return value


def _field(record: Record, name: str) -> Any:
    if not isinstance(record.data, dict):
        raise DataError(record.where, None, f"expected a JSON object, got {type(record.data).__name__}", "not a JSON object")
    if name not in record.data or record.data[name] is None:
        raise DataError(record.where, name, f"is missing (the file's format needs it; keys: {sorted(record.data)[:10]})",
                        "missing field")
    return record.data[name]


def _turns(record: Record, name: str, turns: Any, role_key: str, content_key: str,
           role_names: dict[str, str]) -> list[Message]:
    if not isinstance(turns, list):
        raise DataError(record.where, name, f"expected a list of turns, got {type(turns).__name__}", "wrong type")
    if not turns:
        raise DataError(record.where, name, "is an empty conversation; expected at least a user and an assistant turn",
                        "empty field")
    messages = []
    for index, turn in enumerate(turns):
        here = f"{name}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(record.where, here, f"expected an object with '{role_key}' and '{content_key}'", "wrong type")
        for key in (role_key, content_key):
            if key not in turn or turn[key] is None:
                raise DataError(record.where, f"{here}.{key}", "is missing", "missing field")
        role = role_names.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(record.where, f"{here}.{role_key}",
                            f"unknown role {str(turn[role_key])[:40]!r}; expected one of {sorted(role_names)}", "unknown role")
        messages.append({"role": role, "content": _string(record, f"{here}.{content_key}", turn[content_key], True)})
    return messages


def to_messages(record: Record, fmt: str, default_system: str | None = None) -> list[Message]:
    """The conversation of one record as ``[{role, content}]`` with roles system/user/assistant.

    ``text`` records become a single ``{"role": "text"}`` message (no template, all tokens trained).
    Checks: known roles, system only first, no empty conversation, at least one assistant turn.
    """
    if fmt == "text":
        return [{"role": "text", "content": _string(record, "text", _field(record, "text"))}]
    if fmt == "sharegpt":
        messages = _turns(record, "conversations", _field(record, "conversations"), "from", "value", SHAREGPT_ROLES)
        system = record.data.get("system")
        if system is not None and str(system).strip():
            messages.insert(0, {"role": "system", "content": _string(record, "system", system)})
    elif fmt == "messages":
        messages = _turns(record, "messages", _field(record, "messages"), "role", "content", {r: r for r in ROLES})
    elif fmt == "prompt_completion":
        messages = []
        for name, role in (("prompt", "user"), ("completion", "assistant")):
            value = _field(record, name)
            if isinstance(value, list):  # TRL's conversational prompt/completion
                messages += _turns(record, name, value, "role", "content", {r: r for r in ROLES})
            else:
                messages.append({"role": role, "content": _string(record, name, value)})
    elif fmt == "gsm8k":
        messages = [
            {"role": "user", "content": _string(record, "question", _field(record, "question"))},
            {"role": "assistant", "content": _string(record, "answer", _field(record, "answer"))},
        ]
    else:
        raise LLMModulesError(f"format={fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    for index, message in enumerate(messages):
        if message["role"] == "system" and index != 0:
            raise DataError(record.where, fmt, f"turn {index} is a system message; a system message may only come first",
                            "misplaced system turn")
    if default_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(record.where, fmt, "has no assistant turn; expected at least one (nothing to learn)", "no assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(record.where, fmt, "has no user turn; expected user -> assistant turns", "no user turn")
    return messages


# ---------------------------------------------------------------------------------------- rendering
def render_plain(messages: Sequence[Message], add_generation_prompt: bool = False, eos: str = "") -> str:
    """The paper's layout: ``System:\\n\\n{s}\\n\\n`` ``User:\\n\\n{u}\\n\\n`` ``Assistant:\\n\\n{a}\\n\\n``.

    ``eos`` is appended after the last assistant turn (the paper appends none).
    """
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "".join(f"{names[m['role']]}:\n\n{m['content']}\n\n" for m in messages)
    if messages and messages[-1]["role"] == "assistant":
        text += eos
    if add_generation_prompt:
        text += "Assistant:\n\n"
    return text


@dataclass(frozen=True)
class Renderer:
    """Turns messages into text and the character spans of the assistant turns."""

    tokenizer: PreTrainedTokenizerBase
    template: str = "chat"
    append_eos: bool = True  # plain and raw templates only: end the last assistant turn with the EOS token

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise LLMModulesError(f"template={self.template!r} is not supported; choose one of {', '.join(TEMPLATES)}")
        if self.template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise LLMModulesError("the tokenizer has no chat template; use template: plain")

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        if messages and messages[0]["role"] == "text":
            return messages[0]["content"]
        if self.template == "plain":
            eos = (self.tokenizer.eos_token or "") if self.append_eos else ""
            return render_plain(messages, add_generation_prompt, eos)
        if self.template == "raw":
            text = "".join(m["content"] for m in messages)
            ends_reply = messages and messages[-1]["role"] == "assistant" and self.append_eos
            return text + ((self.tokenizer.eos_token or "") if ends_reply else "")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: Sequence[Message]) -> str:
        """The text a model is given to answer: every turn before the last assistant turn + its header."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self.render(messages[:last], add_generation_prompt=True)

    def end_of_turn(self) -> str:
        """The text this rendering puts after an assistant reply to end its turn ("<|im_end|>" for ChatML, the EOS
        token for plain and raw text when ``append_eos``), found by rendering a probe reply; "" when there is none."""
        probe = "\x00reply\x00"
        messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": probe}]
        text = self.render(messages)
        return text[text.rindex(probe) + len(probe):].strip()

    def render_with_spans(self, messages: Sequence[Message], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """Full text and the [start, end) character spans of every assistant turn.

        Each span runs from the end of ``render(prefix, add_generation_prompt=True)`` to the end of
        ``render(prefix + [turn])`` without trailing whitespace: the content and its end-of-turn marker.
        """
        text = self.render(messages)
        if self.template == "plain":  # built piece by piece: the EOS ends only the last turn
            spans, position = [], 0
            for index, message in enumerate(messages):
                piece = render_plain([message])
                if message["role"] == "assistant":
                    header = len("Assistant:\n\n")
                    end = len(text) if index == len(messages) - 1 else position + len(piece)
                    spans.append((position + header, end))
                position += len(piece)
            return text, spans
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = self.render(messages[:index], add_generation_prompt=True)
            end_text = self.render(messages[: index + 1])
            if not (text.startswith(start_text) and text.startswith(end_text)):
                raise DataError(
                    where, "template",
                    "the chat template renders a conversation prefix differently from the full conversation "
                    "(it rewrites earlier turns), so the assistant tokens cannot be located; use template: plain "
                    "or loss_on: all",
                )
            end = max(len(end_text.rstrip()), len(start_text))
            if index == len(messages) - 1:
                end = max(end, len(text.rstrip()))  # whatever the template adds after the last turn (e.g. EOS)
            spans.append((len(start_text), end))
        return text, spans


def assistant_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for every token whose characters overlap an assistant span. offsets: [T] (start, end) pairs."""
    mask = []
    for start, end in offsets:
        mask.append(any(start < b and end > a for a, b in spans) if end > start else False)
    return mask


# --------------------------------------------------------------------------------- tokenized data set
@dataclass
class DataReport:
    """What happened to every row read: counts plus the first few locations of each kind of skip."""

    rows: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: list[tuple[str, str]] = field(default_factory=list)  # every skipped (file:row, reason), in order
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0
    train: int = 0
    validation: int = 0
    format: str = ""
    longest: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.skipped_rows.append((where, reason))
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def summary(self) -> str:
        parts = [f"{self.rows} rows read ({self.format}), {self.used} used"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        for reason, count in sorted(self.skipped.items()):
            parts.append(f"{count} skipped: {reason} (e.g. {', '.join(self.examples[reason])})")
        parts.append(f"split: {self.train} train / {self.validation} validation")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "used": self.used, "truncated": self.truncated, "skipped": dict(self.skipped),
                "skipped_examples": self.examples, "train": self.train, "validation": self.validation,
                "format": self.format, "longest_tokens": self.longest}


@dataclass(frozen=True)
class DataOptions:
    """How rows become training examples."""

    format: str = "auto"
    template: str = "chat"
    loss_on: str = "assistant"
    max_length: int = 2048
    overlength: str = "drop"
    on_bad_row: str = "error"  # | "skip" (counted and reported)
    system_prompt: str | None = None
    append_eos: bool = True
    limit: int | None = None  # use the first N good rows
    split: str = "train"  # hub datasets

    def __post_init__(self) -> None:
        for name, value, choices in (("format", self.format, ("auto", *FORMATS)), ("template", self.template, TEMPLATES),
                                     ("loss_on", self.loss_on, LOSS_ON), ("overlength", self.overlength, OVERLENGTH),
                                     ("on_bad_row", self.on_bad_row, ("error", "skip"))):
            if value not in choices:
                raise LLMModulesError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise LLMModulesError(f"max_length must be an integer >= 2, got {self.max_length!r}")


def tokenize_messages(
    messages: Sequence[Message], renderer: Renderer, loss_on: str = "assistant", where: str = ""
) -> tuple[list[int], list[int]]:
    """input_ids [T] and labels [T] (-100 outside the assistant turns unless loss_on='all')."""
    tokenizer = renderer.tokenizer
    try:
        if loss_on == "all" or messages[0]["role"] == "text":
            text, spans = renderer.render(messages), None
        else:
            text, spans = renderer.render_with_spans(messages, where)
    except TemplateError as error:  # e.g. a template's raise_exception("roles must alternate")
        raise DataError(where, "template", f"the chat template refused this conversation ({error})",
                        "chat template error") from None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = list(encoded["input_ids"])
    if spans is None:
        return ids, list(ids)
    mask = assistant_token_mask(encoded["offset_mapping"], spans)
    return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


def build_examples(
    sources: str | Path | Iterable[Record],
    tokenizer: PreTrainedTokenizerBase,
    options: DataOptions = DataOptions(),
    report: DataReport | None = None,
) -> tuple[list[dict], DataReport]:
    """Rows -> examples ``{"input_ids": [T], "labels": [T], "row": "file:row"}`` plus the report.

    Hand-written loop (not ``Dataset.map``): each row's error must name its own file and line.
    """
    report = report or DataReport()
    renderer = Renderer(tokenizer, options.template, options.append_eos)
    records = read_records(sources, options.split) if isinstance(sources, (str, Path)) else sources
    fmt = None if options.format == "auto" else options.format
    examples: list[dict] = []
    over_length: list[tuple[int, str]] = []
    for record in records:
        report.rows += 1
        try:
            if isinstance(record, DataError):
                raise record
            if fmt is None:
                fmt = detect_format(record)
            messages = to_messages(record, fmt, options.system_prompt)
            ids, labels = tokenize_messages(messages, renderer, options.loss_on, record.where)
        except DataError as error:
            if options.on_bad_row == "error" and error.reason != BLANK:
                raise DataError(error.where, error.field,
                                error.problem + " (on_bad_row: skip skips such rows and counts them)") from None
            report.skip(_reason(error), error.where)
            continue
        if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
            report.skip("no trainable token (the template renders nothing to train on)", record.where)
            continue
        report.longest = max(report.longest, len(ids))
        if len(ids) > options.max_length:
            over_length.append((len(ids), record.where))
            if options.overlength == "drop":
                report.skip(f"longer than max_length={options.max_length}", record.where)
                continue
            ids, labels = ids[: options.max_length], labels[: options.max_length]
            report.truncated += 1
        if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
            report.skip("no trainable token left (assistant turn cut by max_length)", record.where)
            continue
        examples.append({"input_ids": ids, "labels": labels, "row": record.where})
        if options.limit is not None and len(examples) >= options.limit:
            break
    report.format = fmt or "?"
    report.used = len(examples)
    if not examples:
        if over_length and len(over_length) + sum(v for k, v in report.skipped.items() if "max_length" not in k) >= report.rows:
            longest = max(over_length)
            raise DataError(str(sources) if isinstance(sources, (str, Path)) else "data", "max_length",
                            f"all {report.rows} rows are over max_length={options.max_length} tokens or unusable "
                            f"(shortest over-length row {min(over_length)[0]} tokens, longest {longest[0]} at "
                            f"{longest[1]}); raise max_length or use overlength: truncate")
        raise DataError(str(sources) if isinstance(sources, (str, Path)) else "data", None,
                        f"no usable rows ({report.summary()})")
    return examples, report


def _reason(error: DataError) -> str:
    """The counted name of a skipped row: its kind and, where there is one, its field (list indices dropped)."""
    field_name = re.sub(r"\[\d+\]", "[]", error.field) if error.field else None
    return f"{error.reason}: {field_name}" if field_name and error.reason != "bad row" else error.reason


# ---------------------------------------------------------------------------------------------- split
def split_examples(examples: list[dict], validation: float | int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split, drawn once (fixed across epochs, unlike the release).

    Each example's place is a hash of (seed, its token ids): the split depends only on the seed
    and the content, identical rows always fall on the same side (no duplicate leaks into
    validation), and it never changes between epochs or on resume.
    ``validation``: a fraction in [0, 1) or a count of examples.
    """
    if validation <= 0:
        return list(examples), []
    count = int(validation) if validation >= 1 else max(1, math.ceil(len(examples) * validation))
    if count >= len(examples):
        raise LLMModulesError(f"validation={validation} leaves no training rows out of {len(examples)}")

    def key(example: dict) -> str:
        return hashlib.sha256(f"{seed}:{example['input_ids']}".encode()).hexdigest()

    order = sorted(range(len(examples)), key=lambda i: key(examples[i]))
    chosen = set(order[:count])
    # Never split identical examples across the two sides.
    held = {key(examples[i]) for i in chosen}
    train = [e for i, e in enumerate(examples) if i not in chosen and key(e) not in held]
    val = [examples[i] for i in sorted(chosen)]
    return train, val


def fingerprint_examples(examples: Sequence[dict]) -> str:
    """sha256 of every example's input_ids and labels, in order: identifies tokenized data exactly."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()


def to_dataset(examples: Sequence[dict]) -> Dataset:
    """A ``datasets.Dataset`` with columns input_ids, labels, row."""
    return Dataset.from_dict({key: [e[key] for e in examples] for key in ("input_ids", "labels", "row")})


@dataclass
class PreparedData:
    train: Dataset
    validation: Dataset | None
    report: DataReport
    fingerprint: str


def prepare_data(
    data: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    options: DataOptions = DataOptions(),
    validation: float | int = 0.0,
    validation_data: str | Path | None = None,
    seed: int = 0,
) -> PreparedData:
    """Read, render, tokenize, filter and split one data source (plus an optional validation file)."""
    examples, report = build_examples(data, tokenizer, options)
    if validation_data is not None:
        train = examples
        val, _ = build_examples(validation_data, tokenizer, options)
    else:
        train, val = split_examples(examples, validation, seed)
    report.train, report.validation = len(train), len(val)
    return PreparedData(to_dataset(train), to_dataset(val) if val else None, report,
                        fingerprint_examples(train + val))


# ------------------------------------------------------------------------------------------ collator
@dataclass
class PaddingCollator:
    """Dynamic right padding: input_ids with pad id, attention_mask 0 and labels -100 on padding.

    Features may carry ``source_states`` [T, d_s] or [T, n, d_s] (the source-state cache): padded with zeros.
    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (+ source_states [B, T, d_s]).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    keep_rows: bool = False  # also return "rows": each example's file:row (named when its loss is NaN)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, attention = pad_rows([f["input_ids"] for f in features], self.pad_token_id, length=length)
        labels, _ = pad_rows([f["labels"] for f in features], IGNORE_INDEX, length=length)
        states = None
        for i, (feature, n) in enumerate(zip(features, lengths)):
            if "source_states" in feature:
                s = torch.as_tensor(feature["source_states"])
                if states is None:
                    states = torch.zeros((len(features), length, *s.shape[1:]), dtype=s.dtype)
                states[i, :n] = s
        out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if states is not None:
            out["source_states"] = states
        if self.keep_rows:
            out["rows"] = [str(f.get("row", "?")) for f in features]
        return out
