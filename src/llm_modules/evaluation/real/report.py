"""The real table's report: ``real-transfer.md``, ``real-transfer.json`` and ``real-transfer.png`` (accuracy vs cost).

Per row: accuracy on each held-out set as the mean over seeds ± the spread (half the range between the
lowest and highest seed; 0 with one seed), a 95% Wilson interval on the pooled answers, the gap closed
``(row - target SFT) / (source - target SFT)``, trainable and inference parameters, seconds per question on
the machine that ran it (rows that read the source include the source's prefill), training wall time, and
one held-out question the row got wrong while the source got it right.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ...training.atomic import atomic_write_json
from .questions import HELDOUT_TASKS

TASK_NAMES = {"arc_challenge": "ARC-Challenge", "mmlu": "MMLU"}
SFT_ROWS = ("sft", "lora_sft")  # the reference of "gap closed": full SFT where the pair has it, else LoRA-SFT


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(runs: dict[str, dict], task: str) -> dict:
    values = [run[task]["accuracy"] for run in runs.values()]
    correct = sum(run[task]["correct"] for run in runs.values())
    n = sum(run[task]["n"] for run in runs.values())
    low, high = wilson(correct, n)
    return {"mean": statistics.mean(values), "spread": (max(values) - min(values)) / 2,
            "per_seed": {seed: run[task]["accuracy"] for seed, run in runs.items()},
            "ci95": [low, high], "n": runs[next(iter(runs))][task]["n"]}


def rows_json(results: dict, command: str) -> list[dict]:
    out = []
    for key, runs in results.get("rows", {}).items():
        pair, row = key.split("/")
        first = runs[next(iter(runs))]
        entry = {"row": row, "pair": pair, "seeds": [int(s) for s in runs], "command": f"{command} --pair {pair} --row {row}"}
        for task in HELDOUT_TASKS:
            entry[task] = summarise(runs, task)
        entry["n"] = {task: entry[task]["n"] for task in HELDOUT_TASKS}
        entry["seconds_per_question"] = statistics.mean(
            run[task]["seconds_per_question"] for run in runs.values() for task in HELDOUT_TASKS)
        entry["trainable_params"] = first.get("trainable_params", 0)
        entry["inference_params"] = first.get("inference_params", 0)
        entry["train_seconds"] = statistics.mean(run.get("train_seconds", 0.0) for run in runs.values())
        out.append(entry)
    for entry in out:  # gap closed against the pair's target SFT and the source alone
        pair_rows = {e["row"]: e for e in out if e["pair"] == entry["pair"]}
        reference = next((pair_rows[r] for r in SFT_ROWS if r in pair_rows), None)
        source = pair_rows.get("source_alone")
        entry["gap_closed"] = {}
        entry["gap_reference"] = reference["row"] if reference else None
        for task in HELDOUT_TASKS:
            if reference and source and source[task]["mean"] != reference[task]["mean"]:
                entry["gap_closed"][task] = (entry[task]["mean"] - reference[task]["mean"]) / (
                    source[task]["mean"] - reference[task]["mean"])
    return out


def _example(results: dict, key: str, questions: dict) -> str:
    """One held-out question this row got wrong where the source was right (seed of the first run)."""
    pair = key.split("/")[0]
    runs = results["rows"][key]
    run = runs[next(iter(runs))]
    source_runs = results["rows"].get(f"{pair}/source_alone")
    source = source_runs[next(iter(source_runs))] if source_runs else None
    for task in HELDOUT_TASKS:
        for i, (qid, predicted) in enumerate(zip(run[task]["ids"], run[task]["predictions"])):
            question = questions[task].get(qid)
            if question is None or predicted == question.answer:
                continue
            if source and source[task]["predictions"][i] != question.answer:
                continue
            letters = question.letters
            text = question.question.strip().replace("\n", " ")
            text = text if len(text) <= 140 else text[:137] + "..."
            return (f"{TASK_NAMES[task]} `{qid}`: \"{text}\" right {letters[question.answer]} "
                    f"({question.choices[question.answer][:40]}); this row {letters[predicted]} "
                    f"({question.choices[predicted][:40]})" + ("; the source " + letters[question.answer] if source else ""))
    return "(no held-out question where this row missed and the source was right)"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown(results: dict, rows: list[dict], sets) -> str:
    questions = {task: {q.id: q for q in qs} for task, qs in sets.heldout.items()}
    settings = results.get("settings", {})
    passed = results.get("source_pass", {})
    lines = [
        "# Real models, real questions: the transfer table",
        "",
        f"Source: `{Path(settings.get('source', '')).name}` (frozen). Transfer: {len(sets.transfer)} ARC-Easy + "
        f"ARC-Challenge train questions; held out: {len(sets.heldout['arc_challenge'])} ARC-Challenge test and "
        f"{len(sets.heldout['mmlu'])} MMLU test questions, never trained on (ids in `real-transfer.json`). "
        "Letter format, the answer is the highest-logit letter. Learning rates were fixed before any score was "
        "seen; nothing was chosen on these questions.",
        "",
        f"Source pass: {passed.get('prompts', '?')} prompts, {passed.get('tokens', 0):,} tokens in "
        f"{passed.get('seconds', 0):.0f} s ({passed.get('dtype', '?')}).",
        "",
        "| pair | row | seeds | ARC-Challenge | 95% CI | MMLU | 95% CI | gap closed (ARC / MMLU) | trainable | "
        "inference params | s / question | training s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        arc, mmlu = e["arc_challenge"], e["mmlu"]
        gap = " / ".join(_pct(e["gap_closed"][t]) if t in e["gap_closed"] else "-" for t in HELDOUT_TASKS)
        lines.append(
            f"| {e['pair']} | `{e['row']}` | {len(e['seeds'])} | {_pct(arc['mean'])} ± {_pct(arc['spread'])} | "
            f"{_pct(arc['ci95'][0])}-{_pct(arc['ci95'][1])} | {_pct(mmlu['mean'])} ± {_pct(mmlu['spread'])} | "
            f"{_pct(mmlu['ci95'][0])}-{_pct(mmlu['ci95'][1])} | {gap} | {e['trainable_params'] / 1e6:.2f}M | "
            f"{e['inference_params'] / 1e6:.0f}M | {e['seconds_per_question']:.3f} | {e['train_seconds']:.0f} |")
    lines += ["", "Gap closed is against each pair's target SFT (`sft`, or `lora_sft` where the pair has no full SFT "
              "row) and the source alone. ± is half the range over seeds. Seconds per question and training seconds "
              "are wall times on the machine that ran the table (rows that read the source include its share of the "
              "source pass); other jobs may have shared its cores, so read them as upper bounds.",
              "", "## One miss per row", ""]
    for e in rows:
        lines.append(f"- {e['pair']} `{e['row']}`: {_example(results, e['pair'] + '/' + e['row'], questions)}")
    lines += ["", "## Commands", "", "```bash"]
    lines += sorted({e["command"] for e in rows})
    lines += ["```", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for axis, task in zip(axes, HELDOUT_TASKS):
        for e in rows:
            marker = "*" if e["row"] in ("source_alone", "target_alone") else "o"
            axis.errorbar(e["seconds_per_question"], 100 * e[task]["mean"], yerr=100 * e[task]["spread"],
                          fmt=marker, markersize=9 if marker == "*" else 6, capsize=3)
            axis.annotate(f"{e['pair']}:{e['row']}", (e["seconds_per_question"], 100 * e[task]["mean"]),
                          fontsize=7, xytext=(4, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("seconds per question (log; this machine)")
        axis.set_ylabel(f"{TASK_NAMES[task]} accuracy (%)")
        axis.set_title(TASK_NAMES[task])
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: dict, config, sets) -> None:
    rows = rows_json(results, config.command or "llm-modules compare --config CONFIG")
    if not rows:
        return
    folders = [Path(config.output)] + ([Path(config.docs)] if config.docs else [])
    document = {"questions": results["questions"], "source_pass": results.get("source_pass"), "rows": rows,
                "settings": results.get("settings")}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "real-transfer.json", document)
        (folder / "real-transfer.md").write_text(markdown(results, rows, sets))
        plot(rows, folder / "real-transfer.png")
