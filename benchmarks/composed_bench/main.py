"""``llm-modules bench``: decode, training and memory benchmarks against the alternatives, in one run.

The command line of ``python benchmarks/bench.py`` (and ``llm-modules bench`` in a source checkout): the
bridge run (:mod:`.bridge`) or, with ``--topology fusion``, the fusion run (:mod:`.fusion`); with the hidden
``--train-worker`` option, one training configuration in this fresh process (:mod:`.training`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .bridge import run
from .fusion import run_fusion
from .plan import Plan, make_plan
from .progress import log
from .report import markdown, write_results
from .training import train_worker


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options of ``python benchmarks/bench.py`` / ``llm-modules bench``."""
    parser = argparse.ArgumentParser(prog="llm-modules bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights and autocast dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (see the notes it prints)")
    parser.add_argument("--skip", action="append", choices=("decode", "train"), default=[])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--topology", choices=("bridge", "fusion"), default="bridge",
                        help="fusion: the fusion topology's run (prompt memory decode, cached training) against "
                             "the source alone and the target alone")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    return parser.parse_args(list(argv))


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or one training worker), write the results, print the Markdown; the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.train_worker:
        spec = json.loads(args.train_worker)
        plan = Plan.from_dict(spec["plan"])
        if plan.threads:
            torch.set_num_threads(plan.threads)
        print(json.dumps(train_worker(spec["config"], plan)), flush=True)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("llm-modules bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    plan = make_plan(args.shapes, args.device, args.dtype, args.quick, args.threads)
    for note in plan.notes:
        log(f"note: {note}")
    if args.device == "cpu" and os.getloadavg()[0] > 1.0:
        log(f"warning: load average {os.getloadavg()[0]:.1f}: other processes use the CPU, timings will suffer; "
            "--threads N (N = free cores) avoids waiting on descheduled threads")
    if args.topology == "fusion":
        result = run_fusion(plan, set(args.skip))
    else:
        result = run(plan, set(args.skip))
    json_path, md_path = write_results(result, args.output_dir)
    print(markdown(result))
    log(f"wrote {json_path} and {md_path}")
    return 0
