"""Does lm-evaluation-harness agree with the real table's own scoring? The same held-out ARC-Challenge questions.

For each model, lm-eval scores ``llm_modules_arc_challenge`` (the letter text of ``multiple_choice.letter_text``,
each letter by log-likelihood, no chat template) through its model type (``llm-modules`` for a saved composed
model, which runs its source live; lm-eval's ``hf`` for a plain one); our side is the real table's
``results.json`` (the same questions, scored by ``evaluation/real/scorers.py`` on the source-state cache).

    python benchmarks/real_lm_eval_agreement.py --results runs/real-arc/results.json \\
        --model smollm2/target_alone=~/.cache/real-models/smollm2-135m-instruct \\
        --model smollm2/fusion_prompt=runs/real-arc/models/smollm2-fusion_prompt-0 \\
        --output docs/results/lm-eval-agreement

Writes OUTPUT.md and OUTPUT.json: per model, both accuracies, the difference in points and the number of
questions where the two picked the same letter.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from llm_modules.evaluation.lm_eval_command import evaluate_with_lm_eval, model_type

TASK = "llm_modules_arc_challenge"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="the real table's results.json")
    parser.add_argument("--model", action="append", required=True, metavar="PAIR/ROW=FOLDER",
                        help="a row of the table and the saved model folder that produced its first seed")
    parser.add_argument("--data-dir", default=None, help="offline-datasets folder (default: $LLM_MODULES_DATASETS)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="docs/results/lm-eval-agreement")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    ids = results["questions"]["arc_challenge"]
    report = {}
    for spec in args.model:
        row, _, folder = spec.partition("=")
        folder = str(Path(folder).expanduser())
        runs = results["rows"][row]
        ours = runs[sorted(runs)[0]]["arc_challenge"]
        started = time.perf_counter()
        lm = evaluate_with_lm_eval(folder, [TASK], data_dir=args.data_dir, samples={TASK: list(range(len(ids)))},
                                   batch_size=args.batch_size, device="cpu", chat_template=False, log_samples=True)
        seconds = time.perf_counter() - started
        samples = sorted((s for s in lm["samples"][TASK] if s["filter"] == "none"), key=lambda s: s["doc_id"])
        if [s["doc"]["id"] for s in samples] != ids or ours["ids"] != ids:
            raise SystemExit(f"{row}: lm-eval scored other questions than the table")
        theirs = [max(range(len(s["resps"])), key=lambda k: s["resps"][k][0][0]) for s in samples]
        same = sum(a == b for a, b in zip(theirs, ours["predictions"]))
        accuracy = lm["results"][TASK]["acc,none"]
        report[row] = {"folder": folder, "model_type": model_type(Path(folder)), "n": len(ids),
                       "lm_eval_acc": accuracy, "ours_acc": ours["accuracy"],
                       "difference_points": 100 * abs(accuracy - ours["accuracy"]),
                       "same_prediction": same, "lm_eval_seconds": round(seconds, 1)}
        print(f"{row}: lm-eval {accuracy:.1%}, ours {ours['accuracy']:.1%}, same letter {same}/{len(ids)}", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = ["# lm-evaluation-harness vs the real table's scoring", "",
             "The same held-out ARC-Challenge questions (the real table's, `docs/results/real-transfer.md`), the same "
             "letter text (`multiple_choice.letter_text`, no chat template). lm-eval scores each letter by "
             "log-likelihood through its model type (`llm-modules` for the composed model, which loads and runs its "
             "1.5B source; `hf` for the plain target); ours reads the letters' logits at the answer point, with the "
             "source's states from the table's source pass.", "", "```bash", command, "```", "",
             "| row | model type | questions | lm-eval | ours | difference (points) | same letter |",
             "|---|---|---|---|---|---|---|"]
    for row, r in report.items():
        lines.append(f"| `{row}` | {r['model_type']} | {r['n']} | {100 * r['lm_eval_acc']:.1f}% | {100 * r['ours_acc']:.1f}% "
                     f"| {r['difference_points']:.1f} | {r['same_prediction']}/{r['n']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(text)
    output.with_suffix(".json").write_text(json.dumps({"command": command, "rows": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
