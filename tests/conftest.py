"""Shared fixtures: a self-built tokenizer and tiny real-architecture models saved as local folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import pytest
import torch

from llm_modules.tiny import build_tokenizer, save_tiny, tiny_model
from llm_modules.training.config import TrainConfig

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory, tokenizer):
    """make(family, **config) -> folder of a tiny random model of that family (cached per session)."""
    made: dict[tuple, str] = {}

    def make(family: str, seed: int = 0, **config) -> str:
        key = (family, seed, tuple(sorted(config.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{family}-{seed}")
            save_tiny(tiny_model(family, tokenizer, seed=seed, **config), tokenizer, folder)
            made[key] = str(folder)
        return made[key]

    return make


@pytest.fixture(scope="session")
def gsm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm.jsonl"
    with path.open("w") as handle:
        for i in range(24):
            handle.write(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"}) + "\n")
    return path


@pytest.fixture
def config(model_folder, gsm_file, tmp_path):
    """make(**changes) -> a TrainConfig for a tiny run (qwen2 source, gpt_neo target, 24 GSM8K-style rows)."""
    def make(**changes) -> TrainConfig:
        values = dict(
            source=model_folder("qwen2", hidden=48), target=model_folder("gpt_neo"), data=str(gsm_file),
            output=str(tmp_path / "run"), heads=4, adapter_dim=16, max_steps=6, batch_size=4, validation=0.0,
            logging_steps=1, report_to=["none"], progress=False, save_steps=3, seed=7,
        )
        values.update(changes)
        return TrainConfig(**values)

    return make


def losses(result) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in result.log_history if "loss" in e}


@pytest.fixture(scope="session")
def composed_run(tmp_path_factory):
    """A tiny composed model saved with save_pretrained, its tiny source and target beside it."""
    from llm_modules.tiny import save_tiny_composed

    return save_tiny_composed(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def serve_models():
    """serve(models, limits=None) -> base URL of ``create_app(models, limits)`` run by uvicorn on loopback in a thread
    (stopped at the end of the session)."""
    import threading
    import time

    import uvicorn

    from llm_modules.serving.server import ServerLimits, create_app

    servers = []

    def serve(models, limits=None) -> str:
        app = create_app(models, limits or ServerLimits())
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="session")
def serving(composed_run, serve_models):
    """``llm-modules serve RUN --compare source,target`` with small limits: (base URL, served models)."""
    from llm_modules.serving.batching import BatchLimits
    from llm_modules.serving.models import load_served_models
    from llm_modules.serving.server import ServerLimits

    models = load_served_models(composed_run, ["source", "target"])
    limits = ServerLimits(max_tokens=64, default_max_tokens=16, request_timeout_s=60,
                          batch=BatchLimits(max_batch_size=8, max_queue=16, batch_window_s=0.05))
    return serve_models(models, limits), models
