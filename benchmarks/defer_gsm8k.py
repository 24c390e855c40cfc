"""Deferral on a real pair, one tokenizer: Qwen2.5-Coder-1.5B-Instruct (source) -> 0.5B-Instruct (target) on GSM8K
(issue 25, item 5).

    python benchmarks/defer_gsm8k.py --n 30        # resumable: each finished answer is written at once

1. **The gate** (fusion, no blocks, ``head: source_mix``, ``mixture_gate: target_confidence``: 899 weights) trains
   on GSM8K train traces (``--train`` rows, gold solutions rewritten to end "The answer is N."), with the mixture's
   cross-entropy, as the mixture heads train: it learns to take the 1.5B's distribution where the frozen 0.5B is
   unsure and the 1.5B is right. Both models are frozen, so the loss at each gold token needs only four cached
   things per position: the target's state, its confidence, and each model's log-probability of the gold token.
   They are computed once (one forward of each model per trace) and the gate trains on them for ``--epochs``
   (written here rather than through ``llm-modules train``, which would run the 1.5B at every step of every epoch).
2. **The rows**, greedy, at most 256 new tokens, batch 1, on the first ``--n`` GSM8K test questions (fixed): the
   0.5B alone, the 1.5B alone, transformers' assisted generation (the 1.5B with ``assistant_model`` = the 0.5B:
   exactly the 1.5B's greedy output) and deferral at two η fixed before any test answer (0.5, chosen on the
   development fact world, and 0.3). Columns: exact match (the answer after "The answer is" or the last rule of
   ``llm-modules eval``'s extraction), tokens/s end to end (new tokens / wall time, prefill included), source
   forwards per answer and the fraction of positions where the source ran.

bf16 on a CPU that computes it natively (this one), else fp32. n = 30 is indicative: say so with its numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm_modules.evaluation.evaluate import answers_match, extract_answer
from llm_modules.model.loading import cpu_has_native_bf16
from llm_modules.model.modeling import LLMModulesForCausalLM

MODELS = Path("~/.cache/real-models").expanduser()
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"  # ../shared beside the checkout
INSTRUCTION = "Solve the problem step by step. End your reply with: The answer is <number>."
THRESHOLDS = (0.5, 0.3)
RESULTS = Path("benchmarks/results/defer-gsm8k.json")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_rows(path: Path, count: int) -> list[dict]:
    rows = []
    with path.open() as handle:
        for line in handle:
            if len(rows) == count:
                break
            rows.append(json.loads(line))
    return rows


def gold_solution(answer: str) -> tuple[str, str]:
    """GSM8K's solution without its calculator annotations, ending "The answer is N."; and N."""
    body, _, number = answer.rpartition("####")
    number = number.strip()
    return re.sub(r"<<[^>]*>>", "", body).strip() + f"\nThe answer is {number}.", number


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def compose(source: Path, target: Path, dtype: torch.dtype) -> LLMModulesForCausalLM:
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.compose(str(source), str(target), topology="fusion", memory="sequence",
                                          head="source_mix", fusion_layers=[], mixture_gate="target_confidence",
                                          source_dtype=str(dtype).removeprefix("torch."))
    model.target.to(dtype)  # frozen; the gate stays fp32
    return model.eval()


@torch.no_grad()
def gate_inputs(model: LLMModulesForCausalLM, question: str, answer: str) -> dict[str, torch.Tensor]:
    """At each position predicting a gold solution token: the target's state [n, d_t], its confidence features
    [n, 2], and each model's log-probability of the gold token [n]."""
    tokenizer = model.tokenizer
    solution, _ = gold_solution(answer)
    prompt = prompt_ids(tokenizer, question)
    reply = tokenizer(solution + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([prompt, reply], 1)
    gold = ids[0, prompt.shape[1]:]
    keep = slice(prompt.shape[1] - 1, ids.shape[1] - 1)  # positions whose next token is a reply token
    output = model.target(input_ids=ids, output_hidden_states=True)
    base = output.logits[0, keep].float().log_softmax(-1)
    states = model.source_states(ids, layers=(-1,))[0, keep, 0]
    source = model.source_logits(states).log_softmax(-1)
    features = model.head.mixture.gate_features([base])
    return {"hidden": output.hidden_states[-1][0, keep].float(), "features": features,
            "target": base.gather(-1, gold[:, None])[:, 0], "source": source.gather(-1, gold[:, None])[:, 0]}


def train_gate(model: LLMModulesForCausalLM, cached: list[dict], epochs: int, lr: float) -> list[float]:
    """The mixture's cross-entropy at the gold tokens, -log(w_s p_source + w_t p_target), on the cached inputs."""
    mixture = model.head.mixture
    optimizer = torch.optim.AdamW(mixture.mix_gate.parameters(), lr=lr, weight_decay=0.0)
    hidden = torch.cat([c["hidden"] for c in cached])
    features = torch.cat([c["features"] for c in cached])
    paths = torch.stack([torch.cat([c["source"] for c in cached]), torch.cat([c["target"] for c in cached])], -1)
    losses = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(hidden.shape[0], generator=generator)
        for start in range(0, len(order), 256):
            chosen = order[start: start + 256]
            weights = mixture.weights_given(hidden[chosen], features[chosen])  # [n, 2]: source, target
            loss = -(weights.log() + paths[chosen]).logsumexp(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def answer(generate, tokenizer, question: str, model=None) -> dict:
    ids = prompt_ids(tokenizer, question)
    start = time.perf_counter()
    output = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=256, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = output[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    record = {"seconds": seconds, "new_tokens": int(new.shape[0]), "text": text}
    if model is not None and model.last_deferral is not None:
        (report,) = model.last_deferral.report()
        record.update(source_calls=report["source_calls"], source_position_fraction=report["source_position_fraction"])
    return record


def summarise(rows: dict) -> dict:
    table = {}
    for name, answers in rows.items():
        if not answers:
            continue
        values = list(answers.values())
        entry = {"n": len(values), "exact_match": statistics.fmean(a["correct"] for a in values),
                 "tokens_per_second": sum(a["new_tokens"] for a in values) / sum(a["seconds"] for a in values),
                 "seconds_per_answer": statistics.fmean(a["seconds"] for a in values)}
        if "source_calls" in values[0]:
            entry["source_calls_per_answer"] = statistics.fmean(a["source_calls"] for a in values)
            entry["source_position_fraction"] = statistics.fmean(a["source_position_fraction"] for a in values)
        table[name] = entry
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="GSM8K test questions (the first n)")
    parser.add_argument("--train", type=int, default=64, help="GSM8K train traces the gate trains on")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rows", default="target_alone,deferral_0.5,deferral_0.3,source_alone,assisted")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--gsm8k", default=str(GSM8K), help="folder with GSM8K's train.jsonl and test.jsonl")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    model = compose(MODELS / "qwen2.5-coder-1.5b-instruct", MODELS / "qwen2.5-coder-0.5b-instruct", dtype)
    tokenizer = model.tokenizer
    gate_file = path.with_suffix(".gate.safetensors")  # the trained gate, so that a restarted run decodes with it
    if gate_file.exists():
        model.head.mixture.mix_gate.load_state_dict(load_file(gate_file))
    else:
        start = time.perf_counter()
        train = read_rows(Path(args.gsm8k) / "train.jsonl", args.train)
        cached = [gate_inputs(model, row["question"], row["answer"]) for row in train]
        losses = train_gate(model, cached, args.epochs, args.lr)
        save_file({k: v.contiguous() for k, v in model.head.mixture.mix_gate.state_dict().items()}, gate_file)
        with torch.no_grad():
            weights = torch.cat([1 - model.head.mixture.weights_given(c["hidden"], c["features"])[:, -1]
                                 for c in cached])
        results["gate"] = {"train_rows": args.train, "positions": int(weights.numel()), "epochs": args.epochs,
                           "lr": args.lr, "loss_first": losses[0], "loss_last": losses[-1],
                           "mean_source_weight_on_train": float(weights.mean()),
                           "seconds": time.perf_counter() - start}
        log(f"gate trained: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    questions = read_rows(Path(args.gsm8k) / "test.jsonl", args.n)
    generators = {"target_alone": (model.target.generate, None), "source_alone": (model.source.generate, None),
                  "assisted": (lambda **k: model.source.generate(assistant_model=model.target, **k), None)}
    for name in args.rows.split(","):
        answers = results["rows"].setdefault(name, {})
        for index, row in enumerate(questions):
            if str(index) in answers:
                continue
            if name.startswith("deferral_"):
                model.config.defer_threshold = float(name.removeprefix("deferral_"))
                record = answer(model.generate, tokenizer, row["question"], model)
            else:
                generate, _ = generators[name]
                record = answer(generate, tokenizer, row["question"])
            _, number = gold_solution(row["answer"])
            record["correct"] = answers_match(extract_answer(record["text"]), number)
            answers[str(index)] = record
            results.update(summary=summarise(results["rows"]), dtype=str(dtype), n=args.n,
                           command="python benchmarks/defer_gsm8k.py " + " ".join(argv or sys.argv[1:]))
            temporary = path.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(results, indent=2))
            temporary.replace(path)
            log(f"{name} #{index}: {'right' if record['correct'] else 'wrong'}, {record['new_tokens']} tokens in "
                f"{record['seconds']:.1f}s" + (f", source ran at {record['source_position_fraction']:.0%}"
                                              if "source_position_fraction" in record else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
