"""The dtype a frozen model loads in when none is asked for (issue 23): fp32 on a CPU without native bf16."""

from __future__ import annotations

import torch

from llm_modules.model import loading
from llm_modules.model.loading import default_dtype, load_causal_lm
from llm_modules.tiny import save_tiny, tiny_model


def test_half_precision_checkpoints_load_in_float32_where_the_cpu_cannot_compute_them(monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert default_dtype(torch.bfloat16, cuda=False)[0] == "float32"
    assert default_dtype(torch.float16, cuda=False)[0] == "float32"
    assert default_dtype(torch.float32, cuda=False)[0] is None  # already fast: kept
    assert default_dtype(torch.bfloat16, cuda=True)[0] is None  # a GPU computes bf16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert default_dtype(torch.bfloat16, cuda=False)[0] is None  # AVX512-BF16 / AMX: bf16 is the fast one
    assert default_dtype(torch.float16, cuda=False)[0] == "float32"


def test_the_loader_says_which_dtype_it_chose_and_the_override_wins(tokenizer, tmp_path, monkeypatch, capsys):
    folder = save_tiny(tiny_model("qwen2", tokenizer).to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = load_causal_lm("source", folder)
    assert next(model.parameters()).dtype == torch.float32
    assert "source: loading in float32 (the checkpoint is bfloat16 and this CPU has no native bfloat16" in capsys.readouterr().err
    assert next(load_causal_lm("source", folder, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    capsys.readouterr()
    assert next(load_causal_lm("source", folder).parameters()).dtype == torch.bfloat16
    assert "source: loading in bfloat16 (this CPU computes bfloat16 natively" in capsys.readouterr().err
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert next(load_causal_lm("target", folder).parameters()).dtype == torch.bfloat16  # only the source's default
    assert "loading in" not in capsys.readouterr().err
