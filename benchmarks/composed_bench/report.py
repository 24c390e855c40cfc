"""The results as files: JSON and a Markdown table, named after shapes, device, dtype and topology."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from .memory import GIB


def markdown(result: dict) -> str:
    """The result as Markdown tables: headline, decode, training, bound and load per stage."""
    plan, lines = result["plan"], []
    lines += [f"# llm-modules benchmark: {plan['shapes']} shapes, {plan['device']}, {plan['dtype']}", "",
              f"- commit: `{result['commit']}`", f"- machine: {json.dumps(result['machine'])}",
              f"- wall time of the run: {result['wall_s']:.0f} s", *[f"- note: {n}" for n in plan["notes"]], "",
              "## Headline", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {fmt(v)} |" for k, v in result["headline"].items()]
    lines += ["", "## Decode (greedy, batch x prompt + new tokens)", "",
              "`cores` = cores used by this benchmark / by other processes while the row was measured.", "",
              "| method | batch | prompt | new | tokens/s | prefill s | s/token after prefill | vs baseline | "
              "per-token s at attended length | growth | TFLOP/s | MFU | cores | measured |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        curve = ", ".join(f"{k}: {v:.4g}" for k, v in r["per_token_s"].items())
        lines.append(f"| {r['method']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['tokens_per_s']:.4g} | "
                     f"{fmt(r['prefill_s'])} | {fmt(r['decode_step_s'])} | {fmt(r['speedup_vs_baseline'])}x {r['baseline']} | "
                     f"{curve} | {fmt(r['per_token_growth'])} | {fmt(_tera(r['achieved_flops']))} | {fmt(r['mfu'])} | "
                     f"{_cores(r['cpu'])} | {r['measured']} |")
    lines += ["", "## Training step (AdamW, same batch and sequence length)", "",
              "| config | batch x seq | s/step | tokens/s | vs without cache | peak memory GiB | vs target only | "
              "memory after build GiB | trainable params | TFLOP/s | MFU | cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        lines.append(f"| {r['config']} | {r['batch']} x {r['seq']} | {r['step_s']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{fmt(r['speedup_vs_without_cache'])}x | {r['peak_memory_bytes'] / GIB:.2f} | "
                     f"{fmt(r['memory_vs_target_only'])}x | {r['memory_after_build_bytes'] / GIB:.2f} | "
                     f"{r['trainable_parameters'] / 1e6:.1f} M | {r['achieved_flops'] / 1e12:.3f} | {fmt(r['mfu'])} | "
                     f"{_cores(r['cpu'])} |")
    if result["train"]:
        lines.append(f"\nPeak memory: {result['train'][0]['memory_measure']}.")
    lines += ["", "## Bandwidth bound of cached decode (ours)", "",
              "| batch | weight GB read per step | copy bandwidth GB/s | bound tokens/s | measured tokens/s (after prefill) | fraction |",
              "|---|---|---|---|---|---|"]
    for b in result["bound"]:
        lines.append(f"| {b['batch']} | {b['weight_bytes_per_step'] / 1e9:.3f} | {b['bandwidth_bytes_per_s'] / 1e9:.1f} | "
                     f"{b['bound_tokens_per_s']:.3g} | {b['measured_tokens_per_s']:.3g} | {b['fraction_of_bound']:.2f} |")
    lines += ["", "## Machine load per stage", "", "| stage | wall s | cores used by us | cores used by others | "
              "load (1 min) at end |", "|---|---|---|---|---|"]
    for name, usage in result["load"].items():
        lines.append(f"| {name} | {usage['wall_s']:.0f} | {fmt(usage['ours_cores'])} | {fmt(usage['others_cores'])} | "
                     f"{fmt(usage['load_1min_at_end'])} |")
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    """Three significant digits, or ``n/a``."""
    return "n/a" if value is None else f"{value:.3g}"


def _tera(value: float | None) -> float | None:
    return None if value is None else value / 1e12


def _cores(usage: dict | None) -> str:
    return "n/a" if not usage else f"{fmt(usage['ours_cores'])} / {fmt(usage['others_cores'])}"


def write_results(result: dict, folder: Path) -> tuple[Path, Path]:
    """Write ``bench-[fusion-]{shapes}-{device}-{dtype}[-quick].{json,md}`` under ``folder``."""
    plan = result["plan"]
    topology = "fusion-" if result.get("topology") == "fusion" else ""
    stem = (f"bench-{topology}{plan['shapes']}-{plan['device'].split(':')[0]}-{plan['dtype']}"
            f"{'-quick' if plan['quick'] else ''}")
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def write_json_and_markdown(result: dict, path: Path, write_markdown: Callable[[dict, Path], None]) -> None:
    """A small benchmark's results: ``path`` (JSON) and the same stem's ``.md`` (``write_markdown``); says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    write_markdown(result, path.with_suffix(".md"))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr, flush=True)
