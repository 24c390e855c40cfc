"""Feed >= 1,000 generated malformed training records to the data loader; print how many were skipped for each reason.

    python scripts/malformed_records.py [--count 1000] [--seed 0] [--max-length 256] [--out FILE]

Each record is made with the reason it must be skipped for (scripts/malformed.py); the script
checks that the loader (on_bad_row: skip) named exactly that reason for exactly that row, that
every row is used or counted, and exits 1 otherwise. Tiny self-built tokenizer; CPU, seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from llm_modules.tiny import build_tokenizer
from llm_modules.training.data import DataOptions, build_examples

from malformed import jsonl_bytes, malformed_files  # scripts/malformed.py, beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer()
    counts: Counter = Counter()
    wrong: list[str] = []
    rows = used = 0
    with tempfile.TemporaryDirectory() as folder:
        for fmt, lines in malformed_files(args.count, args.seed, args.max_length).items():
            path = Path(folder) / f"{fmt}.jsonl"
            path.write_bytes(jsonl_bytes(fmt, lines))
            examples, report = build_examples(path, tokenizer, DataOptions(on_bad_row="skip", max_length=args.max_length))
            named = dict(report.skipped_rows)
            rows, used = rows + report.rows, used + report.used
            counts.update(reason for _, reason in report.skipped_rows)
            for number, bad in enumerate(lines, start=1):
                got = named.get(f"{path}:{number}")
                if got != (bad.reason if bad else None):
                    wrong.append(f"{fmt}:{number}: expected {bad.reason if bad else 'used'}, got {got or 'used'}")
    malformed = sum(counts.values())
    table = [f"{count:5d}  {reason}" for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    summary = (f"{rows} rows read: {used} good rows used, {malformed} malformed rows skipped with a named reason, "
               f"{rows - used - malformed} unaccounted, {len(wrong)} with another reason than expected")
    text = "\n".join(["count  reason", *table, "", summary, *wrong[:20]]) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(f"$ python scripts/malformed_records.py --count {args.count} --seed {args.seed}\n" + text)
    return 0 if not wrong and rows == used + malformed else 1


if __name__ == "__main__":
    sys.exit(main())
