"""``llm-modules lm-eval``: lm-evaluation-harness on a saved composed model or a plain HF model, offline.

    llm-modules lm-eval MODEL --tasks llm_modules_arc_challenge,llm_modules_mmlu,llm_modules_gsm8k \\
        --data-dir DATASETS --gsm8k-dir GSM8K [--limit N] [--batch-size 8] [--output results.json]
    llm-modules lm-eval --write-tasks FOLDER --data-dir DATASETS --gsm8k-dir GSM8K
    llm-modules lm-eval run --model llm-modules --model_args pretrained=RUN --include_path FOLDER --tasks ...

The first form runs ``lm_eval.simple_evaluate``: MODEL is a folder written by ``llm-modules train`` /
``save_pretrained()`` (model type ``llm-modules``) or a plain Hugging Face model folder (lm-eval's own ``hf``),
with the tokenizer's chat template when it has one. The second writes the task YAMLs with absolute data paths
(for lm-eval's ``--include_path`` or ``simple_evaluate(task_manager=TaskManager(include_path=...))``). The
third is lm-eval's own command line (``run``, ``ls``, ``validate``) with the model type ``llm-modules`` registered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ..errors import LLMModulesError
from .lm_eval_tasks import TAG, TASKS, write_tasks

LM_EVAL_COMMANDS = ("run", "ls", "validate")


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise LLMModulesError("lm-evaluation-harness is not installed; pip install 'llm-modules[eval]'") from error


def model_type(folder: Path) -> str:
    """``llm-modules`` for a saved composed model, ``hf`` for any other Hugging Face model folder."""
    config = folder / "config.json"
    if not config.is_file():
        raise LLMModulesError(f"{folder} holds no config.json; give a saved model folder")
    return "llm-modules" if json.loads(config.read_text()).get("model_type") == "llm_modules" else "hf"


def _has_chat_template(folder: Path) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None))


def evaluate_with_lm_eval(model: str | os.PathLike, tasks: list[str], *, data_dir=None, gsm8k_dir=None,
                          limit: int | None = None, samples: dict[str, list[int]] | None = None,
                          batch_size: int = 8, device: str = "cpu", dtype: str | None = None,
                          chat_template: bool | None = None, max_gen_toks: int | None = None,
                          num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on a model folder over our offline tasks (and any of lm-eval's own).

    chat_template: None uses the tokenizer's when it has one. dtype: None is float32 on a CPU, the saved
    dtype elsewhere. Returns lm-eval's results dict (``results``, ``configs``, ``n-samples``, ``samples``...).
    """
    _require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # every task of ours reads local files
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = Path(model).expanduser()
    kind = model_type(folder)
    if kind == "llm-modules":
        from . import lm_eval_model  # noqa: F401  (registers the model type)
    if chat_template is None:
        chat_template = _has_chat_template(folder)
    dtype = dtype or ("float32" if device == "cpu" else "auto")
    with tempfile.TemporaryDirectory(prefix="llm-modules-tasks-") as include:
        write_tasks(include, data_dir, gsm8k_dir, check=tasks)
        # lm-eval's own tasks are indexed only when asked for (it takes tens of seconds)
        manager = TaskManager(include_path=include, include_defaults=not set(tasks) <= {*TASKS, TAG})
        return simple_evaluate(
            model=kind, model_args={"pretrained": str(folder), "dtype": dtype}, tasks=list(tasks),
            batch_size=batch_size, device=device, limit=limit, samples=samples, task_manager=manager,
            apply_chat_template=chat_template, gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
            num_fewshot=num_fewshot, log_samples=log_samples,
        )


def _run_lm_eval_cli(argv: list[str]) -> int:
    """lm-eval's own command line, with the model type ``llm-modules`` registered."""
    _require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def lm_eval_main(argv: list[str]) -> int:
    """Entry point of ``llm-modules lm-eval`` (the three forms of the module docstring)."""
    if argv and argv[0] in LM_EVAL_COMMANDS:
        return _run_lm_eval_cli(argv)
    parser = argparse.ArgumentParser(prog="llm-modules lm-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("model", nargs="?", help="a saved composed model folder, or a plain Hugging Face model folder")
    parser.add_argument("--tasks", default="llm_modules",
                        help=f"comma-separated; ours: {', '.join(TASKS)} (the tag llm_modules: all three)")
    parser.add_argument("--data-dir", default=None, help="ARC/MMLU JSONL folder (default $LLM_MODULES_DATASETS, "
                                                         "else ~/.cache/offline-datasets)")
    parser.add_argument("--gsm8k-dir", default=None, help="GSM8K train/test JSONL folder (default $LLM_MODULES_GSM8K, "
                                                          "else DATA_DIR/gsm8k)")
    parser.add_argument("--write-tasks", metavar="FOLDER", default=None,
                        help="only write the task YAMLs (absolute data paths) into FOLDER, for lm-eval's --include_path")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on a CPU, else the saved dtype")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="generation tasks: at most N new tokens")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a template")
    parser.add_argument("--output", default=None, help="write lm-eval's results (JSON) here")
    parser.add_argument("--log-samples", action="store_true", help="with --output: also write every sample (JSONL)")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.write_tasks:
        print(write_tasks(args.write_tasks, args.data_dir, args.gsm8k_dir, check=tasks))
        return 0
    if not args.model:
        parser.error("give a MODEL folder (or --write-tasks FOLDER)")
    if args.limit is not None and args.limit < 1:
        raise LLMModulesError(f"--limit must be >= 1, got {args.limit}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMModulesError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    results = evaluate_with_lm_eval(
        args.model, tasks, data_dir=args.data_dir, gsm8k_dir=args.gsm8k_dir, limit=args.limit,
        batch_size=args.batch_size, device=device, dtype=args.dtype,
        chat_template=False if args.no_chat_template else None, max_gen_toks=args.max_gen_toks,
        num_fewshot=args.num_fewshot, log_samples=args.log_samples and bool(args.output))
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if args.output:
        output = Path(args.output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        samples = results.pop("samples", None)
        output.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        if samples:
            with open(output.with_suffix(".samples.jsonl"), "w") as handle:
                for task, rows in samples.items():
                    for row in rows:
                        handle.write(json.dumps({"task": task, **row}, default=handle_non_serializable,
                                                ensure_ascii=False) + "\n")
    return 0
