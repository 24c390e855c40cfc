"""Why the composition demo's gate reads how sure each model is (``mixture_gate: confidence``).

Reuses a finished demo or comparison run (its world settings and its two pretrained models, `RUN/models/`), trains
the gate-only fusion row with each gate on the run's budget, prints test accuracy (seen / unseen final answers)
per seed and, for every miss, what the source, the target and the mixture put first at each position of the gold
trace. This is how the state-only gate's misses were read: at the cipher's second digit of a number never seen in
transfer data it deferred to the source, while the frozen target was sure of the right digit.

    llm-modules demo                                    # writes runs/demo (about 8.5 minutes)
    python scripts/mixture_gate_diagnostic.py runs/demo --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llm_modules.evaluation.compare import world_from_settings
from llm_modules.evaluation.compare_config import config_from_mapping
from llm_modules.evaluation.factworld.lm import build_world_tokenizer, encode_trace
from llm_modules.evaluation.factworld.methods import MethodSpec, Workbench, fusion_spec, run_method
from llm_modules.evaluation.factworld.pool import one_thread

GATES = ("state", "confidence")


def top(tokenizer, log_probs: torch.Tensor, k: int = 2) -> str:
    """The k likeliest next tokens with their probabilities: "' 7':0.94 ' 2':0.01"."""
    values, ids = log_probs.topk(k)
    return " ".join(f"{tokenizer.decode([int(i)])!r}:{float(v.exp()):.2f}" for i, v in zip(ids, values))


@torch.no_grad()
def trace_positions(model, bench: Workbench, fact) -> list[str]:
    """One line per reply position of the gold trace: the token, the next one, and each model's first choices."""
    tokenizer = bench.tokenizer
    example = encode_trace(tokenizer, bench.world, fact)
    ids = torch.tensor([example.input_ids])
    mask = torch.ones_like(ids)
    mixed = model(input_ids=ids, attention_mask=mask).logits[0].float().log_softmax(-1)
    source = bench.source(input_ids=ids, attention_mask=mask).logits[0].float().log_softmax(-1)
    target = bench.target(input_ids=ids, attention_mask=mask).logits[0].float().log_softmax(-1)
    lines = []
    for i in range(example.prompt_length - 1, len(example.input_ids) - 1):
        here, following = (tokenizer.decode([example.input_ids[j]]) for j in (i, i + 1))
        lines.append(f"    {here!r:>22} -> {following!r:<22} source {top(tokenizer, source[i])} | "
                     f"target {top(tokenizer, target[i])} | mixture {top(tokenizer, mixed[i])}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished demo/compare output folder (results.json, models/)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--gates", default=",".join(GATES), help="mixture gates to train: state,confidence")
    parser.add_argument("--positions", action="store_true", help="print every position of each missed trace")
    args = parser.parse_args(argv)
    results = args.run / "results.json"
    if not results.is_file() or not (args.run / "models" / "source").is_dir():
        print(f"{args.run}: expected results.json and models/source, models/target from `llm-modules demo`",
              file=sys.stderr)
        return 2
    config = config_from_mapping(json.loads(results.read_text())["settings"], where=str(results))
    world = world_from_settings(config.world)
    tokenizer = build_world_tokenizer(world)
    source, target = (AutoModelForCausalLM.from_pretrained(args.run / "models" / name).eval()
                      for name in ("source", "target"))
    bench = Workbench(world, tokenizer, source, target)
    print(f"world: {world.summary()}")
    for gate in args.gates.split(","):
        options = {"mixture_gate": gate} if gate != "state" else {}
        spec: MethodSpec = fusion_spec(memory="sequence", head="source_mix", fusion_layers=[], **options)
        for seed in (int(s) for s in args.seeds.split(",")):
            with one_thread():  # the comparison's workers run one thread each: the same numbers
                run = run_method(spec, bench, config.budget, seed, progress=False)
            scores = run.scores
            print(f"{spec.name} seed {seed}: test {scores.accuracy:.1%} (seen {scores.accuracy_seen:.1%}, unseen "
                  f"{scores.accuracy_unseen:.1%}), validation {run.validation_accuracy:.1%}")
            for output in scores.outputs:
                if output["answer"] != output["gold"]:
                    print(f"  miss {output['fact']} (gold {output['gold']}): {output['output']!r}")
                    if args.positions:
                        fact = next(f for f in world.test if f.key == output["fact"])
                        print("\n".join(trace_positions(run.model, bench, fact)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
