"""Where the slow tests find real models and data (never in the repo): one place for every real-model test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("LLM_MODULES_REAL_MODELS", Path.home() / ".cache" / "real-models"))
QWEN_05B, SMOLLM2 = REAL / "qwen2.5-coder-0.5b-instruct", REAL / "smollm2-135m-instruct"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def needs_models(*folders: Path) -> pytest.MarkDecorator:
    """Skip unless the real model folders exist (built by ../shared/tools/real-models.py)."""
    missing = [folder.name for folder in folders if not folder.is_dir()]
    return pytest.mark.skipif(bool(missing), reason=f"real models {missing} not built; run: "
                                                    f"python ../shared/tools/real-models.py --out {REAL}")


def needs_gsm8k() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason=f"no GSM8K data in {GSM8K}")
