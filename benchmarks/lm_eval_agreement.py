"""Do lm-evaluation-harness and our own harness agree on a plain model? (the target alone, same questions)

lm-eval side: ``llm-modules lm-eval``'s ``simple_evaluate`` with lm-eval's own ``hf`` model type on the
shipped tasks (chat template on). Our side, written independently of lm-eval:
- ARC-Challenge / MMLU: the same rows read from the JSONL files (MMLU in the task's shuffled order), the
  letter prompt rendered with the tokenizer's chat template, each letter scored by
  :func:`llm_modules.evaluation.loglikelihood.choice_accuracy` (left-padded batches of our own);
- GSM8K: greedy generation and answer extraction of ``llm-modules eval`` (``greedy_answers``,
  ``extract_answer``, ``answers_match``).

    flock /work/heavy.lock python benchmarks/lm_eval_agreement.py --model MODEL_DIR --data-dir DATASETS \\
        --gsm8k-dir GSM8K --arc 200 --mmlu 200 --gsm8k 50 --max-gen-toks 128 --output docs/results/lm-eval-agreement
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import lm_eval
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules.evaluation.evaluate import answers_match, extract_answer, greedy_answers
from llm_modules.evaluation.lm_eval_command import evaluate_with_lm_eval
from llm_modules.evaluation.lm_eval_tasks import data_folders, utils
from llm_modules.evaluation.loglikelihood import choice_accuracy

ARC, MMLU, GSM8K = "llm_modules_arc_challenge", "llm_modules_mmlu", "llm_modules_gsm8k"


def read_rows(path: Path, count: int, shuffle: bool = False) -> list[dict]:
    rows = load_dataset("json", data_files={"test": str(path)})["test"]
    if shuffle:
        rows = utils.shuffled(rows)
    return [rows[i] for i in range(min(count, len(rows)))]


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def lm_eval_samples(results: dict, task: str, metric_filter: str = "none") -> list[dict]:
    return sorted((s for s in results["samples"][task] if s["filter"] == metric_filter), key=lambda s: s["doc_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a plain Hugging Face causal LM folder")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--gsm8k-dir", default=None)
    parser.add_argument("--arc", type=int, default=200)
    parser.add_argument("--mmlu", type=int, default=200)
    parser.add_argument("--gsm8k", type=int, default=50)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="docs/results/lm-eval-agreement", help="writes OUTPUT.md and OUTPUT.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    places = data_folders(args.data_dir, args.gsm8k_dir)
    counts = {ARC: args.arc, MMLU: args.mmlu, GSM8K: args.gsm8k}

    started = time.time()
    ours_started = None
    results = evaluate_with_lm_eval(
        args.model, list(counts), data_dir=args.data_dir, gsm8k_dir=args.gsm8k_dir,
        samples={task: list(range(n)) for task, n in counts.items()}, batch_size=args.batch_size, device="cpu",
        dtype="float32", chat_template=True, max_gen_toks=args.max_gen_toks, log_samples=True)
    lm_eval_seconds = time.time() - started

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ours_started = time.time()
    rows_out, details = [], {}
    for task, path, shuffle in ((ARC, places["datasets"] / "arc_challenge/test.jsonl", False),
                                (MMLU, places["datasets"] / "mmlu/test.jsonl", True)):
        rows = read_rows(path, counts[task], shuffle)
        theirs = lm_eval_samples(results, task)
        if [s["doc"]["id"] for s in theirs] != [r["id"] for r in rows]:
            raise SystemExit(f"{task}: lm-eval scored other questions than ours")
        questions = [(chat(tokenizer, utils.letter_prompt(r)), utils.letter_choices(r), r["answer"]) for r in rows]
        ours = choice_accuracy(model, tokenizer, questions, batch_size=args.batch_size)
        their_predictions = [max(range(len(s["resps"])), key=lambda k: s["resps"][k][0][0]) for s in theirs]
        same = sum(a == b for a, b in zip(ours["predictions"], their_predictions))
        lm_acc = results["results"][task]["acc,none"]
        rows_out.append((task, len(rows), lm_acc, ours["accuracy"], same))
        details[task] = {"n": len(rows), "lm_eval_acc": lm_acc, "ours_acc": ours["accuracy"], "same_prediction": same}

    rows = read_rows(places["gsm8k"] / "test.jsonl", counts[GSM8K])
    theirs = lm_eval_samples(results, GSM8K, "llm-modules")
    if [s["doc"]["question"] for s in theirs] != [r["question"] for r in rows]:
        raise SystemExit(f"{GSM8K}: lm-eval scored other questions than ours")
    generations = greedy_answers(model, tokenizer, [chat(tokenizer, r["question"]) for r in rows],
                                 max_new_tokens=args.max_gen_toks, batch_size=args.batch_size)
    correct = [answers_match(extract_answer(g), extract_answer(r["answer"])) for g, r in zip(generations, rows)]
    their_text = [s["resps"][0][0] for s in theirs]
    their_correct = [bool(s["exact_match"]) for s in theirs]
    same_text = sum(a.strip() == b.strip() for a, b in zip(generations, their_text))
    gsm = results["results"][GSM8K]
    rows_out.append((GSM8K, len(rows), gsm["exact_match,llm-modules"], sum(correct) / len(rows),
                     sum(a == b for a, b in zip(correct, their_correct))))
    details[GSM8K] = {"n": len(rows), "lm_eval_exact_match_llm_modules_filter": gsm["exact_match,llm-modules"],
                      "lm_eval_exact_match_strict": gsm["exact_match,strict-match"],
                      "lm_eval_exact_match_flexible": gsm["exact_match,flexible-extract"],
                      "ours_exact_match": sum(correct) / len(rows), "same_generation": same_text,
                      "samples": [{"question": r["question"][:120], "ours": g[:300], "lm_eval": t[:300]}
                                  for r, g, t in list(zip(rows, generations, their_text))[:3]]}
    ours_seconds = time.time() - ours_started

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# lm-evaluation-harness vs our own harness, the target alone", "",
        f"Model: `{args.model}` (float32, CPU). Chat template on; greedy; GSM8K at most {args.max_gen_toks} new tokens.",
        f"lm-eval {lm_eval.__version__}: {lm_eval_seconds:.0f} s; ours: {ours_seconds:.0f} s (2 shared CPU cores).", "",
        "```bash", command, "```", "",
        "| task | questions | lm-eval | ours | difference (points) | same per-question outcome |",
        "|---|---|---|---|---|---|",
    ]
    for task, n, theirs_value, ours_value, same in rows_out:
        lines.append(f"| {task} | {n} | {100 * theirs_value:.1f}% | {100 * ours_value:.1f}% | "
                     f"{100 * abs(theirs_value - ours_value):.1f} | {same}/{n} |")
    lines += ["",
              "ARC/MMLU: lm-eval's `acc` (letters scored by log-likelihood after the chat prompt) vs "
              "`choice_accuracy`; same per-question outcome = the same letter picked.",
              f"GSM8K: lm-eval's `exact_match` with the `llm-modules` filter (the extraction of `llm-modules eval`) vs our "
              f"greedy generations scored by `llm-modules eval`'s rules; same outcome = both right or both wrong; "
              f"identical generations: {same_text}/{len(rows)}. lm-eval's own filters on the same generations: "
              f"strict-match (`#### n`) {100 * gsm['exact_match,strict-match']:.1f}%, flexible-extract (last number) "
              f"{100 * gsm['exact_match,flexible-extract']:.1f}%."]
    text = "\n".join(lines) + "\n"
    print(text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(text)
    output.with_suffix(".json").write_text(json.dumps({"command": command, "tasks": details,
                                                       "lm_eval_seconds": lm_eval_seconds,
                                                       "ours_seconds": ours_seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
