"""Slow: lm-evaluation-harness on a saved composed model of real models (Qwen2.5-Coder-0.5B-Instruct read by
SmolLM2-135M-Instruct, fusion with prompt memory, two tokenizers), on real ARC-Challenge, MMLU and GSM8K rows.

The fusion gates are closed (as composed), so lm-eval must give the composed model exactly the target alone's
scores and generations: the target alone runs through lm-eval's own ``hf`` model type. Then lm-eval's own
command line (``llm-modules lm-eval run --model llm-modules ...``) on the same saved model.
Needs the real models (tests/realpaths.py) and the offline data ($LLM_MODULES_DATASETS; GSM8K beside the repo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from realpaths import GSM8K, QWEN_05B, SMOLLM2, needs_gsm8k, needs_models

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.evaluation.lm_eval_command import evaluate_with_lm_eval

SOURCE, TARGET = QWEN_05B, SMOLLM2
DATASETS = Path(os.environ.get("LLM_MODULES_DATASETS", Path.home() / ".cache" / "offline-datasets"))
TASKS = ["llm_modules_arc_challenge", "llm_modules_mmlu", "llm_modules_gsm8k"]

pytestmark = [
    pytest.mark.slow, needs_models(SOURCE, TARGET), needs_gsm8k(),
    pytest.mark.skipif(not ((DATASETS / "arc_challenge").is_dir() and (DATASETS / "mmlu").is_dir()),
                       reason=f"offline data not written; run: python ../shared/tools/offline-datasets.py --out {DATASETS}"),
]


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fusion-real")
    LLMModulesForCausalLM.compose(str(SOURCE), str(TARGET), topology="fusion", memory="prompt").save_pretrained(folder)
    return folder


def test_lm_eval_on_a_saved_real_composed_model_equals_the_target_alone_with_closed_gates(composed):
    samples = {"llm_modules_arc_challenge": [0, 1, 2, 3], "llm_modules_mmlu": [0, 1, 2, 3], "llm_modules_gsm8k": [0, 1]}
    runs = [evaluate_with_lm_eval(model, TASKS, data_dir=DATASETS, gsm8k_dir=GSM8K, samples=samples, batch_size=4,
                                  max_gen_toks=24, log_samples=True) for model in (composed, TARGET)]
    for task in TASKS:
        composed_samples, alone = (sorted(run["samples"][task], key=lambda s: (s["doc_id"], s["filter"])) for run in runs)
        assert len({s["doc_id"] for s in composed_samples}) == len(samples[task])
        for a, b in zip(composed_samples, alone):
            if task == "llm_modules_gsm8k":
                assert a["resps"] == b["resps"] and a["resps"][0][0].strip()
            else:
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-3)
        print(task, {k: v for k, v in runs[0]["results"][task].items() if "stderr" not in k and k != "alias"})


def test_lm_eval_command_line_with_the_registered_model_type(composed, tmp_path):
    tasks = tmp_path / "tasks"
    assert main(["lm-eval", "--write-tasks", str(tasks), "--data-dir", str(DATASETS), "--gsm8k-dir", str(GSM8K)]) == 0
    output = tmp_path / "out"
    assert main(["lm-eval", "run", "--model", "llm-modules", "--model_args", f"pretrained={composed},dtype=float32",
                 "--include_path", str(tasks), "--tasks", "llm_modules_arc_challenge", "--limit", "2",
                 "--device", "cpu", "--batch_size", "2", "--apply_chat_template", "--output_path", str(output)]) == 0
    written = list(output.rglob("results_*.json"))
    assert written and json.loads(written[0].read_text())["n-samples"]["llm_modules_arc_challenge"]["effective"] == 2
