"""``llm-modules eval``: answer-only loss / perplexity and greedy exact match with answer extraction.

Answer extraction (of references and of generations), first rule that applies:
1. Bespoke-Stratos: the last ``<|begin_of_solution|> ... <|end_of_solution|>`` block; inside it the
   last ``\\boxed{...}``, else its final answer line, else the whole block;
2. the last ``\\boxed{...}`` anywhere;
3. GSM8K: the text after the last ``####`` up to the end of its line, when it starts with a number
   (a Markdown heading ``#### Step 1`` is not an answer);
4. a final ``answer`` line: ``Answer: 42``, ``Final answer: 42``, ``The answer is 42.``
Answers are compared after normalisation (spaces, ``$``, ``\\text{}``, thousands separators,
trailing dot, case); two numbers are equal when their values are.

The loss counts the assistant turns only (the prompt is given, not predicted), whatever the
model was trained with; exact match uses the same rows, prompted up to the last assistant turn.
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

from ..model.loss import causal_lm_loss, next_token_mask
from ..training.alignment import CompositionCollator, align_row
from ..training.data import (
    DataError,
    DataOptions,
    DataReport,
    PaddingCollator,
    Renderer,
    build_examples,
    read_records,
    to_messages,
)
from ..errors import LLMModulesError

SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)
# "#### 72", "#### -3.5", "#### $1,200": a number right after the marker (not "#### Step 1", a heading).
GSM8K_ANSWER = re.compile(r"####[ \t]*((?:[-+$][ \t]*)*\.?\d[^\n]*)")
# "Answer: 42", "**Final Answer:** 42", "The answer is 42." (not "the answer to ... is").
ANSWER_LINE = re.compile(r"\b(?:final\s+)?answer\s*\**\s*(?:is\b|[:：=])\s*\**\s*(.+?)\s*$", re.I)


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


def _answer_line(text: str) -> str | None:
    """The answer on the last line that states one (``Answer: x``, ``The final answer is x``)."""
    for line in reversed(text.strip().splitlines()):
        match = ANSWER_LINE.search(line.strip())
        if match and match.group(1).strip("*. \t"):
            return match.group(1).strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text`` (rules in the module docstring), or None."""
    solutions = SOLUTION.findall(text)
    if solutions:
        block = solutions[-1]
        answer = _last_boxed(block) or _answer_line(block) or block
        return answer.strip() or None
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    numbers = GSM8K_ANSWER.findall(text)
    if numbers:
        return numbers[-1].strip()
    return _answer_line(text)


# A number: optional sign and $, digits with thousands separators, optional decimals ("-3", "$1,200", "7.50").
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number anywhere in ``text``, or None: a lenient reading, after lm-eval's GSM8K "flexible-extract"
    filter, for replies cut off by a token limit after their result but before their answer line. Report it beside
    :func:`extract_answer`'s strict reading, never instead of it: an unfinished reply may end on another number."""
    found = NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def normalize_answer(answer: str) -> str:
    """Lower case, no ``$``/``\\text{}``/``**``, single spaces, no trailing dot; numbers without thousands separators."""
    text = answer.strip().lower()
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    text = text.replace("$", "").replace("\\!", "").replace("**", "").strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    return re.sub(r"\s+", " ", text)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Equal after :func:`normalize_answer`, or equal as numbers (``72.0`` = ``72``)."""
    if predicted is None or reference is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(reference)
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    if math.isnan(x) or math.isnan(y):
        return False
    return math.isclose(x, y, rel_tol=0, abs_tol=1e-6)


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def answer_nll(model, examples: list[dict], pad_token_id: int, batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token NLL (nats) over the trained (answer) tokens, and their count.

    examples: {"input_ids": [T], "labels": [T]} (-100 outside the answer); batches are right-padded,
    the model gets input_ids [B, T] + attention_mask [B, T] and returns logits [B, T, V].
    """
    processor = getattr(model, "processor", None)  # fusion: the source reads the rows as it did in training
    collate = PaddingCollator(pad_token_id) if processor is None else CompositionCollator(pad_token_id)
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        features = []
        for example in examples[start: start + batch_size]:
            feature = {k: example[k] for k in ("input_ids", "labels")}
            if processor is not None:
                feature.update(align_row(processor, feature["input_ids"], feature["labels"]))
            features.append(feature)
        batch = collate(features)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        labels = batch["labels"]
        for row in range(logits.shape[0]):  # one row at a time: fp32 copies of [T, V] only
            total += float(causal_lm_loss(logits[row: row + 1], labels[row: row + 1], "sum"))
        count += int(next_token_mask(labels).sum())
    return total, count


# The markers the answer extraction reads; a tokenizer may hold them as special tokens (the fact world's does).
ANSWER_MARKERS = ("<|begin_of_solution|>", "<|end_of_solution|>")


def stop_token_ids(tokenizer, end_of_turn: str = "") -> list[int]:
    """The ids that end a reply: EOS, and the end-of-turn marker of the rendering when it is one token."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if end_of_turn:
        ids = tokenizer(end_of_turn, add_special_tokens=False).input_ids
        if len(ids) == 1 and ids[0] not in stops:
            stops.append(ids[0])
    return stops


def decode_reply(tokenizer, ids: list[int], stops: list[int]) -> str:
    """The generated ``ids`` up to the first stop id (or padding), as text without special tokens except the
    answer markers (``ANSWER_MARKERS``): a tokenizer that holds them as special tokens would otherwise erase them."""
    keep = set(tokenizer.convert_tokens_to_ids(list(ANSWER_MARKERS))) & set(tokenizer.all_special_ids)
    ended = {*stops, tokenizer.pad_token_id} - {None}
    reply: list[int] = []
    for token in ids:
        if token in ended:
            break
        if token in keep or token not in tokenizer.all_special_ids:
            reply.append(token)
    return tokenizer.decode(reply, skip_special_tokens=False)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 4,
                   end_of_turn: str = "") -> list[str]:
    """Greedy continuations of ``prompts`` (left padding), each ending at EOS or at ``end_of_turn`` (the rendering's
    end-of-turn marker, e.g. "<|im_end|>"), decoded by :func:`decode_reply`."""
    device = next(p for p in model.parameters()).device
    stops = stop_token_ids(tokenizer, end_of_turn)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        ending = {"eos_token_id": stops} if stops else {}
        generated = model.generate(**inputs.to(device), max_new_tokens=max_new_tokens, do_sample=False, **ending)
        new = generated[:, inputs["input_ids"].shape[1]:]
        outputs += [decode_reply(tokenizer, row, stops) for row in new.tolist()]
    return outputs


@dataclass
class EvalOptions:
    data: str
    template: str = "chat"
    system_prompt: str | None = None
    append_eos: bool = True
    max_length: int = 2048
    limit: int | None = None  # the first N usable rows
    generate: bool = True
    max_new_tokens: int = 256
    batch_size: int = 4
    split: str = "test"  # hub datasets


@dataclass
class EvalData:
    examples: list[dict]  # {"input_ids", "labels", "row"}: the rows the loss is measured on
    report: DataReport
    records: list  # every raw row read (Record or DataError), in file order


def load_eval_data(tokenizer, options: EvalOptions) -> EvalData:
    """Rows -> answer-only examples (over-long rows truncated, counted). Bad rows raise :class:`DataError`."""
    data_options = DataOptions(template=options.template, loss_on="assistant", max_length=options.max_length,
                               overlength="truncate", system_prompt=options.system_prompt,
                               append_eos=options.append_eos, limit=options.limit, split=options.split)
    records: list = []  # what build_examples read (it stops at the limit), for the prompts

    def reading():
        for record in read_records(options.data, options.split):
            records.append(record)
            yield record

    examples, report = build_examples(reading(), tokenizer, data_options)
    return EvalData(examples, report, records)


def evaluate(model, tokenizer, options: EvalOptions, data: EvalData | None = None) -> dict:
    """Answer-only loss and perplexity over the rows; greedy exact match on those whose reference
    answer can be extracted. A bad row raises :class:`DataError` naming its file, row and field."""
    data = data or load_eval_data(tokenizer, options)
    examples, report, records = data.examples, data.report, data.records
    model.eval()
    total, count = answer_nll(model, examples, tokenizer.pad_token_id, options.batch_size)
    loss = total / count
    result: dict = {
        "data": str(options.data), "rows": len(examples), "answer_tokens": count, "answer_loss": loss,
        "answer_perplexity": math.exp(min(loss, 50.0)),
        "settings": {"template": options.template, "system_prompt": options.system_prompt,
                     "max_length": options.max_length, "max_new_tokens": options.max_new_tokens},
        "data_report": {k: v for k, v in report.to_dict().items() if k not in ("train", "validation")},
    }
    if not options.generate:
        return result
    # Exact match on the very rows the loss was measured on.
    used = {example["row"] for example in examples}
    renderer = Renderer(tokenizer, options.template, options.append_eos)
    fmt = report.format
    prompts, references, rows = [], [], []
    for record in records:
        if isinstance(record, DataError) or record.where not in used:
            continue
        messages = to_messages(record, fmt, options.system_prompt)
        if messages[0]["role"] == "text":
            break  # plain text has no question to ask
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = extract_answer(messages[last]["content"])
        if reference is not None:
            prompts.append(renderer.prompt(messages))
            references.append(reference)
            rows.append(record.where)
    result["rows_with_reference_answer"] = len(prompts)
    if not prompts:
        result["exact_match"] = None
        result["exact_match_note"] = ("no row has a reference answer to extract "
                                      "(#### n, solution block, \\boxed{}, answer: line)")
        return result
    generations = greedy_answers(model, tokenizer, prompts, options.max_new_tokens, options.batch_size,
                                 end_of_turn=renderer.end_of_turn())
    predictions = [extract_answer(text) for text in generations]
    correct = [answers_match(p, r) for p, r in zip(predictions, references)]
    result.update({
        "exact_match": sum(correct) / len(correct),
        "correct": sum(correct),
        "exact_match_rows": len(correct),
        "no_answer_extracted": sum(p is None for p in predictions),
        "samples": [{"row": w, "reference": r, "predicted": p, "correct": c, "generation": g[:500]}
                    for w, r, p, c, g in list(zip(rows, references, predictions, correct, generations))[:5]],
    })
    return result


def training_settings(folder: Path) -> dict:
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
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N usable rows")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--no-generate", action="store_true", help="loss/perplexity only")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from ..model.loading import load_tokenizer
    from ..model.modeling import LLMModulesForCausalLM

    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise LLMModulesError(f"{folder} is not a folder; give the output folder of llm-modules train")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMModulesError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if args.limit is not None and args.limit < 1:
        raise LLMModulesError(f"--limit must be >= 1, got {args.limit}")
    trained = training_settings(folder)
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
    # The data is read and checked before the (large) model is loaded: a bad row fails fast.
    tokenizer = load_tokenizer(str(folder), "saved model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_eval_data(tokenizer, options)
    model = LLMModulesForCausalLM.from_pretrained(folder).to(args.device)
    result = {"model": str(folder), **evaluate(model, tokenizer, options, data)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        output = Path(args.output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    print(f"answer loss {result['answer_loss']:.4f} (ppl {result['answer_perplexity']:.2f}) over "
          f"{result['answer_tokens']} tokens"
          + (f"; exact match {result['exact_match']:.3f} on {result['exact_match_rows']} rows"
             if result.get("exact_match") is not None else ""), file=sys.stderr)
    return 0
