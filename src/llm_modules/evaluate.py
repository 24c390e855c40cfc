"""``llm-modules eval``: answer-only loss / perplexity and greedy exact match with answer extraction.

Answer extraction, first that applies:
1. GSM8K: the text after the last ``#### ``;
2. Bespoke-Stratos: the last ``<|begin_of_solution|> ... <|end_of_solution|>`` block, and inside it
   the last ``\\boxed{...}`` if there is one;
3. the last ``\\boxed{...}`` anywhere;
4. a final ``answer: ...`` line (``Final answer:``, ``The answer is ...``).
Answers are compared after normalisation (spaces, ``$``, thousands separators, trailing dot,
case); two numbers are equal when their values are.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .data import (
    IGNORE_INDEX,
    DataError,
    DataOptions,
    PaddingCollator,
    Renderer,
    build_examples,
    detect_format,
    read_records,
    to_messages,
)
from .errors import LLMModulesError

SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)
ANSWER_LINE = re.compile(r"(?:final answer|the answer is|answer)\s*[:：]?\s*(.+?)\s*$", re.I)


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text`` (see the module docstring), or None."""
    if "####" in text:
        answer = text.rsplit("####", 1)[1].strip().splitlines()
        return answer[0].strip() if answer else None
    solutions = SOLUTION.findall(text)
    if solutions:
        block = solutions[-1]
        return (_last_boxed(block) or block).strip() or None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        match = ANSWER_LINE.search(lines[-1])
        if match and re.search(r"answer", lines[-1], re.I):
            return match.group(1).strip()
    return None


def normalize_answer(answer: str) -> str:
    text = answer.strip().lower()
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    text = text.replace("$", "").replace("\\!", "").strip().rstrip(".").strip()
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", text):
        text = text.replace(",", "")
    return re.sub(r"\s+", " ", text)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(reference)
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a == b


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def answer_nll(model, examples: list[dict], pad_token_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token NLL over the trained (answer) tokens and their count.

    examples: {"input_ids": [T], "labels": [T]}; the model gets input_ids [B, T] and returns logits [B, T, V].
    """
    collate = PaddingCollator(pad_token_id)
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        shifted = logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding), decoded without special tokens."""
    device = next(p for p in model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        generated = model.generate(**inputs.to(device), max_new_tokens=max_new_tokens, do_sample=False)
        new = generated[:, inputs["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


@dataclass
class EvalOptions:
    data: str
    template: str = "chat"
    system_prompt: str | None = None
    append_eos: bool = True
    max_length: int = 2048
    limit: int | None = None
    generate: bool = True
    max_new_tokens: int = 256
    batch_size: int = 8
    split: str = "test"


def evaluate(model, tokenizer, options: EvalOptions) -> dict:
    """Answer-only loss and perplexity; greedy exact match on rows whose reference has an extractable answer."""
    data_options = DataOptions(template=options.template, loss_on="assistant", max_length=options.max_length,
                               overlength="truncate", system_prompt=options.system_prompt,
                               append_eos=options.append_eos, limit=options.limit, split=options.split)
    examples, report = build_examples(options.data, tokenizer, data_options)
    model.eval()
    total, count = answer_nll(model, examples, tokenizer.pad_token_id, options.batch_size)
    loss = total / max(count, 1)
    result: dict = {"data": str(options.data), "rows": len(examples), "answer_tokens": count, "answer_loss": loss,
                    "answer_perplexity": math.exp(min(loss, 50.0)), "data_report": report.to_dict()}
    if not options.generate:
        return result
    renderer = Renderer(tokenizer, options.template, options.append_eos)
    prompts, references, rows = [], [], []
    fmt = None
    for record in read_records(options.data, options.split):
        if isinstance(record, DataError):
            continue  # counted in data_report above
        try:
            fmt = fmt or detect_format(record)
            messages = to_messages(record, fmt, options.system_prompt)
        except DataError:
            continue
        if messages[0]["role"] == "text":
            break  # plain text has no question/answer
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = extract_answer(messages[last]["content"])
        if reference is not None:
            prompts.append(renderer.prompt(messages))
            references.append(reference)
            rows.append(record.where)
        if options.limit is not None and len(prompts) >= options.limit:
            break
    if not prompts:
        result["exact_match"] = None
        result["exact_match_note"] = "no row has a reference answer to extract (#### n, solution block, \\boxed{}, answer: line)"
        return result
    generations = greedy_answers(model, tokenizer, prompts, options.max_new_tokens, options.batch_size)
    predictions = [extract_answer(text) for text in generations]
    correct = [answers_match(p, r) for p, r in zip(predictions, references)]
    result.update({
        "exact_match": sum(correct) / len(correct),
        "exact_match_rows": len(correct),
        "no_answer_extracted": sum(p is None for p in predictions),
        "samples": [{"row": w, "reference": r, "predicted": p, "generation": g[:500]}
                    for w, r, p, g in list(zip(rows, references, predictions, generations))[:5]],
    })
    return result


def _training_settings(folder: Path) -> dict:
    """Rendering settings the model was trained with (train_config.yaml beside the weights), if any."""
    path = folder / "train_config.yaml"
    if not path.exists():
        return {}
    values = yaml.safe_load(path.read_text()) or {}
    return {k: values[k] for k in ("template", "system_prompt", "append_eos", "max_length") if k in values}


def eval_main(argv: list[str]) -> int:
    """Entry point of ``llm-modules eval DIR --data FILE``; prints the metrics as JSON."""
    parser = argparse.ArgumentParser(prog="llm-modules eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="folder written by llm-modules train / save_pretrained()")
    parser.add_argument("--data", required=True, help=".jsonl/.json/.parquet file or hub dataset name")
    parser.add_argument("--split", default="test", help="hub datasets: which split")
    parser.add_argument("--template", choices=["chat", "plain"], default=None,
                        help="default: as in the model's train_config.yaml, else chat")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--no-generate", action="store_true", help="loss/perplexity only")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from .modeling import LLMModulesForCausalLM

    folder = Path(args.model)
    if not folder.is_dir():
        raise LLMModulesError(f"{folder} is not a folder; give the output folder of llm-modules train")
    trained = _training_settings(folder)
    model = LLMModulesForCausalLM.from_pretrained(folder).to(args.device)
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    options = EvalOptions(
        data=args.data,
        template=args.template or trained.get("template", "chat"),
        system_prompt=args.system_prompt if args.system_prompt is not None else trained.get("system_prompt"),
        append_eos=trained.get("append_eos", True),
        max_length=args.max_length or trained.get("max_length", 2048),
        limit=args.limit,
        generate=not args.no_generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        split=args.split,
    )
    result = {"model": str(folder), **evaluate(model, tokenizer, options)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(f"answer loss {result['answer_loss']:.4f} (ppl {result['answer_perplexity']:.2f}) over "
          f"{result['answer_tokens']} tokens"
          + (f"; exact match {result['exact_match']:.3f} on {result['exact_match_rows']} rows"
             if result.get("exact_match") is not None else ""), file=sys.stderr)
    return 0
