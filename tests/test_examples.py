"""examples/*.yaml: the first line of each is the command that runs it; training examples load as run configs."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from llm_modules.cli import COMMANDS
from llm_modules.errors import LLMModulesError
from llm_modules.training.trainer import check_config
from llm_modules.training.config import config_from_argv, load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_the_training_examples_exist():
    assert {"paper-stratos.yaml", "gsm8k-real.yaml"} <= {path.name for path in EXAMPLES}


def first_line_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"# (llm-modules (\S+) --config (\S+)(?: .*)?)", first)
    assert match, f"{path.name}: first line must be '# llm-modules COMMAND --config examples/{path.name}', got {first!r}"
    assert match.group(3) == f"examples/{path.name}"
    command = shlex.split(match.group(1))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[command[0]] == "llm_modules.cli:main" and command[1] in COMMANDS
    return command


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_first_line_of_every_example_is_a_command_that_runs_it(path):
    first_line_command(path)


TRAIN_EXAMPLES = [path for path in EXAMPLES if path.read_text().startswith("# llm-modules train ")]


MODEL_FIELDS = ("source", "target", "tokenizer")


def with_stand_ins(path: Path, config, folder: Path):
    """The config with a stand-in for each local model folder or data file that a fresh machine lacks.

    Real model folders (``../shared/tools/real-models.py``) and prepared data (ARC for SemAlign) are made
    by a step the example must name; the fast suite checks everything else without them, so it passes on
    a machine where nothing was ever built (issue 26).
    """
    text = path.read_text()
    changes = {}
    for name in MODEL_FIELDS:
        value = getattr(config, name)
        if value and Path(value).is_absolute() and not Path(value).exists():
            assert "real-models.py" in text, \
                f"{path.name}: {name} {value} does not exist and the example does not say how to build it"
            stand_in = folder / name
            stand_in.mkdir()
            (stand_in / "config.json").write_text("{}")
            changes[name] = str(stand_in)
    data = Path(config.data)
    if data.is_absolute() and not data.exists():  # made by a prepare step the example names (ARC for SemAlign)
        assert "--prepare-only" in text or "offline-datasets" in text, \
            f"{path.name}: data {data} does not exist and the example does not say how to make it"
        stand_in = folder / data.name
        stand_in.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
        changes["data"] = str(stand_in)
    return replace(config, **changes)


@pytest.mark.parametrize("path", TRAIN_EXAMPLES, ids=[path.name for path in TRAIN_EXAMPLES])
def test_train_example_loads_and_its_command_gives_the_same_run(path, monkeypatch, tmp_path):
    command = first_line_command(path)
    config = load_config(path)
    check_config(with_stand_ins(path, config, tmp_path))  # source, target and data are set; steps or epochs > 0
    monkeypatch.chdir(REPO)  # the command runs from the repository root
    assert config_from_argv(command[2:]) == config  # what `llm-modules train` would run


def test_a_missing_model_folder_is_still_an_error_without_its_stand_in(tmp_path):
    """The stand-ins cover only what a fresh machine lacks; the check itself still refuses a missing folder."""
    config = load_config(REPO / "examples" / "gsm8k-real.yaml")
    missing = replace(config, source=str(tmp_path / "no-such-model"))
    with pytest.raises(LLMModulesError, match="not an existing folder"):
        check_config(missing)


def test_paper_recipe_has_the_papers_hyperparameters():
    config = load_config(REPO / "examples" / "paper-stratos.yaml")
    assert (config.source, config.target, config.data) == (
        "Qwen/Qwen2-1.5B", "EleutherAI/gpt-neo-125M", "bespokelabs/Bespoke-Stratos-17k")
    assert (config.lr_connector, config.lr_target, config.early_stopping_patience) == (1e-4, 5e-5, 5)
    assert (config.template, config.loss_on, config.target_init, config.append_eos) == ("plain", "all", "random", False)
    assert (config.epochs, config.batch_size, config.scheduler, config.warmup) == (15, 1, "constant", 0)
    assert (config.heads, config.adapter_dim, config.connector_layers, config.gate, config.leaky) == (
        8, 256, 2, "sigmoid", False)
    assert config.validation == 0.1 and config.max_grad_norm == 1.0 and config.early_stopping_threshold == 1e-4


def test_real_example_uses_the_built_model_folders_and_the_cache():
    config = load_config(REPO / "examples" / "gsm8k-real.yaml")
    real = Path.home() / ".cache" / "real-models"
    assert config.source == str(real / "qwen2.5-coder-0.5b-instruct")  # "~" expanded
    assert config.target == str(real / "smollm2-135m-instruct")
    assert (REPO / config.data).resolve() == (REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl").resolve()
    assert (config.limit, config.max_steps, config.cache, config.heads) == (200, 30, "auto", 9)
