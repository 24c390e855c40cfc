"""The command line dispatches, streams generation, and turns user mistakes into one-line errors."""

from __future__ import annotations

import pytest
import torch

from llm_modules import LLMModulesForCausalLM, commands
from llm_modules.cli import main


def test_generate_streams_the_greedy_continuation(model_folder, tokenizer, tmp_path, capsys):
    model = LLMModulesForCausalLM.compose(model_folder("qwen2", hidden=48), model_folder("gpt_neo"), heads=4, adapter_dim=16)
    model.save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "The quick", "--raw", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    prompt = tokenizer("The quick", return_tensors="pt")
    expected = model.eval().generate(**prompt, max_new_tokens=5, do_sample=False)
    assert printed == tokenizer.decode(expected[0, prompt.input_ids.shape[1] :], skip_special_tokens=True).strip()


def test_user_mistakes_exit_2_with_a_message(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err
    assert "not a folder written by save_pretrained" in error and "Traceback" not in error
    assert main(["no-such-command"]) == 2
    assert main([]) == 0


def test_bench_runs_the_checkouts_benchmarks_or_says_where_they_are(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:  # the checkout's benchmarks/bench.py command line
        main(["bench", "--help"])
    assert done.value.code == 0 and "--topology" in capsys.readouterr().out
    monkeypatch.setattr(commands, "benchmarks_folder", lambda: tmp_path / "benchmarks")  # an installed wheel
    assert main(["bench", "--shapes", "tiny"]) == 2
    error = capsys.readouterr().err
    assert "source checkout" in error and "python benchmarks/bench.py" in error and "Traceback" not in error


def test_generate_through_onednn_prints_the_same_text(model_folder, tmp_path, capsys):
    model = LLMModulesForCausalLM.compose(model_folder("qwen2", hidden=48), model_folder("gpt_neo"), heads=4, adapter_dim=16)
    model.save_pretrained(tmp_path)
    command = ["generate", str(tmp_path), "--prompt", "The quick", "--raw", "--max-new-tokens", "5"]
    assert main(command) == 0
    plain = capsys.readouterr().out
    assert main([*command, "--cpu-linear", "onednn"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*command, "--cpu-linear", "onednn", "--device", "cuda:0"]) == 2
    assert "is for --device cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*command, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
