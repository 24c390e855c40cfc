"""The comparison report: ``results.json`` (for machines), ``report.md`` (the paper's Table 1 as
numbers: one row per method, mean and spread over seeds) and PNG plots (accuracy bars with seed dots,
training curves, gate values by connector layer, a cross-attention map, the transfer-fraction sweep).

results.json schema (issue 4):
``{"chance": float, "methods": {name: {"test_accuracy": [per seed], "leak_probe_accuracy": [...],
"teacher_forced_accuracy": [...], "format_adherence": [...], "trainable_params": int,
"inference_params": int, "seconds": float, ...}}, ...}``; extra keys: seen/unseen accuracies,
validation accuracy, steps, the world, the source's recall, the settings and the sweep.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import torch

from .factworld.methods import MethodRun, Workbench

PER_SEED = {
    "test_accuracy": lambda r: r.scores.accuracy,
    "test_accuracy_seen": lambda r: r.scores.accuracy_seen,
    "test_accuracy_unseen": lambda r: r.scores.accuracy_unseen,
    "leak_probe_accuracy": lambda r: r.scores.leak_probe,
    "leak_logprob_shift": lambda r: r.scores.leak_shift,
    "teacher_forced_accuracy": lambda r: r.scores.teacher_forced,
    "format_adherence": lambda r: r.scores.format_adherence,
    "validation_accuracy": lambda r: r.validation_accuracy,
    "steps": lambda r: r.train.steps_run if r.train else 0,
    "best_step": lambda r: r.train.best_step if r.train else 0,
    "final_training_loss": lambda r: r.train.losses[-1] if r.train and r.train.losses else None,
}


def _clean(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def build_results(config, bench: Workbench, pretraining: dict, runs: Sequence[MethodRun], sweep: dict,
                  seconds: float) -> dict:
    methods: dict[str, dict] = {}
    for run in runs:
        entry = methods.setdefault(run.spec.name, {key: [] for key in PER_SEED} | {"seeds": [], "seconds_per_seed": []})
        for key, read in PER_SEED.items():
            entry[key].append(_clean(read(run)))
        entry["seeds"].append(run.seed)
        entry["seconds_per_seed"].append(run.seconds)
        entry["trainable_params"] = run.trainable_params
        entry["inference_params"] = run.inference_params
        entry["kind"] = run.spec.kind
        entry["options"] = dict(run.spec.options)
    for entry in methods.values():
        entry["seconds"] = sum(entry["seconds_per_seed"]) / len(entry["seconds_per_seed"])
    world = bench.world
    return {
        "chance": world.chance,
        "methods": methods,
        "world": {
            "kind": world.kind,
            "summary": world.summary(),
            "facts": len(world.facts),
            "transfer": len(world.transfer),
            "validation": len(world.validation),
            "test": len(world.test),
            "test_answer_seen": sum(world.answer_seen(f) for f in world.test),
        },
        "pretraining": pretraining,
        "sweep": {fraction: {name: [_clean(v) for v in values] for name, values in methods_at.items()}
                  for fraction, methods_at in sweep.items()},
        "settings": config.to_dict(),
        "seconds": seconds,
    }


def _mean_spread(values: Sequence[float | None]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]  # nan: no such facts (e.g. 0 unseen)
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.0%}"
    return f"{mean:.0%} ± {statistics.stdev(values):.0%}"


def _largest(values: Sequence[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{max(values):.2g}" if values else "n/a"


def _params(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"


def markdown_table(results: dict) -> str:
    """One row per method: accuracies on test facts (mean ± std over seeds) and costs."""
    seeds = max(len(m["seeds"]) for m in results["methods"].values())
    lines = [
        "| method | test acc | answer seen | answer unseen | teacher-forced | leak probe | leak Δlog p | format | "
        "trainable | inference | s/seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {name} | {_mean_spread(m['test_accuracy'])} | {_mean_spread(m['test_accuracy_seen'])} | "
            f"{_mean_spread(m['test_accuracy_unseen'])} | {_mean_spread(m['teacher_forced_accuracy'])} | "
            f"{_mean_spread(m['leak_probe_accuracy'])} | {_largest(m.get('leak_logprob_shift', []))} | "
            f"{_mean_spread(m['format_adherence'])} | "
            f"{_params(m['trainable_params'])} | {_params(m['inference_params'])} | {m['seconds']:.0f} |"
        )
    lines.append("")
    lines.append(f"{seeds} seed(s); ± is the standard deviation over seeds. Chance {results['chance']:.1%}.")
    return "\n".join(lines)


def _sweep_table(sweep: dict) -> str:
    if not sweep:
        return ""
    fractions = list(sweep)
    names = [n for n in sweep[fractions[0]] if not n.endswith("/unseen")]
    lines = ["| method | " + " | ".join(f"{float(f) * 100:g}%" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for name in names:
        cells = [_mean_spread(sweep[f].get(name, [])) + f" ({_mean_spread(sweep[f].get(name + '/unseen', []))} unseen)"
                 for f in fractions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict, runs: Sequence[MethodRun], bench: Workbench, output: str | Path) -> Path:
    """results.json + report.md + plots in ``output``; returns the report path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    plots = write_plots(results, runs, bench, output)
    samples = _sample_outputs(runs)
    settings = results["settings"]
    text = _introduction(results) + [
        f"Every trained method: {settings['budget']['steps']} steps of batch {settings['budget']['batch_size']} on the "
        f"transfer traces (every question form of each transfer fact), early stopping on validation facts' "
        f"greedy answer accuracy (every {settings['budget']['eval_every']} steps, patience "
        f"{settings['budget']['patience']}; of equal scores the later checkpoint).",
        "",
        "## Test facts (never in transfer data)",
        "",
        markdown_table(results),
        "",
        "- **test acc**: the answer parsed from the greedy output's solution block equals the final answer; "
        "*answer seen/unseen*: whether that answer occurs anywhere in the transfer data.",
        "- **teacher-forced**: the knowledge tokens inside the reasoning (the recalled value; in the composition world "
        "also the cipher) are the argmax given the gold prefix.",
        "- **leak probe**: the same, after replacing that token and everything after it with random "
        "tokens: equal to teacher-forced for a causal model, collapsing for one that relies on the future. "
        "*leak Δlog p*: the largest change of an answer-position log-probability that this scrambling caused "
        "(largest over seeds): exactly 0 for a causal model; above 0, the model reads later positions, whether or "
        "not its accuracy depends on them.",
        "- `source_alone` answers in its own sentence form; its teacher-forced column is its recall at the "
        "traces' recall point.",
        "",
    ]
    if settings.get("note"):
        text += [f"> {settings['note']}", ""]
    if results["sweep"]:
        text += ["## Transfer fraction sweep (test accuracy)", "", _sweep_table(results["sweep"]), ""]
    if plots:
        text += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if samples:
        text += ["## One test fact per method (seed 0)", ""] + samples + [""]
    path = output / "report.md"
    path.write_text("\n".join(text))
    return path


def _introduction(results: dict) -> list[str]:
    """The report's opening: what the world is and what the two pretrained models know."""
    recall = results["pretraining"]["source"]["recall"]
    source, target = results["pretraining"]["source"], results["pretraining"]["target"]
    composition = results["world"].get("kind") == "composition"
    knows = ("the world's language and a cipher of the 100 two-digit numbers, learned on other entities: it knows "
             "the skill, none of these facts" if composition else
             "the world's language about other entities: it knows the trace format, none of these facts")
    lines = [
        "# Does knowledge transfer? The fact-world comparison" if not composition else
        "# Composition: the source knows the facts, the target knows the cipher",
        "",
        f"World: {results['world']['summary']}.",
        f"Source ({source.get('family', 'qwen2')}, {_params(source['params'])} weights) pretrained on every "
        f"fact in varied contexts: recall at the traces' recall point {recall.get('test_trace', float('nan')):.0%} on "
        f"test facts ({recall.get('transfer_trace', float('nan')):.0%} on transfer facts), in its own sentence form "
        f"{recall.get('test_own', float('nan')):.0%}. Target ({target.get('family', 'gpt_neo')}, "
        f"{_params(target['params'])} weights) pretrained on {knows}"
        + (f"; told a recalled fact, it answers {target['skill']:.0%} of the skill probe (background entities: "
           f"{'every number' if composition else 'every value'})." if "skill" in target else "."),
        "",
    ]
    if composition:
        lines += [
            "A question needs both: \"What is the cipher of Velmora's room?\" -> thought \"I recall that Velmora's room "
            "is 4 7. The cipher of 4 7 is 9 2.\" -> answer \"9 2\". `source_alone` and `target_alone` are the parents; "
            "`skyline_source_recalls_fact` (the source says the fact in its own format) and `skyline_target_given_fact` "
            "(the target is given the recalled fact) bound what a composition can reach.",
            "",
        ]
    return lines


def _sample_outputs(runs: Sequence[MethodRun]) -> list[str]:
    lines = []
    for run in runs:
        if run.seed != runs[0].seed or not run.scores.outputs:
            continue
        sample = run.scores.outputs[0]
        lines.append(f"- `{run.spec.name}` ({sample['fact']} = {sample['gold']}): `{sample['output'][:160]!s}`")
    return lines


# ---------------------------------------------------------------------------------------------- plots


def write_plots(results: dict, runs: Sequence[MethodRun], bench: Workbench, output: Path) -> list[Path]:
    """PNG plots; none (with no error) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = [
        _accuracy_plot(plt, results, output / "accuracy.png"),
        _curves_plot(plt, runs, output / "training-curves.png"),
        _gates_plot(plt, runs, output / "gates.png"),
        _attention_plot(plt, runs, output / "cross-attention.png"),
        _sweep_plot(plt, results["sweep"], output / "sweep.png"),
    ]
    return [p for p in paths if p is not None]


def _accuracy_plot(plt, results: dict, path: Path) -> Path:
    names = list(results["methods"])
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(names)), 4.5))
    for i, name in enumerate(names):
        m = results["methods"][name]
        for offset, key, colour in ((-0.2, "test_accuracy", "tab:blue"), (0.2, "leak_probe_accuracy", "tab:orange")):
            values = [v for v in m[key] if v is not None]
            if not values:
                continue
            ax.bar(i + offset, statistics.fmean(values), width=0.4, color=colour, alpha=0.6,
                   label={"test_accuracy": "test accuracy", "leak_probe_accuracy": "leak probe"}[key] if i == 0 else None)
            ax.scatter([i + offset] * len(values), values, color="black", s=10, zorder=3)
    ax.axhline(results["chance"], color="grey", linestyle="--", label="chance")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on test facts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves_plot(plt, runs: Sequence[MethodRun], path: Path) -> Path | None:
    trained = [r for r in runs if r.train is not None and r.seed == runs[0].seed]
    if not trained:
        return None
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in trained:
        losses = run.train.losses
        window = max(1, len(losses) // 50)
        smooth = [statistics.fmean(losses[i: i + window]) for i in range(0, len(losses), window)]
        loss_ax.plot([i * window for i in range(len(smooth))], smooth, label=run.spec.name)
        if run.train.validation:
            steps, scores = zip(*run.train.validation)
            val_ax.plot(steps, scores, marker="o", label=run.spec.name)
    loss_ax.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss (seed %d)" % runs[0].seed)
    val_ax.set(xlabel="step", ylabel="validation facts, teacher-forced accuracy", ylim=(0, 1.05))
    val_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bridges(runs: Sequence[MethodRun], kinds: tuple[str, ...] = ("bridge",)) -> list[MethodRun]:
    return [r for r in runs if r.spec.kind in kinds and r.seed == runs[0].seed and r.inspection]


def _gates_plot(plt, runs: Sequence[MethodRun], path: Path) -> Path | None:
    bridges = [r for r in _bridges(runs, ("bridge", "fusion")) if r.inspection.get("gates")]
    if not bridges:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in bridges:
        gates = run.inspection["gates"]
        ax.plot(range(1, len(gates) + 1), gates, marker="o", label=run.spec.name)
    ax.set(xlabel="connector layer / fusion block", ylabel="mean gate opening (last test batch)", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attention_plot(plt, runs: Sequence[MethodRun], path: Path) -> Path | None:
    bridges = [r for r in _bridges(runs) if not r.spec.options.get("leaky") and r.inspection.get("attention")]
    if not bridges:
        return None
    best = max(bridges, key=lambda r: r.scores.accuracy)
    attention = torch.tensor(best.inspection["attention"])  # last connector layer, mean over heads: [T, S]
    start = max(0, best.inspection["prompt_length"] - 12)
    shown = attention[start:, start:]
    labels = best.inspection["tokens"][start:]
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(shown.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set(xlabel="source token (key)", ylabel="target position (query)",
           title=f"{best.spec.name}: last connector layer, mean over heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_plot(plt, sweep: dict, path: Path) -> Path | None:
    if not sweep:
        return None
    fractions = sorted(sweep, key=float)
    names = [n for n in sweep[fractions[0]] if not n.endswith("/unseen")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        means = [statistics.fmean(v for v in sweep[f].get(name, []) if v is not None) if sweep[f].get(name) else float("nan")
                 for f in fractions]
        ax.plot([float(f) for f in fractions], means, marker="o", label=name)
    ax.set(xlabel="fraction of facts in transfer data", ylabel="test accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
