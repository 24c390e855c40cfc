"""``llm-modules train``: parse the run options and dispatch to the method's trainer (dispatch only)."""

from __future__ import annotations

import json

from .config import config_from_argv
from .trainer import train

HELP = """usage: llm-modules train [--config run.yaml] [--key value ...]

Train a composed model. Every option of the run config can be given in the YAML file or as
--key value (dashes or underscores), the command line winning. Common ones:
  --source S --target T --data FILE|owner/name --output DIR --epochs N --max-steps N
  --lr X (both groups) --lr-connector X --lr-target X --batch-size N --grad-accum N
  --template chat|plain --loss-on assistant|all --max-length N --validation 0.05
  --cache auto|DIR --early-stopping-patience N --resume auto|DIR --report-to tensorboard|none
  --topology fusion --memory sequence --head source_mix --mixture-gate confidence --fusion-layers '[]'
  --lr-mixture X (fusion's mixture gate; default: --lr-connector)
  --source-call-price λ --call-gate true --defer-threshold η (deferral: ask the source only where a gate on the
  target says so; README, "Cheaper than the source")
  --method semalign --semalign.mode lora|layers|full --semalign.version v1|v2 (SemAlign: the target alone
  learns the source's layer outputs through the semantic bases; see examples/semalign-arc.yaml)
See TrainConfig in src/llm_modules/training/config.py (model options: ComposeOptions in
src/llm_modules/model/configuration.py, flat or under model:) for all options, and examples/*.yaml.
"""


def train_main(argv: list[str]) -> int:
    """Entry point of ``llm-modules train``; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    config = config_from_argv(argv)
    if config.method == "semalign":  # SemAlign trains the target alone (training/semalign/)
        from .semalign.train import train_semalign as train_method
    else:
        train_method = train
    result = train_method(config)
    summary = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(json.dumps({"output": str(result.output), **summary}, indent=2))
    return 0
