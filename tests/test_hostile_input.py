"""Hostile input: every malformed record is used, or skipped with a counted, named reason; never a traceback,
never a silently dropped row (property-based with hypothesis, plus 1,000 generated malformed records)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_modules.training.data import DataError, DataOptions, DataReport, build_examples
from malformed import jsonl_bytes, malformed_files  # scripts/malformed.py (pyproject: pytest pythonpath)

KINDS = ("blank line", "not UTF-8", "not JSON", "not a JSON object", "unknown record format", "missing field",
         "wrong type", "empty field", "unpaired surrogate", "unknown role", "misplaced system turn", "no assistant turn",
         "no user turn", "chat template error", "longer than max_length", "no trainable token")
KEYS = ("conversations", "messages", "prompt", "completion", "question", "answer", "text", "system", "from", "value",
        "role", "content")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                 max_size=3), max_leaves=8)
roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "", "USER"]) | st.text(max_size=5)
turns = st.lists(st.dictionaries(st.sampled_from(["from", "value", "role", "content"]), roles | json_values, max_size=3),
                 max_size=4)
texts = st.text(max_size=30) | st.sampled_from(["", " ", "\n"]) | st.integers(50, 3000).map(lambda n: "w " * n)
records = st.dictionaries(st.sampled_from(KEYS), texts | turns | json_values, max_size=4)
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),  # random bytes, mostly not UTF-8 or not JSON
    records.map(lambda r: json.dumps(r).encode()[: len(json.dumps(r)) // 2]),  # cut short
)


def read(path: Path, tokenizer, batch: list[bytes] | None = None, **options
         ) -> tuple[list[dict], DataReport, DataError | None]:
    """build_examples' examples and report (of ``batch`` written as ``path`` when given); a DataError is returned."""
    if batch is not None:
        path.write_bytes(b"\n".join(batch) + b"\n")
    report = DataReport()
    try:
        examples, _ = build_examples(path, tokenizer, DataOptions(max_length=128, **options), report)
        return examples, report, None
    except DataError as error:
        return [], report, error


def assert_every_row_accounted(path: Path, count: int, examples: list[dict], report: DataReport) -> None:
    used = [e["row"] for e in examples]
    skipped = [where for where, _ in report.skipped_rows]
    assert sorted(used + skipped, key=lambda w: int(w.rsplit(":", 1)[1])) == [f"{path}:{n}" for n in range(1, count + 1)]
    assert report.rows == count and report.used + sum(report.skipped.values()) == count
    for _, reason in report.skipped_rows:
        assert reason.startswith(KINDS), reason


def test_1000_generated_malformed_records_are_each_skipped_with_their_named_reason(tmp_path, tokenizer):
    files = malformed_files(1000, seed=0, max_length=256)
    assert sum(len(lines) - 1 for lines in files.values()) >= 1000
    for fmt, lines in files.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_bytes(jsonl_bytes(fmt, lines))
        examples, report = build_examples(path, tokenizer, DataOptions(on_bad_row="skip", max_length=256))
        reasons = dict(report.skipped_rows)
        assert [e["row"] for e in examples] == [f"{path}:1"]  # the good first record, and only it
        for number, bad in enumerate(lines[1:], start=2):
            assert reasons[f"{path}:{number}"] == bad.reason, (fmt, number, bad.line[:80])
        assert_every_row_accounted(path, len(lines), examples, report)


@SETTINGS
@given(st.lists(lines, min_size=1, max_size=12))
def test_random_lines_are_used_or_skipped_with_a_named_reason(tmp_path, tokenizer, batch):
    path = tmp_path / "random.jsonl"
    examples, report, error = read(path, tokenizer, batch, on_bad_row="skip")
    assert_every_row_accounted(path, len(batch), examples, report)
    # an error exactly when nothing is usable: then one named error about the whole file
    assert (error is not None) == (not examples)
    assert error is None or "no usable rows" in str(error) or "max_length" in str(error)


@SETTINGS
@given(st.lists(lines, min_size=1, max_size=6))
def test_with_on_bad_row_error_a_bad_row_is_named_by_file_and_line(tmp_path, tokenizer, batch):
    path = tmp_path / "random.jsonl"
    # what skipping reads tells which rows are bad: those skipped for a reason other than a row that is fine to drop
    skip_examples, skip_report, skip_error = read(path, tokenizer, batch, on_bad_row="skip")
    dropped_anyway = ("blank line", "no trainable token", "longer than max_length")
    bad = [int(where.rsplit(":", 1)[1]) for where, reason in skip_report.skipped_rows if not reason.startswith(dropped_anyway)]
    examples, report, error = read(path, tokenizer, batch, on_bad_row="error")
    if bad:  # it stops at the first bad row and names it by file and line
        assert error is not None and not examples, (bad, error)
        assert str(error).startswith(f"{path}:{bad[0]}"), (bad, str(error))
        assert report.rows == bad[0]
    else:  # no bad row: it reads what skipping reads
        assert examples == skip_examples and str(error) == str(skip_error)


GOOD = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}"} for i in range(3)]


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{% endfor %}", "no trainable token"),  # renders nothing at all
    ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}", "no trainable token"),
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "chat template error: template"),
])
@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_templates_that_render_nothing_or_refuse_are_counted_then_named(tmp_path, tokenizer, template, reason, loss_on):
    quiet = copy.deepcopy(tokenizer)
    quiet.chat_template = template
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    examples, report, error = read(path, quiet, on_bad_row="skip", loss_on=loss_on)
    if loss_on == "all" and "m.role == 'user'" in template:  # every token is trained: the user text alone is an example
        assert len(examples) == 3 and error is None
        return
    assert not examples and "no usable rows" in str(error)
    assert all(r.startswith(reason) for _, r in report.skipped_rows) and len(report.skipped_rows) == 3
    assert_every_row_accounted(path, 3, examples, report)
