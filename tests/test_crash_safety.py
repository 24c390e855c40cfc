"""Crash safety: damaged cache shards are rebuilt, unsealed or damaged checkpoints are never resumed from,
NaN/inf losses stop the run (or skip the batch), configs are checked before anything runs, weights load
from safetensors only; SemAlign's runs alike (sealed checkpoints, the NaN/inf guard, an atomic results file)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_modules import LLMModulesError
from llm_modules.model.loading import check_safetensors, load_causal_lm
from llm_modules.tiny import save_tiny, tiny_model
from llm_modules.training import atomic
from llm_modules.training.atomic import atomic_folder_write, atomic_write_bytes
from llm_modules.training.cache import CacheFields, SourceStateCache
from llm_modules.training.checkpoints import SEAL, CorruptCheckpointError, last_good_checkpoint, verify
from llm_modules.training.config import TrainConfig, config_from_argv
from llm_modules.training.nonfinite import NonFiniteLossError
from llm_modules.training.semalign.train import train_semalign
from llm_modules.training.trainer import train

from conftest import losses


def shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("states-*.safetensors"))


def test_atomic_writes_leave_old_or_new_and_no_temporaries(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(RuntimeError), atomic_folder_write(tmp_path / "model") as scratch:
        (scratch / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert list((tmp_path / "model").iterdir()) == []  # nothing of the failed save reached the folder


FIELDS = CacheFields(source="s", source_revision=None, source_weights="", source_layer=-1, source_dtype=None,
                     tokenizer="t", template="chat", max_length=64, hidden_size=3, dtype="float32")
ROWS = [list(range(1, n + 2)) for n in range(10)]  # ten examples of 2..11 tokens


def fake_states(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B, T, 3]: a deterministic stand-in for a source's states."""
    return torch.stack([ids.float(), ids.float().cumsum(1), mask.float()], dim=-1)


def built_cache(folder: Path) -> SourceStateCache:
    cache = SourceStateCache.open(folder, FIELDS)
    cache.build(ROWS, fake_states, batch_size=2, shard_bytes=1)  # one shard per batch
    cache.consolidate()
    return SourceStateCache.open(folder, FIELDS)


def test_damaged_or_truncated_cache_shards_are_named_and_rebuilt(tmp_path):
    cache = built_cache(tmp_path)
    reference = {tuple(ids): cache.get(ids).clone() for ids in ROWS}
    first, second = shards(tmp_path)[:2]
    data = bytearray(first.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the tensor data: size and header stay valid, the sha256 does not
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:100])
    messages: list[str] = []
    reopened = SourceStateCache.open(tmp_path, FIELDS)
    assert reopened.consolidate(log=messages.append) == [first.name, second.name]
    assert f"{first} does not match the sha256" in messages[0] and "recomputed" in messages[0]
    assert f"{second} has 100 bytes, its manifest says" in messages[1]
    assert len(reopened.missing(ROWS)) == 4 and not first.exists()
    assert reopened.build(ROWS, fake_states, batch_size=2) == 4  # only the two damaged batches
    reopened.consolidate()
    again = SourceStateCache.open(tmp_path, FIELDS)
    assert all(torch.equal(again.get(ids), reference[tuple(ids)]) for ids in ROWS)
    # A shard changed after verification is refused when read, naming it.
    shard = tmp_path / again.entries[next(iter(again.entries))]
    shard.write_bytes(shard.read_bytes() + b"x")
    fresh = SourceStateCache.open(tmp_path, FIELDS)
    with pytest.raises(LLMModulesError, match=rf"{shard} has \d+ bytes, the cache manifest says"):
        [fresh.get(ids) for ids in ROWS]


def test_a_killed_cache_build_keeps_its_finished_shards_and_drops_the_rest(tmp_path):
    reference = built_cache(tmp_path / "ref")
    folder = tmp_path / "killed"
    cache = SourceStateCache.open(folder, FIELDS)
    cache.build(ROWS[:6], fake_states, batch_size=2, shard_bytes=1, rank=1, world_size=2)  # rank 1's part, no merge
    (folder / ".states-000-00000.safetensors.tmp-99").write_bytes(b"half a shard")  # rank 0 killed mid-write
    orphan = folder / "states-000-00007.safetensors"  # written, but killed before its part manifest listed it
    orphan.write_bytes(next(folder.glob("states-001-*")).read_bytes())
    assert not (folder / "manifest.json").exists()
    merged = SourceStateCache.open(folder, FIELDS)  # a folder holding only cache files is accepted
    merged.consolidate()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", *sorted(merged.shards)]
    assert not orphan.exists() and len(merged.entries) == 2  # rank 1 had one batch of two rows
    assert merged.build(ROWS, fake_states, batch_size=2) == 8
    merged.consolidate()
    done = SourceStateCache.open(folder, FIELDS)
    assert all(torch.equal(done.get(ids), reference.get(ids)) for ids in ROWS)


def test_resume_skips_unsealed_checkpoints_and_names_damaged_files(config, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(max_steps=6, save_total_limit=None))
    for step in (3, 6):
        assert verify(run / f"checkpoint-{step}") > 5
    # A kill during the write of checkpoint-6 leaves it without its seal (and maybe half a file).
    (run / "checkpoint-6" / SEAL).unlink()
    weights = run / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert last_good_checkpoint(run) == run / "checkpoint-3"
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint-6 is incomplete: it has no llm_modules_seal.json"):
        train(config(resume=str(run / "checkpoint-6")))
    capsys.readouterr()
    resumed = train(config(resume="auto"))
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-6 is incomplete" in err and f"resuming from {run / 'checkpoint-3'}" in err
    assert {4, 5, 6} <= set(losses(resumed)) and verify(run / "checkpoint-6") > 5  # written again, sealed
    # A sealed checkpoint whose file changed afterwards: refused, naming the file.
    optimizer = run / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CorruptCheckpointError, match=rf"{optimizer} does not match the sha256"):
        train(config(resume=str(run / "checkpoint-3")))
    weights = run / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpointError, match=rf"{weights} has \d+ bytes, its seal says"):
        verify(run / "checkpoint-6")
    with pytest.raises(LLMModulesError, match=rf"{weights} is not a complete safetensors file"):
        check_safetensors(weights)


def nan_source(folder: Path, tokenizer, token: str, family: str = "qwen2", **sizes) -> int:
    """A tiny source whose embedding of ``token`` is NaN: every row holding it gives a NaN loss. Returns its id."""
    model = tiny_model(family, tokenizer, seed=0, **{"hidden": 48, **sizes})
    token_id = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = float("nan")
    save_tiny(model, tokenizer, folder)
    return token_id


def rows_with(token_id: int, data: Path, tokenizer) -> set[str]:
    """The ``file:row`` names of the rows of ``data`` that hold ``token_id``."""
    lines = data.read_text().splitlines()
    rows = {f"{data}:{n}" for n, line in enumerate(lines, 1) if token_id in tokenizer(line)["input_ids"]}
    assert 0 < len(rows) < len(lines)
    return rows


def test_nonfinite_loss_stops_naming_step_rows_and_checkpoint_or_skips_counted(config, tmp_path, tokenizer, gsm_file):
    source = tmp_path / "nan-source"
    bad_rows = rows_with(nan_source(source, tokenizer, "7"), gsm_file, tokenizer)
    with pytest.raises(NonFiniteLossError) as caught:
        train(config(source=str(source)))
    message = str(caught.value)
    step = int(message.split("at step ")[1].split(" ")[0])
    assert "the training loss is nan" in message and any(row in message for row in bad_rows)
    expected = f"checkpoint-{3 * ((step - 1) // 3)}" if step > 3 else "none yet"
    assert f"the last good checkpoint is {'' if step <= 3 else str(tmp_path / 'run') + '/'}{expected}" in message

    result = train(config(source=str(source), on_nonfinite_loss="skip", output=str(tmp_path / "skip")))
    report = json.loads((tmp_path / "skip" / "train_results.json").read_text())["nonfinite_loss"]
    assert report["policy"] == "skip" and report["skipped_batches"] == len(report["skipped"]) > 0
    assert all(set(entry["rows"]) & bad_rows for entry in report["skipped"])
    assert result.trainer.state.global_step == 6
    weights = load_file(tmp_path / "skip" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())  # no NaN reached a weight
    assert all(value == value for value in losses(result).values())  # the logged curve holds no NaN


def test_pickled_weights_are_refused_and_remote_code_is_off(tmp_path, tokenizer):
    folder = tmp_path / "pickled"
    save_tiny(tiny_model("gpt2", tokenizer), tokenizer, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(LLMModulesError, match="holds pickled weights .*pytorch_model.bin.* safetensors only"):
        load_causal_lm("source", folder)
    remote = tmp_path / "remote"
    save_tiny(tiny_model("gpt2", tokenizer), tokenizer, remote)
    config_file = remote / "config.json"
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "auto_map": auto_map}))
    (remote / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    # a known architecture: its shipped code is ignored, the transformers class loads
    assert type(load_causal_lm("source", remote)).__name__ == "GPT2LMHeadModel"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "evil"}))
    with pytest.raises(LLMModulesError, match="ships its own Python code.*trust_remote_code: true"):
        load_causal_lm("source", remote)  # an unknown one: refused, not run


@pytest.mark.parametrize("changes, words", [
    (dict(source="/no/such/model"), "source: /no/such/model is not an existing folder"),
    (dict(target="not a hub id!"), "target: 'not a hub id!' is neither an existing folder nor a valid hub id"),
    (dict(data="/no/data.jsonl"), "data: /no/data.jsonl does not exist"),
    (dict(on_nonfinite_loss="ignore"), "on_nonfinite_loss: 'ignore' is not one of stop, skip"),
    (dict(source_revision="main; rm -rf /"), "source_revision: 'main; rm -rf /' is not a branch"),
    (dict(dataset_split="train\n"), "dataset_split"),
    (dict(batch_size=0, cache_shard_mb=0), "2 problem(s)"),
    (dict(resume="/no/checkpoint"), "resume: /no/checkpoint is not a checkpoint folder"),
])
def test_config_paths_and_names_are_checked_before_anything_runs(config, tmp_path, changes, words):
    with pytest.raises(LLMModulesError, match="problem") as caught:
        train(config(**changes))
    assert words in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_output_or_cache_in_a_model_folder_is_refused(config, tmp_path):
    base = config()
    with pytest.raises(LLMModulesError, match="output: .* is the source model's folder; writing there would overwrite it"):
        train(config(output=base.source))
    with pytest.raises(LLMModulesError, match="cache: .* is the target model's folder"):
        train(config(cache=base.target))


# ----------------------------------------------------------------------------------------------- SemAlign
def semalign_config(source, target, data: Path, output: Path, **changes) -> TrainConfig:
    """A tiny SemAlign run (LoRA, v1; pairs given, so no attribution): 24 rows, 6 steps, a checkpoint every 3."""
    argv = ["--method", "semalign", "--source", str(source), "--target", target, "--data", str(data),
            "--output", str(output), "--max-steps", "6", "--batch-size", "4", "--validation", "0", "--save-steps", "3",
            "--report-to", "none", "--progress", "false", "--lr-target", "1e-3", "--logging-steps", "1",
            "--semalign.map_cache", "none", "--semalign.critical_layers", "2", "--seed", "7"]
    return replace(config_from_argv(argv), **changes)


def test_semalign_stops_on_a_nonfinite_loss_or_skips_the_batch_counted(model_folder, tmp_path, tokenizer, gsm_file):
    source = tmp_path / "nan-source"  # a llama: its head is not its (NaN-holding) embedding, so the map M stays finite
    bad_rows = rows_with(nan_source(source, tokenizer, "7", family="llama", layers=4), gsm_file, tokenizer)
    target = model_folder("llama", hidden=32, layers=2)
    with pytest.raises(NonFiniteLossError) as caught:
        train_semalign(semalign_config(source, target, gsm_file, tmp_path / "stop"))
    message = str(caught.value)
    assert "the training loss is nan" in message and any(row in message for row in bad_rows)

    result = train_semalign(semalign_config(source, target, gsm_file, tmp_path / "skip", on_nonfinite_loss="skip"))
    report = json.loads((tmp_path / "skip" / "train_results.json").read_text())["nonfinite_loss"]
    assert report["policy"] == "skip" and report["skipped_batches"] == len(report["skipped"]) > 0
    assert all(set(entry["rows"]) & bad_rows for entry in report["skipped"])
    assert result.steps_run == 6 and result.trainer.state.global_step == 6
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "skip")
    assert all(torch.isfinite(p).all() for p in trained.parameters())  # no NaN reached a weight


def test_semalign_checkpoints_are_sealed_and_its_results_file_is_never_left_half_written(
        model_folder, tmp_path, gsm_file, capsys, monkeypatch):
    run = tmp_path / "run"
    source, target = model_folder("llama", hidden=48, layers=4), model_folder("llama", hidden=32, layers=2)
    first = train_semalign(semalign_config(source, target, gsm_file, run))
    assert first.steps_run == 6 and first.plan.pairs and first.output == run
    for step in (3, 6):  # LoRA: the checkpoint's weights are its adapter's
        assert verify(run / f"checkpoint-{step}") > 3
        assert "adapter_model.safetensors" in json.loads((run / f"checkpoint-{step}" / SEAL).read_text())["files"]
    (run / "checkpoint-6" / SEAL).unlink()  # killed while writing checkpoint-6
    written = (run / "train_results.json").read_bytes()
    rename = os.replace

    def killed_before_renaming_the_results(source_path, destination):
        if Path(destination).name == "train_results.json":
            raise OSError("killed before the rename")
        return rename(source_path, destination)

    monkeypatch.setattr(atomic.os, "replace", killed_before_renaming_the_results)
    capsys.readouterr()
    with pytest.raises(OSError, match="killed before the rename"):
        train_semalign(semalign_config(source, target, gsm_file, run, resume="auto"))
    err = capsys.readouterr().err
    assert "checkpoint-6 is incomplete" in err and f"resuming from {run / 'checkpoint-3'} (seal verified)" in err
    assert verify(run / "checkpoint-6") > 3  # written again, sealed
    assert (run / "train_results.json").read_bytes() == written  # the old file, whole: never half of the new one
