"""Shared fixtures: a self-built tokenizer and tiny real-architecture models saved as local folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from llm_modules.tiny import build_tokenizer, save_tiny, tiny_model

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
