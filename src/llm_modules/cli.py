"""``llm-modules`` command line: dispatch only; every command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LLMModulesError

# command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("llm_modules.evaluation.compare", "demo_main", "the fact-world demo: does knowledge transfer? (CPU, minutes)"),
    "generate": ("llm_modules.commands", "generate_main", "generate text from a saved composed model"),
    "train": ("llm_modules.training.command", "train_main", "train a composed model (Trainer, source-state cache)"),
    "eval": ("llm_modules.evaluation.evaluate", "eval_main", "answer-only loss and exact-match accuracy on a data file"),
    "compare": ("llm_modules.evaluation.compare", "compare_main", "run every transfer method on one harness, write a report"),
    "lm-eval": ("llm_modules.evaluation.lm_eval_command", "lm_eval_main", "lm-evaluation-harness on a saved model, offline task files"),
    "bench": ("llm_modules.commands", "bench_main", "decode/training/memory benchmarks (a source checkout's benchmarks/)"),
    "serve": ("llm_modules.serving.command", "serve_main", "OpenAI-compatible server + side-by-side page for a saved model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="llm-modules", description="Move knowledge from a large model into a small one.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, _, text) in COMMANDS.items():
            sub.add_parser(name, help=text, add_help=False)
        parser.print_help()
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module_name, function_name, _ = COMMANDS[argv[0]]
    try:
        command = getattr(importlib.import_module(module_name), function_name)
        return int(command(argv[1:]) or 0)
    except LLMModulesError as error:
        print(f"llm-modules {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
