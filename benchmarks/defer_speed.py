"""End-to-end time per answer of every configuration the README names, at the paper's shapes (issue 25, item 3).

    python benchmarks/defer_speed.py                    # Qwen2-1.5B-shaped source, GPT-Neo-125M-shaped target
    python benchmarks/defer_speed.py --dtype bfloat16   # both models in bf16 (the source's dtype on a CPU that computes it)
    python benchmarks/defer_speed.py --shapes tiny      # a smoke run
    python benchmarks/defer_speed.py --linear onednn    # float32 linears of every model through oneDNN (model/onednn.py)
    python benchmarks/defer_speed.py --dtype bfloat16 --target-dtype float32 --linear onednn
                                                        # what the library builds on a bf16 CPU: the frozen source in
                                                        # its checkpoint's bf16, the (trained) target in float32

Time per answer = the prompt's prefill plus ``--new-tokens`` decoded greedily (no early stop), batch 1, median of
``--repeats`` rounds; each round times every configuration once, and a ratio to the source alone is taken within a
round (median over rounds ± half their range), so a slow spell of a shared machine falls on all of them alike. The
per-step column is secondary: (time per answer - time of the prefill and one token) / (new tokens - 1).

``--dtype`` is the source's; ``--target-dtype`` the target's (by default the same). The library itself loads a frozen
source in its checkpoint's dtype (bfloat16 for Qwen2, kept on a CPU that computes it natively) and keeps the target,
which trains, in float32 (model/loading.py). Where the source is bfloat16 the source alone is also timed in float32
(``source_alone_float32``, through the same linear kernel), and every ratio is to the faster of the two in that
round: a composition is only cheaper than the large model if it is cheaper than the large model at its fastest.

Configurations: the target alone, the source alone, fusion with prompt memory (blocks before every 4th target
layer; the source reads the prompt once), the every-token mixture (fusion, no blocks, ``source_mix``: the source
reads along at every token) and deferral at three η. Weights are random (N(0, 0.02)), so accuracy is not measured
here, and a random gate's decisions mean nothing (deferral decides on a call gate beside the demo's mixture gate,
``DEFERRING``): each η is set by bisection on deferral's own decoding of the prompt so
that the source is called at about 10%, 30% and 60% of positions, and at the fraction the held-out worlds measured
(``defer-worlds.json``, when it is there), and the fraction measured while decoding is reported beside its time. Accuracy beside speed, on trained models: ``benchmarks/defer_worlds.py``. The mixture
needs one vocabulary, so the GPT-Neo-125M-shaped target here has the source's 151,936-row vocabulary (the paper's
GPT-Neo has 50,257); ``defer_end_to_end_vs_source`` is read at the η whose measured fraction is nearest the held-out
worlds' (``defer-worlds.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPTNeoConfig

from composed_bench.machine import git_commit, machine_description
from composed_bench.models import random_causal_lm, source_config, tiny_shapes
from composed_bench.report import write_json_and_markdown
from llm_modules.model.modeling import LLMModulesForCausalLM
from llm_modules.model.onednn import use_onednn_linears
from llm_modules.tiny import build_tokenizer

RESULTS = Path("benchmarks/results")
CALL_FRACTIONS = (0.1, 0.3, 0.6)  # where the random gate's η puts the source's calls
# the composition whose deferral is timed: the demo's every-token mixture (a gate that reads both models'
# confidence) with a call gate beside it (benchmarks/defer_worlds.py, the held-out rows)
DEFERRING = dict(mixture_gate="confidence", call_gate=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def target_config(shapes: str, vocab_size: int):
    """GPT-Neo-125M's body with the source's vocabulary (a mixture reads one vocabulary), or a tiny one."""
    if shapes == "tiny":
        return tiny_shapes("gpt_neo", vocab_size)
    return GPTNeoConfig(
        vocab_size=vocab_size, hidden_size=768, num_layers=12, num_heads=12,
        attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        activation_function="gelu_new", embed_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )


@torch.no_grad()
def seconds(model, prompts: list[torch.Tensor], tokens: int) -> float:
    """Seconds per answer end to end, the mean over ``prompts`` (each [1, L], answered alone): the prompt's prefill
    plus ``tokens`` decoded greedily (no early stop)."""
    start = time.perf_counter()
    for prompt in prompts:
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - start) / len(prompts)


def time_interleaved(configurations: dict[str, tuple[torch.nn.Module, Callable[[], None]]], prompts: list[torch.Tensor],
                     new_tokens: int, repeats: int) -> dict[str, dict]:
    """Every configuration once per round, ``repeats`` rounds, so that a slow spell of a shared machine falls on all
    of them alike; each answer's ratio to the source alone's is taken within its round. configurations: name ->
    (model, set-up called before each timing). Returns per name: the median seconds per answer, the median of
    prefill + one token, the per-step median derived from them, and the ratio to the source alone (median and half
    the range over rounds; where several rows time the source alone, ``source_alone*``, to the fastest in the round)."""
    for model, set_up in configurations.values():  # warm-up
        set_up()
        seconds(model, prompts[:1], 2)
    whole: dict[str, list[float]] = {name: [] for name in configurations}
    first: dict[str, list[float]] = {name: [] for name in configurations}
    for round_ in range(repeats):
        for name, (model, set_up) in configurations.items():
            set_up()
            whole[name].append(seconds(model, prompts, new_tokens))
            first[name].append(seconds(model, prompts, 1))
        log(f"round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {w[-1]:.2f}s" for n, w in whole.items()))
    fastest_source = [min(times) for times in zip(*(w for n, w in whole.items() if n.startswith("source_alone")))]
    rows = {}
    for name in configurations:
        ratios = [w / s for w, s in zip(whole[name], fastest_source)]
        median_whole, median_first = statistics.median(whole[name]), statistics.median(first[name])
        rows[name] = {"seconds_per_answer": median_whole, "prefill_and_first_token": median_first,
                      "seconds_per_step": (median_whole - median_first) / max(new_tokens - 1, 1),
                      "seconds_each_round": whole[name], "vs_source_alone": statistics.median(ratios),
                      "vs_source_alone_spread": (max(ratios) - min(ratios)) / 2}
    return rows


@torch.no_grad()
def share_at(model, prompts: list[torch.Tensor], new_tokens: int, threshold: float) -> tuple[float, float]:
    """Deferral decoding at η = threshold: the fraction of positions where the source ran and its forwards per
    answer, means over the prompts."""
    model.config.defer_threshold = threshold
    shares, calls = [], []
    for prompt in prompts:
        seconds(model, [prompt], new_tokens)
        (report,) = model.last_deferral.report()
        shares.append(report["source_position_fraction"])
        calls.append(report["source_calls"])
    return statistics.fmean(shares), statistics.fmean(calls)


def calibrated_thresholds(model, prompts: list[torch.Tensor], new_tokens: int, fractions: list[float],
                          steps: int = 10) -> list[float]:
    """η per fraction, by bisection on deferral's own decoding of the prompt (the share falls as η rises; what the
    gate reads depends on the tokens deferral chose, so quantiles over an every-token continuation miss the aim):
    of the η tried, the one whose share is nearest the fraction (then the higher η)."""
    out = []
    for fraction in fractions:
        low, high, tried = 0.0, 1.0, []
        for _ in range(steps):
            middle = (low + high) / 2
            share, _ = share_at(model, prompts, new_tokens, middle)
            tried.append((abs(share - fraction), -middle))
            low, high = (middle, high) if share > fraction else (low, middle)
        out.append(-min(tried)[1])
        log(f"η for {fraction:.0%} of positions: {out[-1]:.4f}")
    model.config.defer_threshold = None
    return out


def held_out_fraction() -> float | None:
    path = RESULTS / "defer-worlds.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("summary", {}).get("defer_source_position_fraction")


def run(shapes: str, prompt_length: int, new_tokens: int, repeats: int, dtype: torch.dtype = torch.float32,
        prompt_count: int = 1, aims: tuple[float, ...] = CALL_FRACTIONS, linear: str = "torch",
        target_dtype: torch.dtype | None = None) -> dict:
    """dtype: the source's; target_dtype: the target's (None: the same)."""
    torch.manual_seed(0)
    source = random_causal_lm(source_config(shapes), dtype, "cpu")
    vocab = int(source.config.vocab_size)
    target = random_causal_lm(target_config(shapes, vocab), target_dtype or dtype, "cpu", seed=1)
    # the source alone at its other speed: the same weights in float32 (a bfloat16 source is not always the faster)
    source_float32 = random_causal_lm(source_config(shapes), torch.float32, "cpu") if dtype != torch.float32 else None
    tokenizer = build_tokenizer()  # stands in for the one tokenizer: the inputs are ids
    common = dict(tokenizer=tokenizer, source_tokenizer=tokenizer, topology="fusion", attention_dropout=0.0)
    prompts = [torch.randint(1, min(vocab, 30000), (1, prompt_length)) for _ in range(prompt_count)]
    log(f"{shapes} shapes: source {sum(p.numel() for p in source.parameters()) / 1e6:.0f}M, target "
        f"{sum(p.numel() for p in target.parameters()) / 1e6:.0f}M parameters; prompt {prompt_length}, "
        f"{new_tokens} new tokens, {repeats} rounds")
    torch.manual_seed(1)
    fusion = LLMModulesForCausalLM.compose(source, target, memory="prompt", **common).eval()
    torch.manual_seed(1)
    mixture = LLMModulesForCausalLM.compose(source, target, memory="sequence", head="source_mix", fusion_layers=[],
                                            **DEFERRING, **common).eval()
    with torch.no_grad():  # a random call gate whose score spreads over (0, 1), so that η can split the positions
        mixture.head.mixture.call_gate.weight.normal_(0, 4 / mixture.target.config.hidden_size ** 0.5)
    if linear == "onednn":  # every configuration alike: the parents are shared, the composed parts swapped too
        models = (source, target, fusion, mixture, *([source_float32] if source_float32 is not None else []))
        swapped = sum(use_onednn_linears(m.requires_grad_(False)) for m in models)
        log(f"{swapped} float32 linear layers through oneDNN")

    def at(threshold: float | None) -> Callable[[], None]:
        return lambda: setattr(mixture.config, "defer_threshold", threshold)

    nothing = lambda: None  # noqa: E731
    configurations = {"target_alone": (target, nothing), "source_alone": (source, nothing)}
    if source_float32 is not None:
        configurations["source_alone_float32"] = (source_float32, nothing)
    configurations |= {"fusion_prompt_memory": (fusion, nothing), "every_token_mixture": (mixture, at(None))}
    measured = held_out_fraction()
    fractions = sorted({*aims, *([round(measured, 3)] if measured is not None else [])})
    aimed: dict[str, tuple[float, float]] = {}  # row -> (η, the first share it was aimed at: two aims may meet)
    for fraction, threshold in zip(fractions, calibrated_thresholds(mixture, prompts, new_tokens, fractions)):
        aimed.setdefault(f"deferral_eta_{threshold:.4f}", (threshold, fraction))
    for name, (threshold, _) in aimed.items():
        configurations[name] = (mixture, at(threshold))
    rows = time_interleaved(configurations, prompts, new_tokens, repeats)
    for name, (threshold, fraction) in aimed.items():
        share, calls = share_at(mixture, prompts, new_tokens, threshold)  # the share of whole answers
        rows[name].update(defer_threshold=threshold, aimed_fraction=fraction, source_position_fraction=share,
                          source_calls=calls)
    return rows


def headline(rows: dict) -> dict:
    """defer_end_to_end_vs_source at the η whose decoding fraction is nearest the held-out worlds'."""
    deferral = {k: v for k, v in rows.items() if k.startswith("deferral")}
    reference = held_out_fraction()
    aim = reference if reference is not None else CALL_FRACTIONS[1]
    name = min(deferral, key=lambda k: abs(deferral[k]["source_position_fraction"] - aim))
    return {"defer_end_to_end_vs_source": deferral[name]["vs_source_alone"],
            "spread": deferral[name]["vs_source_alone_spread"], "at": name,
            "its_source_position_fraction": deferral[name]["source_position_fraction"],
            "held_out_source_position_fraction": reference,
            "note": "random weights: the time of a configuration at this fraction of source calls, not its accuracy"}


def write_markdown(result: dict, path: Path) -> None:
    linear = "" if result.get("linear", "torch") == "torch" else f", linears through {result['linear']}"
    dtype, target_dtype = result.get("dtype", "float32"), result.get("target_dtype", result.get("dtype", "float32"))
    dtypes = dtype if target_dtype == dtype else f"source {dtype}, target {target_dtype}"
    lines = [f"# End-to-end time per answer ({result['shapes']} shapes, CPU, {dtypes}{linear})",
             "",
             f"`{result['command']}`: prompt {result['prompt']} tokens + {result['new_tokens']} new tokens, batch 1, "
             f"mean over {result.get('prompts', 1)} random prompt(s), "
             f"median of {result['repeats']} interleaved rounds; {result['machine'].get('cpu', result['machine'])}, commit {result['commit']}. Random weights: no accuracy here (trained rows: "
             "`defer-worlds.md`).", "",
             "| configuration | s / answer (end to end) | × the faster source alone (± half range over rounds) | source ran at | "
             "source calls | s / step (secondary) |",
             "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        fraction = row.get("source_position_fraction")
        ran = "100%" if name.startswith("source_alone") or name == "every_token_mixture" else (
            f"{fraction:.0%}" if fraction is not None else ("prompt only" if "prompt" in name else "never"))
        lines.append(f"| {name} | {row['seconds_per_answer']:.2f} | {row['vs_source_alone']:.2f} ± "
                     f"{row.get('vs_source_alone_spread', 0):.2f} | {ran} | "
                     f"{_calls(row.get('source_calls'))} | {row['seconds_per_step']:.3f} |")
    lines += ["", "```json", json.dumps(result["summary"], indent=2), "```", ""]
    path.write_text("\n".join(lines))


def _calls(calls: float | None) -> str:
    return "" if calls is None else f"{calls:g}" if float(calls).is_integer() else f"{calls:.1f}"


def fraction_list(text: str) -> tuple[float, ...]:
    """``--aims 0.1,0.3`` -> (0.1, 0.3); anything else is an argparse error naming what was expected."""
    try:
        aims = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares in (0, 1), got {text!r}")
    if not all(0 < a < 1 for a in aims):
        raise argparse.ArgumentTypeError(f"shares must be in (0, 1), got {text!r}")
    return aims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each times every configuration once")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="of the source (bfloat16: the library's choice on a CPU that computes it natively) and, "
                        "unless --target-dtype says otherwise, of the target")
    parser.add_argument("--target-dtype", choices=("float32", "bfloat16"), default=None,
                        help="of the target (the library keeps a trained target in float32); default: --dtype")
    parser.add_argument("--prompts", type=int, default=1,
                        help="random prompts per timing (a time and a share are means over them: with one, the share "
                        "jumps as the tokens deferral chose change what the gate reads)")
    parser.add_argument("--aims", type=fraction_list, default=CALL_FRACTIONS,
                        help="shares of positions to set η for, comma-separated (the held-out worlds' is added)")
    parser.add_argument("--linear", choices=("torch", "onednn"), default="torch",
                        help="onednn: every frozen float32 linear layer through oneDNN (model/onednn.py); "
                        "bfloat16 already is")
    parser.add_argument("--label", default="", help="appended to the results file's name (a second run of the same "
                        "command, kept beside the first)")
    args = parser.parse_args(argv)
    target_dtype = args.target_dtype or args.dtype
    rows = run(args.shapes, args.prompt, args.new_tokens, args.repeats, getattr(torch, args.dtype), args.prompts,
               args.aims, args.linear, getattr(torch, target_dtype))
    result = {"shapes": args.shapes, "dtype": args.dtype, "target_dtype": target_dtype, "linear": args.linear, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "prompts": args.prompts,
              "threads": torch.get_num_threads(), "machine": machine_description("cpu"), "commit": git_commit(),
              "command": "python benchmarks/defer_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    result["summary"] = headline(rows)
    variant = "" if target_dtype == args.dtype else f"-target-{target_dtype}"
    variant += "" if (args.prompts, args.aims) == (1, CALL_FRACTIONS) else f"-prompts{args.prompts}"
    variant += "" if args.linear == "torch" else f"-{args.linear}"
    variant += f"-{args.label}" if args.label else ""
    write_json_and_markdown(result, RESULTS / f"defer-speed-{args.shapes}-cpu-{args.dtype}{variant}.json", write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
