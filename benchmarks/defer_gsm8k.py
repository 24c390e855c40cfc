"""Deferral on a real pair, one tokenizer: Qwen2.5-Coder-1.5B-Instruct (source) -> 0.5B-Instruct (target) on GSM8K
(issue 25, item 5).

    python benchmarks/defer_gsm8k.py --n 30        # resumable: each finished answer is written at once
    python benchmarks/defer_gsm8k.py --n 30 --rows target_alone,deferral_0.5,deferral_0.3,source_alone \
        --batched-rows target_alone,deferral_0.5,deferral_0.3,source_alone --timed 10   # the committed run

1. **The gate** (fusion, no blocks, ``head: source_mix``, ``mixture_gate: target_confidence``: 899 weights) trains
   on GSM8K train traces (gold solutions rewritten to end "The answer is N."), with the mixture's cross-entropy as
   the mixture heads train, plus a price on each source call: ``loss = -log(w_s p_source + w_t p_target) + λ w_s``.
   Without the price (λ = 0) the gate learns to take the 1.5B nearly everywhere (a first run: mean source weight
   0.93 on the train traces, the source at 95% of decoded positions), since the 1.5B gives most gold tokens a
   slightly higher probability; with it, the gate asks the source only where its gain at the gold token is worth
   λ nats. Both models are frozen, so the loss needs four cached things per position: the target's state, its
   confidence, and each model's log-probability of the gold token, computed once (one forward of each model per
   trace); the gate trains on them (written here rather than through ``llm-modules train``, which would run the
   1.5B at every step of every epoch). λ is chosen on ``--dev`` further train traces, never on test: the λ with
   the best teacher-forced log-likelihood under deferral at η = 0.5 among those whose source share there is at
   most ``--budget`` (and above 0: a gate that never calls is the 0.5B alone). The cached inputs are kept beside
   the results (``.cache.safetensors``), so choosing again costs seconds.
2. **The rows**, greedy, at most 256 new tokens, on the first ``--n`` GSM8K test questions (fixed), question by
   question (every row has the same n at any time): the 0.5B alone, the 1.5B alone, transformers' assisted
   generation (the 1.5B with ``assistant_model`` = the 0.5B: the 1.5B's greedy output, up to bf16 rounding) and
   deferral at two η fixed before any test answer (0.5, chosen on the development composition world, and 0.3:
   more calls).
   Columns: exact match (the answer after "The answer is" or the last rule of ``llm-modules eval``'s extraction;
   beside it the lenient "flexible" match, the reply's last number, after lm-eval's GSM8K filter: ``--rescore``),
   tokens/s end to end (new tokens / wall time, prefill included, batch 1), source forwards per answer and the
   fraction of decoded positions where the source ran. On 2 CPU cores 30 questions x 4 rows at batch 1 take longer
   than a session (the 1.5B: ~100 s an answer; deferral: ~80 s), so ``--batched-rows`` decode the questions past
   ``--timed`` in batches of ``--batch``: those answers count for exact match; time and the source's share come
   from the ``--timed`` answers decoded one at a time. ``--timed 30`` (the default) times every answer.

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

from llm_modules.evaluation.evaluate import answers_match, extract_answer, last_number
from llm_modules.model.loading import cpu_has_native_bf16
from llm_modules.model.modeling import LLMModulesForCausalLM

MODELS = Path("~/.cache/real-models").expanduser()
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"  # ../shared beside the checkout
INSTRUCTION = "Solve the problem step by step. End your reply with: The answer is <number>."
THRESHOLDS = (0.5, 0.3)
RESULTS = Path("benchmarks/results/defer-gsm8k.json")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_while_paused(pause_file: Path) -> None:
    """Between answers, wait while ``pause_file`` exists: another timed job can have the cores without slowing an
    answer being timed here (``touch benchmarks/results/defer-gsm8k.pause``; remove it to go on)."""
    if pause_file.exists():
        log(f"paused while {pause_file} exists")
        while pause_file.exists():
            time.sleep(2)


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


def prompt_text(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    return tokenizer(prompt_text(tokenizer, question), return_tensors="pt", add_special_tokens=False).input_ids


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
            "target": base.gather(-1, gold[:, None])[:, 0], "source": source.gather(-1, gold[:, None])[:, 0],
            "target_right": base.argmax(-1) == gold, "source_right": source.argmax(-1) == gold}


def stacked(cached: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([c[key] for c in cached]) for key in cached[0]}


def cached_gate_inputs(model: LLMModulesForCausalLM, args: argparse.Namespace,
                       cache_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gate's inputs on the train and dev traces, computed once and kept in ``cache_file``."""
    key = f"{args.train}_{args.dev}"
    if cache_file.exists():
        stored = load_file(cache_file)
        if stored.pop("rows").tolist() == [args.train, args.dev]:
            split = lambda prefix: {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
            return split("train."), split("dev.")
    start = time.perf_counter()
    rows = read_rows(Path(args.gsm8k) / "train.jsonl", args.train + args.dev)
    cached = [gate_inputs(model, row["question"], row["answer"]) for row in rows]
    log(f"cached {len(cached)} train traces ({key}) in {time.perf_counter() - start:.0f}s")
    train, dev = stacked(cached[:args.train]), stacked(cached[args.train:])
    save_file({"rows": torch.tensor([args.train, args.dev]), **{f"train.{k}": v.contiguous() for k, v in train.items()},
               **{f"dev.{k}": v.contiguous() for k, v in dev.items()}}, cache_file)
    return train, dev


def train_gate(model: LLMModulesForCausalLM, cached: dict[str, torch.Tensor], epochs: int, lr: float,
               call_cost: float) -> list[float]:
    """The mixture's cross-entropy at the gold tokens, -log(w_s p_source + w_t p_target), plus ``call_cost`` * w_s
    (nats per source call), on the cached inputs; the gate starts from the same seeded weights for every price."""
    mixture = model.head.mixture
    torch.manual_seed(0)
    mixture.mix_gate.reset_parameters()
    optimizer = torch.optim.AdamW(mixture.mix_gate.parameters(), lr=lr, weight_decay=0.0)
    paths = torch.stack([cached["source"], cached["target"]], -1)
    losses = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(paths.shape[0], generator=generator)
        for start in range(0, len(order), 256):
            chosen = order[start: start + 256]
            weights = mixture.weights_given(cached["hidden"][chosen], cached["features"][chosen])  # [n, 2]
            loss = (-(weights.log() + paths[chosen]).logsumexp(-1) + call_cost * weights[:, 0]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def deferral_on_traces(model: LLMModulesForCausalLM, cached: dict[str, torch.Tensor], threshold: float) -> dict:
    """Teacher-forced deferral on gold traces: the source's share of positions, the log-likelihood of the gold
    tokens (the target's where the gate stays below η, the mixture's above) and the greedy token accuracy (the
    target's argmax below η, the source's above: the mixture's where the source weight is high)."""
    weights = model.head.mixture.weights_given(cached["hidden"], cached["features"])
    source_weight = 1 - weights[:, -1]
    defer = source_weight > threshold
    mixed = (weights.log() + torch.stack([cached["source"], cached["target"]], -1)).logsumexp(-1)
    log_likelihood = torch.where(defer, mixed, cached["target"])
    right = torch.where(defer, cached["source_right"], cached["target_right"])
    return {"source_share": defer.float().mean().item(), "gold_nll": -log_likelihood.mean().item(),
            "token_accuracy": right.float().mean().item()}


def choose_gate(model: LLMModulesForCausalLM, train: dict, dev: dict, args: argparse.Namespace) -> dict:
    """Trains one gate per price λ and keeps the one the rule in the module docstring picks (on dev traces)."""
    trials, states = [], {}
    for call_cost in args.call_costs:
        losses = train_gate(model, train, args.epochs, args.lr, call_cost)
        trial = {"call_cost": call_cost, "loss_first": losses[0], "loss_last": losses[-1],
                 "dev": {str(eta): deferral_on_traces(model, dev, eta) for eta in THRESHOLDS},
                 "train_source_share": deferral_on_traces(model, train, 0.5)["source_share"]}
        trials.append(trial)
        states[call_cost] = {k: v.clone() for k, v in model.head.mixture.mix_gate.state_dict().items()}
        log(f"λ={call_cost}: dev at η=0.5 {trial['dev']['0.5']}")
    within = [t for t in trials if 0 < t["dev"]["0.5"]["source_share"] <= args.budget]
    if within:
        chosen = min(within, key=lambda t: t["dev"]["0.5"]["gold_nll"])
    else:  # no price puts the share in (0, budget]: the nearest to the budget
        chosen = min(trials, key=lambda t: abs(t["dev"]["0.5"]["source_share"] - args.budget))
    model.head.mixture.mix_gate.load_state_dict(states[chosen["call_cost"]])
    reference = {"target_alone": deferral_on_traces(model, dev, 2.0),
                 "mixture_every_position": deferral_on_traces(model, dev, -1.0)}
    return {"chosen_call_cost": chosen["call_cost"], "budget": args.budget, "trials": trials,
            "dev_reference": reference}


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


@torch.no_grad()
def answer_batch(generate, tokenizer, questions: list[str]) -> list[dict]:
    """Greedy answers to several questions in one left-padded batch (exact match only: not timed per answer; with
    deferral each row still decides on its own, but the source reads every row's pending tokens when any asks)."""
    tokenizer.padding_side = "left"
    batch = tokenizer([prompt_text(tokenizer, q) for q in questions], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    output = generate(**batch, max_new_tokens=256, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    records = []
    for row in output[:, batch.input_ids.shape[1]:]:
        ends = (row == tokenizer.eos_token_id).nonzero()
        new = row[: int(ends[0]) + 1] if len(ends) else row
        records.append({"batch": len(questions), "new_tokens": int(new.shape[0]),
                        "text": tokenizer.decode(new, skip_special_tokens=True)})
    return records


def score(record: dict, number: str) -> dict:
    """Strict exact match (``correct``: the stated answer) and the lenient reading (``flexible_correct``: the last
    number of the reply, for replies the 256-token limit cut off after their result)."""
    record["correct"] = answers_match(extract_answer(record["text"]), number)
    record["flexible_correct"] = answers_match(last_number(record["text"]), number)
    return record


def rescore(results: dict, questions: list[dict]) -> None:
    """Score every stored answer again from its text (no model runs)."""
    for answers in results["rows"].values():
        for index, record in answers.items():
            score(record, gold_solution(questions[int(index)]["answer"])[1])


def summarise(rows: dict) -> dict:
    """Per row: exact match over every answer; time over the answers decoded one at a time (batch 1)."""
    table = {}
    for name, answers in rows.items():
        if not answers:
            continue
        values = list(answers.values())
        timed = [a for a in values if "batch" not in a]
        entry = {"n": len(values), "exact_match": statistics.fmean(a["correct"] for a in values),
                 "flexible_match": statistics.fmean(a.get("flexible_correct", False) for a in values), "n_timed": len(timed),
                 "tokens_per_second": sum(a["new_tokens"] for a in timed) / sum(a["seconds"] for a in timed),
                 "seconds_per_answer": statistics.fmean(a["seconds"] for a in timed)}
        if "source_calls" in timed[0]:  # a batch's calls are shared and count positions past a row's end
            entry["source_calls_per_answer"] = statistics.fmean(a["source_calls"] for a in timed)
            entry["source_position_fraction"] = statistics.fmean(a["source_position_fraction"] for a in timed)
        table[name] = entry
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="GSM8K test questions (the first n)")
    parser.add_argument("--train", type=int, default=96, help="GSM8K train traces the gate trains on")
    parser.add_argument("--dev", type=int, default=32, help="further train traces on which λ is chosen")
    parser.add_argument("--call-costs", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35],
                        help="prices λ (nats per source call) tried")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="largest share of dev positions where the source may run at η = 0.5")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rows", default="target_alone,deferral_0.5,deferral_0.3,source_alone,assisted")
    parser.add_argument("--batched-rows", default="",
                        help="rows whose answers past --timed are decoded in batches of --batch: exact match over all, "
                        "time and the source's share over the first --timed (batch 1); fits a CPU session")
    parser.add_argument("--timed", type=int, default=30, help="questions decoded one at a time in --batched-rows")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--gsm8k", default=str(GSM8K), help="folder with GSM8K's train.jsonl and test.jsonl")
    parser.add_argument("--rescore", action="store_true",
                        help="score the stored answers again from their texts (strict and flexible) and stop")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if args.rescore:
        if not path.exists():
            log(f"--rescore: {path} does not exist; it rescores the answers a decoding run stored there")
            return 2
        count = max((int(i) + 1 for answers in results["rows"].values() for i in answers), default=0)
        rescore(results, read_rows(Path(args.gsm8k) / "test.jsonl", count))
        results["summary"] = summarise(results["rows"])
        path.write_text(json.dumps(results, indent=2))
        log(json.dumps({k: {m: v[m] for m in ("n", "exact_match", "flexible_match")} for k, v in results["summary"].items()}))
        return 0
    model = compose(MODELS / "qwen2.5-coder-1.5b-instruct", MODELS / "qwen2.5-coder-0.5b-instruct", dtype)
    tokenizer = model.tokenizer
    gate_file = path.with_suffix(".gate.safetensors")  # the trained gate, so that a restarted run decodes with it
    if gate_file.exists():
        model.head.mixture.mix_gate.load_state_dict(load_file(gate_file))
    else:
        start = time.perf_counter()
        train, dev = cached_gate_inputs(model, args, path.with_suffix(".cache.safetensors"))
        selection = choose_gate(model, train, dev, args)
        save_file({k: v.contiguous() for k, v in model.head.mixture.mix_gate.state_dict().items()}, gate_file)
        results["gate"] = {"train_rows": args.train, "dev_rows": args.dev, "epochs": args.epochs, "lr": args.lr,
                           **selection, "seconds": time.perf_counter() - start}
        for name in [name for name in results["rows"] if name.startswith("deferral_")]:
            del results["rows"][name]  # answers of an earlier gate
        path.write_text(json.dumps(results, indent=2))
        log(f"gate: λ = {selection['chosen_call_cost']} chosen on the dev traces; dev references "
            f"{selection['dev_reference']}")
    questions = read_rows(Path(args.gsm8k) / "test.jsonl", args.n)
    generators = {"target_alone": (model.target.generate, None), "source_alone": (model.source.generate, None),
                  "assisted": (lambda **k: model.source.generate(assistant_model=model.target, **k), None)}
    names, batched = args.rows.split(","), [name for name in args.batched_rows.split(",") if name]

    command = "python benchmarks/defer_gsm8k.py " + " ".join(argv or sys.argv[1:])

    def write() -> None:  # each row keeps the command that decoded it (a later run may fill in one row)
        commands = results.setdefault("row_commands", {})
        commands.update({name: command for name in names if name not in commands})
        results.update(summary=summarise(results["rows"]), dtype=str(dtype))
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(results, indent=2))
        temporary.replace(path)

    for index, row in enumerate(questions):  # question by question, so that every row has the same n at any time
        for name in names:
            answers = results["rows"].setdefault(name, {})
            if str(index) in answers or (name in batched and index >= args.timed):
                continue
            wait_while_paused(path.with_suffix(".pause"))
            if name.startswith("deferral_"):
                model.config.defer_threshold = float(name.removeprefix("deferral_"))
                record = answer(model.generate, tokenizer, row["question"], model)
            else:
                generate, _ = generators[name]
                record = answer(generate, tokenizer, row["question"])
            answers[str(index)] = score(record, gold_solution(row["answer"])[1])
            write()
            log(f"{name} #{index}: {'right' if record['correct'] else 'wrong'}, {record['new_tokens']} tokens in "
                f"{record['seconds']:.1f}s" + (f", source ran at {record['source_position_fraction']:.0%}"
                                              if "source_position_fraction" in record else ""))
    for name in batched:  # the rest of these rows' answers, a batch at a time
        answers = results["rows"].setdefault(name, {})
        left = [index for index in range(args.timed, len(questions)) if str(index) not in answers]
        for start in range(0, len(left), args.batch):
            chosen = left[start: start + args.batch]
            wait_while_paused(path.with_suffix(".pause"))
            if name.startswith("deferral_"):
                model.config.defer_threshold = float(name.removeprefix("deferral_"))
            generate = model.generate if name.startswith("deferral_") else generators[name][0]
            records = answer_batch(generate, tokenizer, [questions[i]["question"] for i in chosen])
            for index, record in zip(chosen, records):
                answers[str(index)] = score(record, gold_solution(questions[index]["answer"])[1])
            write()
            log(f"{name} #{chosen[0]}-{chosen[-1]} (batch): {sum(r['correct'] for r in records)} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
