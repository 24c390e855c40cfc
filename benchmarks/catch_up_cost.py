"""What one catch-up costs: the source reading k pending tokens through its KV cache, against one decoding step.

    python benchmarks/catch_up_cost.py                       # Qwen2-1.5B's shapes, float32 and bfloat16
    python benchmarks/catch_up_cost.py --shapes tiny         # a smoke run

Deferral (``model/deferral.py``) is cheaper than the source alone only if a forward over the k tokens pending since
the last call costs much less than k single steps: Big Little Decoder's premise, true where a step is bound by
reading the weights (a GPU), and to be measured on a CPU, where a step may be bound by arithmetic. This script
times, after a ``--prompt``-token prefill, a forward of k = 1, 2, 4, 8, 16 new tokens through the cache (the cache
cropped back after each), median of ``--repeats``, in each dtype, and writes the time per chunk and its ratio to
one step (k single steps would be ratio k). Random N(0, 0.02) weights: the cost does not depend on their values.
float32 is timed twice: through torch's own linear (MKL) and with every linear through oneDNN (``float32+onednn``,
``model/onednn.py``), the kernel torch uses for bfloat16. Results: ``benchmarks/results/catch-up-cost-<shapes>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from composed_bench.machine import git_commit, machine_description
from composed_bench.report import write_json_and_markdown
from composed_bench.models import random_causal_lm, source_config
from llm_modules.model.onednn import use_onednn_linears

RESULTS = Path("benchmarks/results")
CHUNKS = (1, 2, 4, 8, 16)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def chunk_seconds(model, prompt_length: int, repeats: int) -> dict[int, float]:
    """Median seconds of one cached forward over k new tokens (the model's own head on the last one only), per k."""
    vocab = int(model.config.vocab_size)
    ids = torch.randint(1, min(vocab, 30000), (1, prompt_length + max(CHUNKS)))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :prompt_length], cache=cache, use_cache=True, logits_to_keep=1)
    seconds = {}
    for k in CHUNKS:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            model(input_ids=ids[:, prompt_length: prompt_length + k], cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
            cache.crop(-k)  # back to the prompt
        seconds[k] = statistics.median(times[1:])
        log(f"{model.dtype} k={k}: {seconds[k]:.3f}s")
    return seconds


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# One catch-up against one step ({result['shapes']} shapes, CPU)", "",
             f"`{result['command']}`: after a {result['prompt']}-token prefill, a forward over k new tokens through "
             f"the KV cache, median of {result['repeats']}; {result['machine'].get('cpu', '')}, "
             f"{result['machine'].get('torch_threads', '')} threads, commit {result['commit']}.", "",
             "| dtype (+ linear kernel) | k | s / forward | × one step | × k single steps |", "|---|---|---|---|---|"]
    for dtype, seconds in result["seconds"].items():
        one = seconds["1"]
        for k, value in seconds.items():
            lines.append(f"| {dtype} | {k} | {value:.3f} | {value / one:.2f} | {value / (int(k) * one):.2f} |")
    path.write_text("\n".join(lines + [""]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    seconds = {}
    for name in args.dtypes.split(","):
        for onednn in (False, True) if name == "float32" else (False,):
            model = random_causal_lm(source_config(args.shapes), torch.float32, "cpu").to(getattr(torch, name)).eval()
            if onednn:
                use_onednn_linears(model.requires_grad_(False))
            key = name + ("+onednn" if onednn else "")
            seconds[key] = {str(k): v for k, v in chunk_seconds(model, args.prompt, args.repeats).items()}
            del model
    result = {"shapes": args.shapes, "prompt": args.prompt, "repeats": args.repeats, "seconds": seconds,
              "machine": machine_description("cpu"), "commit": git_commit(),
              "command": "python benchmarks/catch_up_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json_and_markdown(result, RESULTS / f"catch-up-cost-{args.shapes}.json", write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
