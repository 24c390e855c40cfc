"""The typed run configuration of ``llm-modules train``: a dataclass, loadable from YAML, with ``--key value`` overrides.

Every field can be set in the YAML file or on the command line (``--max-length 1024`` or
``--max_length=1024``); the command line wins. A list option takes ``[]`` (empty), ``[0, 4]`` or ``0,4``.
Unknown keys are errors that suggest the closest valid key. Values are converted to the field's type (YAML reads ``1e-4`` as a string; we do not).
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import LLMModulesError
from ..model.configuration import ComposeOptions, compose_option_names
from .cache import DTYPES
from .data import FORMATS, LOCAL_SUFFIXES, LOSS_ON, OVERLENGTH, TEMPLATES
from .nonfinite import POLICIES


@dataclass
class TrainConfig(ComposeOptions):
    """One training run. Paper values (Kolomeitsev 2025) in brackets where they differ from ours.

    The composed model's options are the fields of ``ComposeOptions`` (``model/configuration.py``), inherited: one
    list for ``compose()``, this config and the fact-world harness. Values are checked on construction.
    """

    # --- which method trains: llm_modules (the composed model) | semalign (the target alone, training/semalign/)
    method: str = "llm_modules"
    semalign: dict = field(default_factory=dict)  # SemAlign's options (training/semalign/options.py); --semalign.KEY VALUE
    # --- what to compose and on what
    source: str | None = None  # hub id or folder of the frozen source model
    target: str | None = None  # hub id or folder of the target model
    data: str | None = None  # .jsonl/.json/.parquet file or hub dataset name
    output: str = "runs/llm-modules"
    tokenizer: str | None = None  # default: the source's (bridge) or the target's (fusion)
    source_revision: str | None = None
    dataset_split: str = "train"  # hub datasets
    validation_data: str | None = None  # a separate validation file (else a split of `data`)
    validation: float = 0.05  # fraction (< 1) or number of rows held out [paper: last 10%]
    split_seed: int = 0
    limit: int | None = None  # use the first N usable rows
    # --- rendering
    format: str = "auto"  # auto | sharegpt | messages | prompt_completion | gsm8k | text
    template: str = "chat"  # chat (the tokenizer's) | plain [paper] | raw (the turns' contents as they are)
    loss_on: str = "assistant"  # assistant | all [paper]
    system_prompt: str | None = None  # added to rows without a system message
    append_eos: bool = True  # plain template: end the last assistant turn with EOS [paper: false]
    max_length: int = 2048  # [paper: 4096]
    overlength: str = "drop"  # drop [paper] | truncate
    on_bad_row: str = "error"  # error | skip (counted and reported)
    # --- the composed model: every ComposeOptions field (model/configuration.py), inherited; in YAML flat or under
    # `model:`, on the command line --key value or --model.key value
    source_dtype: str | None = None  # e.g. bfloat16
    # --- source-state cache
    cache: str | None = None  # folder; "auto" = OUTPUT/source-cache; null = run the source every step
    cache_dtype: str = "float16"  # float16 | bfloat16 | float32
    cache_batch_size: int = 8
    cache_shard_mb: float = 1024.0  # a shard is written (atomically) once this many MiB of states are pending
    rebuild_cache: bool = False
    # --- optimisation
    epochs: float = 1.0  # [paper: 15]
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr_connector: float = 1e-4
    lr_target: float = 5e-5
    lr_mixture: float | None = None  # fusion's mixture gate (head: source_mix | source_pointer); None: lr_connector
    weight_decay: float = 0.01
    warmup: float = 0.0  # steps (>= 1) or a fraction of all steps (< 1) [paper: 0]
    scheduler: str = "linear"  # any transformers lr_scheduler_type [paper: constant]
    max_grad_norm: float = 1.0
    optim: str = "auto"  # any transformers optim name; auto = adamw_torch_fused on GPU, adamw_torch on CPU
    precision: str = "auto"  # auto (bf16 > fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    seed: int = 42
    on_nonfinite_loss: str = "stop"  # stop (name step, rows, last good checkpoint) | skip (counted in train_results.json)
    # --- evaluation, checkpoints, logging
    eval_steps: int | None = None  # None: once per epoch
    save_steps: int | None = None  # None: once per epoch (= eval_steps when early stopping)
    save_total_limit: int | None = 2
    early_stopping_patience: int | None = None  # [paper: 5]
    early_stopping_threshold: float = 0.0  # [paper: 1e-4]
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # or ["none"]
    resume: str | None = None  # checkpoint folder, or "auto" = latest checkpoint in OUTPUT
    progress: bool = True
    dataloader_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    trust_remote_code: bool = False  # run Python code shipped with a hub model (off unless asked for)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise LLMModulesError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        # "~/..." works in YAML files and quoted arguments too (hub ids never start with "~").
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))

    def to_dict(self) -> dict:
        return asdict(self)

    def compose_options(self) -> ComposeOptions:
        """The model options of this run, as ``compose()`` takes them."""
        return ComposeOptions(**{name: getattr(self, name) for name in compose_option_names()})


METHODS = ("llm_modules", "semalign")
PATH_FIELDS = ("source", "target", "data", "output", "tokenizer", "validation_data", "cache", "resume")


ALIASES = {"lr": ("lr_connector", "lr_target"),  # --lr sets both learning rates
           "mixture_lr": ("lr_mixture",)}  # the fact-world harness's name (Budget.mixture_lr)
MODEL_SECTION = "model"  # YAML `model: {head: source_mix, ...}` / --model.head source_mix: ComposeOptions fields


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def convert_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` (from YAML or the command line) as the type ``hint`` of field ``name``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return convert_value(name, value, options[0])
    if origin is typing.Literal:  # the choice itself is checked by ComposeOptions, which names the valid values
        return convert_value(name, value, type(typing.get_args(hint)[0]))
    if origin is list:
        return [convert_value(name, v, typing.get_args(hint)[0]) for v in _list_items(name, value)]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", str(hint))
        raise LLMModulesError(f"option {name}: expected {kind}, got {value!r}") from None
    return value


def _list_items(name: str, value: Any) -> list:
    """The items of a list option: a YAML list, or text from a command line: ``[]`` (none), ``[0, 4]``, ``0,4``,
    YAML block text (``- 0``), or one value."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        return [value]
    text = value.strip()
    if text.startswith(("[", "- ")):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError:
            items = None
        if not isinstance(items, list):
            raise LLMModulesError(f"option {name}: {value!r} is not a list; write [] (none), [0, 4] or 0,4") from None
        return items
    return [item.strip() for item in text.split(",") if item.strip()]


def _unknown(key: str) -> LLMModulesError:
    names = [f.name for f in fields(TrainConfig)] + list(ALIASES) + ["config", MODEL_SECTION]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid options: {', '.join(sorted(names))}"
    return LLMModulesError(f"unknown option {key!r}{hint}")


def _flow_mapping(value: Any) -> Any:
    """Text from a command line read as a YAML flow mapping (``'{mode: lora}'``, ``''`` = {}); other values as given."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            pass
    return value


def _model_section(value: Any, where: str) -> dict[str, Any]:
    """The ``model:`` mapping (YAML, or a flow mapping given on the command line) with its keys checked."""
    value = _flow_mapping(value)
    if not isinstance(value, dict):
        raise LLMModulesError(f"{where}option {MODEL_SECTION}: expected a mapping of model option: value "
                              f"(keys: {', '.join(compose_option_names())}), got {value!r}")
    section = {str(k).replace("-", "_"): v for k, v in value.items()}
    unknown = [k for k in section if k not in compose_option_names()]
    if unknown:
        close = difflib.get_close_matches(unknown[0], compose_option_names(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(compose_option_names())}"
        raise LLMModulesError(f"{where}unknown model option {MODEL_SECTION}.{unknown[0]}; {hint}")
    return section


def config_from_mapping(values: dict[str, Any], base: TrainConfig | None = None, where: str = "") -> TrainConfig:
    """A TrainConfig from ``base`` (default: defaults) with ``values`` applied; keys may use dashes.

    The model's options may be flat (``head: source_mix``) or under ``model:`` (``model: {head: source_mix}``, or
    ``--model.head source_mix``); one given both ways with two values is an error.
    """
    hints = _hints()
    from_aliases: dict[str, Any] = {}
    updates: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        section, _, option = key.partition(".")
        if key == MODEL_SECTION or (option and section == MODEL_SECTION):
            given = _model_section(value, where) if key == MODEL_SECTION else _model_section({option: value}, where)
            nested.update({k: convert_value(f"{MODEL_SECTION}.{k}", v, hints[k]) for k, v in given.items()})
            continue
        if option and typing.get_origin(hints.get(section)) is None and hints.get(section) is dict:
            # --semalign.mode lora: one option of a mapping field, kept as text (the section converts it)
            base_section = updates.get(section, dict(getattr(base, section)) if base else {})
            updates[section] = {**base_section, option: value}
            continue
        if key in ALIASES:
            for target in ALIASES[key]:
                from_aliases[target] = convert_value(key, value, hints[target])
        elif key in hints and hints[key] is dict:
            value = _flow_mapping(value)  # --semalign='{mode: lora, pairs: 2}' from a command line
            if not isinstance(value, dict):
                raise LLMModulesError(f"{where}option {key}: expected a mapping of option: value, got {value!r}")
            updates[key] = dict(value)
        elif key in hints:
            updates[key] = convert_value(key, value, hints[key])
        else:
            raise LLMModulesError(f"{where}{_unknown(key)}")
    for key, value in nested.items():
        if key in updates and updates[key] != value:
            raise LLMModulesError(f"{where}option {key} is given twice, as {key}: {updates[key]!r} and as "
                                  f"{MODEL_SECTION}.{key}: {value!r}; give it once")
        updates[key] = value
    # An explicit field beats an alias (--lr 1e-3 --lr-target 5e-4 sets the target's to 5e-4).
    try:
        return TrainConfig(**{**asdict(base or TrainConfig()), **from_aliases, **updates})
    except LLMModulesError as error:
        raise LLMModulesError(f"{where}{error}") from None


def read_yaml_mapping(path: str | Path) -> dict:
    """The option: value mapping of a YAML config file, or an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LLMModulesError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise LLMModulesError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise LLMModulesError(f"{path} must hold a mapping of option: value")
    return values


def load_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a YAML file (unknown keys are errors naming the file)."""
    return config_from_mapping(read_yaml_mapping(path), where=f"{path}: ")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` (true) pairs -> {key: value} (strings)."""
    values: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise LLMModulesError(f"unexpected argument {token!r}; options look like --key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            index += 1
        elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            value = argv[index + 1]
            index += 2
        else:
            value = "true"
            index += 1
        values[key.replace("-", "_")] = value
    return values


def config_from_argv(argv: list[str]) -> TrainConfig:
    """``[--config run.yaml] [--key value ...]`` -> TrainConfig (command line over YAML over defaults)."""
    values = parse_overrides(argv)
    config_path = values.pop("config", None)
    base = load_config(config_path) if config_path else TrainConfig()
    return config_from_mapping(values, base)


def dump_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------- validation
CHOICES = {
    "format": ("auto", *FORMATS),
    "template": TEMPLATES,
    "loss_on": LOSS_ON,
    "overlength": OVERLENGTH,
    "on_bad_row": ("error", "skip"),
    "on_nonfinite_loss": POLICIES,
    "cache_dtype": tuple(DTYPES),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}
AT_LEAST = {"batch_size": 1, "grad_accum": 1, "max_length": 2, "cache_batch_size": 1, "logging_steps": 1,
            "epochs": 0, "validation": 0, "lr_connector": 0, "lr_target": 0, "weight_decay": 0, "warmup": 0,
            "dataloader_workers": 0, "save_steps": 1, "eval_steps": 1, "save_total_limit": 1, "limit": 1,
            "early_stopping_patience": 1, "connector_layers": 1, "heads": 1, "adapter_dim": 1}
REVISION = re.compile(r"[A-Za-z0-9][\w.\-/]*")
SPLIT = re.compile(r"[A-Za-z0-9_][\w.\-\[\]:%+]*")
NO_CACHE = (None, "", "none", "off")


def _is_hub_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or Path(value).exists()


def _model_problem(name: str, value: str) -> str | None:
    """A model/tokenizer reference must be an existing folder holding config.json or a valid hub id."""
    path = Path(value).expanduser()
    if path.exists() or _looks_like_path(value):
        if not path.is_dir():
            return f"{name}: {value} is not an existing folder (give a model folder or a hub id owner/name)"
        wanted = ("tokenizer.json", "tokenizer_config.json") if name == "tokenizer" else ("config.json",)
        if not any((path / w).is_file() for w in wanted):
            return f"{name}: the folder {value} holds no {' or '.join(wanted)}; is it a saved model?"
        return None
    if not _is_hub_id(value):
        return f"{name}: {value!r} is neither an existing folder nor a valid hub id (owner/name)"
    return None


def _data_problem(name: str, value: str) -> str | None:
    path = Path(value).expanduser()
    if path.is_dir():
        return f"{name}: {value} is a folder; give one .jsonl/.json/.parquet file or a hub dataset name owner/name"
    if path.is_file():
        return None if path.suffix.lower() in LOCAL_SUFFIXES else \
            f"{name}: {value} has an unsupported type {path.suffix!r}; use .jsonl, .json or .parquet"
    if path.suffix.lower() in LOCAL_SUFFIXES or _looks_like_path(value) or value.count("/") != 1 or not _is_hub_id(value):
        return f"{name}: {value} does not exist (give a .jsonl/.json/.parquet file or a hub dataset name owner/name)"
    return None


def _folder_problem(name: str, value: str, models: dict[str, Path]) -> str | None:
    """An output/cache folder must be a folder (or creatable) and must not be a model folder it would overwrite."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        return f"{name}: {value} exists and is not a folder"
    for role, folder in models.items():
        if path.resolve() == folder:
            return f"{name}: {value} is the {role} model's folder; writing there would overwrite it. Give another folder"
    parent = next((p for p in [path.resolve(), *path.resolve().parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        return f"{name}: {parent} is not writable"
    return None


def validate(config: TrainConfig) -> None:
    """Check the paths, names and values of a run config before anything runs; every problem in one error."""
    problems = [f"missing option --{name} (or set it in the YAML file given with --config)"
                for name in ("source", "target", "data") if not getattr(config, name)]
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            problems.append(f"{name}: {getattr(config, name)!r} is not one of {', '.join(choices)}")
    for name, least in AT_LEAST.items():
        value = getattr(config, name)
        if value is not None and value < least:
            problems.append(f"{name}: must be >= {least}, got {value}")
    if config.cache_shard_mb <= 0:
        problems.append(f"cache_shard_mb: must be > 0, got {config.cache_shard_mb}")
    if config.max_steps <= 0 and config.epochs <= 0:
        problems.append("set epochs > 0 or max_steps > 0")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device):
        problems.append(f"device: {config.device!r} is not auto, cpu, cuda or cuda:N")
    for name in ("source", "target", "tokenizer"):
        value = getattr(config, name)
        if value and (problem := _model_problem(name, str(value))):
            problems.append(problem)
    for name in ("data", "validation_data"):
        value = getattr(config, name)
        if value and (problem := _data_problem(name, str(value))):
            problems.append(problem)
    if config.source_revision is not None and (not REVISION.fullmatch(config.source_revision) or ".." in config.source_revision):
        problems.append(f"source_revision: {config.source_revision!r} is not a branch, tag or commit name")
    if not SPLIT.fullmatch(config.dataset_split):
        problems.append(f"dataset_split: {config.dataset_split!r} is not a split name such as train or train[:10%]")
    models = {name: Path(str(getattr(config, name))).expanduser().resolve() for name in ("source", "target", "tokenizer")
              if getattr(config, name) and Path(str(getattr(config, name))).expanduser().is_dir()}
    if problem := _folder_problem("output", config.output, models):
        problems.append(problem)
    if config.cache not in NO_CACHE and config.cache != "auto":
        if problem := _folder_problem("cache", config.cache, models):
            problems.append(problem)
        elif Path(config.cache).expanduser().resolve() == Path(config.output).expanduser().resolve():
            problems.append("cache: is the output folder; use cache: auto (OUTPUT/source-cache) or another folder")
    if config.resume not in (None, "auto") and not Path(config.resume).expanduser().is_dir():
        problems.append(f"resume: {config.resume} is not a checkpoint folder (or use resume: auto)")
    if problems:
        raise LLMModulesError(f"{len(problems)} problem(s) in the run config: " + "; ".join(problems))
