"""Small commands: ``llm-modules generate``, and ``llm-modules bench`` (the benchmarks of a source checkout)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from .errors import LLMModulesError
from .model.generate import render_prompt, stream_generate
from .model.onednn import CPU_LINEAR_HELP, CPU_LINEARS, check_cpu_linear, for_decoding


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-modules generate", description="Generate from a saved composed model.")
    parser.add_argument("model", help="folder written by save_pretrained() / llm-modules train")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default=None, help="system message (chat template only)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-linear", choices=CPU_LINEARS, default="torch", help=CPU_LINEAR_HELP)
    args = parser.parse_args(argv)
    check_cpu_linear(args.cpu_linear, args.device)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMModulesError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")

    from .model.modeling import LLMModulesForCausalLM

    model = LLMModulesForCausalLM.from_pretrained(args.model).to(args.device)
    for_decoding(model, args.cpu_linear, args.device)
    prompt = render_prompt(model.tokenizer, args.prompt, args.system, args.raw)
    for piece in stream_generate(
        model, model.tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def benchmarks_folder() -> Path:
    """``benchmarks/`` of the source checkout this package was imported from (absent from an installed wheel)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def bench_main(argv: list[str]) -> int:
    """``llm-modules bench``: ``python benchmarks/bench.py`` of the checkout (benchmarks/composed_bench), in place.

    The benchmarks are a developer tool, not part of the library: they are found beside ``src/`` or not at all.
    """
    folder = benchmarks_folder()
    if not (folder / "composed_bench" / "main.py").is_file():
        raise LLMModulesError(
            f"the benchmarks live in a source checkout (benchmarks/composed_bench), and there is none at {folder}: "
            "clone the repository and run `python benchmarks/bench.py` there, or `llm-modules bench` from an "
            "editable install of it (pip install -e .)"
        )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("composed_bench.main").bench_main(argv)
