"""Two processes (torchrun, DDP over gloo on CPU) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import llm_modules
from llm_modules.training.trainer import train

STEPS = 20


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def cached_states(folder: Path) -> dict:
    """{example key: [T, d_s] tensor} of a cache folder, whatever shards hold them."""
    manifest = json.loads((folder / "manifest.json").read_text())
    states = {}
    for shard in set(manifest["entries"].values()):
        states.update(load_file(folder / shard))
    assert set(states) == set(manifest["entries"])
    return states


def curve(output: Path) -> dict[int, float]:
    # the last checkpoint's trainer_state.json holds the whole log history
    state = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_two_process_ddp_matches_one_process_and_builds_the_same_cache(config, tmp_path):
    common = dict(max_steps=STEPS, save_steps=STEPS, attention_dropout=0.0, cache_dtype="float32", cache_batch_size=4)
    two_config = config(**common, output=str(tmp_path / "two"), batch_size=2, cache=str(tmp_path / "cache-2"))
    argv = [f"--{key}={','.join(value) if isinstance(value, list) else value}"
            for key, value in two_config.to_dict().items() if value is not None]
    env = {**os.environ, "PYTHONPATH": str(Path(llm_modules.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "llm_modules.cli", "train", *argv]
    two = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the single-process run meanwhile, in this process
        one = train(config(**common, output=str(tmp_path / "one"), batch_size=4, cache=str(tmp_path / "cache-1")))
        _, stderr = two.communicate(timeout=300)
    finally:
        two.kill()
    assert one.trainer.state.global_step == STEPS
    assert two.returncode == 0, stderr[-3000:]

    results = json.loads((tmp_path / "two" / "train_results.json").read_text())
    assert results["processes"] == 2 and results["cache"]["ranks"] == 2 and results["cache"]["computed"] == 24
    single, double = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert sorted(single) == sorted(double) == list(range(1, STEPS + 1))
    assert max(abs(single[s] - double[s]) for s in single) < 1e-5
    # Each rank wrote its own shards; merged, they hold exactly the rows and values one process computed.
    shards = json.loads((tmp_path / "cache-2" / "manifest.json").read_text())["shards"]
    assert {name.split("-")[1] for name in shards} == {"000", "001"}
    a, b = cached_states(tmp_path / "cache-1"), cached_states(tmp_path / "cache-2")
    assert a.keys() == b.keys() and len(a) == 24
    assert all(a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    # One process wrote the final model; its weights match the single-process run's.
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys() and max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_accelerate_configs_load_and_name_their_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file examples/accelerate/{path.name} -m llm_modules.cli train")
