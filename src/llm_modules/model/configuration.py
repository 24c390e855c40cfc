"""The options of a composition, in one place.

``ComposeOptions``: every option ``LLMModulesForCausalLM.compose()`` takes, typed, with ``Literal`` choices. The
run config of ``llm-modules train`` (``training/config.py``), the fact-world harness's method specs and the
trainer derive their option lists from it. ``LLMModulesConfig``: everything needed to rebuild a composed model.
"""

from __future__ import annotations

import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import PreTrainedConfig

from ..errors import LLMModulesError

Topology = Literal["bridge", "fusion"]
TargetInit = Literal["pretrained", "random"]
Gate = Literal["sigmoid", "tanh"]
Head = Literal["new", "source", "target", "source_mix", "source_pointer"]
Memory = Literal["prompt", "sequence"]
TrainTarget = Literal["none", "all", "lora"]
# what a mixture head's gate reads (model/heads.py): the target's state; also how sure each path is; or the state and
# how sure the target alone is (with "state", a gate that can decide before the source runs: model/deferral.py)
MixtureGate = Literal["state", "confidence", "target_confidence"]

TOPOLOGIES: tuple[str, ...] = typing.get_args(Topology)
TARGET_INITS: tuple[str, ...] = typing.get_args(TargetInit)
GATES: tuple[str, ...] = typing.get_args(Gate)
HEADS: tuple[str, ...] = typing.get_args(Head)
BRIDGE_HEADS = ("new", "source", "source_mix", "source_pointer")
FUSION_HEADS = ("target", "source_mix", "source_pointer")
MEMORIES: tuple[str, ...] = typing.get_args(Memory)
TRAIN_TARGETS: tuple[str, ...] = typing.get_args(TrainTarget)
MIXTURE_GATES: tuple[str, ...] = typing.get_args(MixtureGate)
TARGET_ONLY_GATES = ("state", "target_confidence")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise LLMModulesError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def _only(topology: Topology) -> dict:
    """Field metadata: the option applies to one topology only (the other ignores it)."""
    return {"topology": topology}


@dataclass
class ComposeOptions:
    """Every option of ``LLMModulesForCausalLM.compose()``; ``None`` takes the topology's default.

    Values are checked on construction: a ``Literal`` field names its valid values, a number or list field its type.
    ``TrainConfig`` (``llm-modules train``) inherits these fields, so each is a YAML key (flat, or under ``model:``)
    and a ``--key value`` option. Paper values (Kolomeitsev 2025) in brackets where they differ from ours.
    """

    topology: Topology = "bridge"  # bridge [paper] | fusion (the target keeps its tokenizer, embeddings and head)
    target_init: TargetInit = "pretrained"  # pretrained | random [paper release]
    leaky: bool = False  # the release's mask, through which earlier positions read later source states
    gate: Gate | None = None  # None: sigmoid for the bridge [paper], tanh at 0 for fusion
    head: Head | None = None  # None: new for the bridge [paper], target for fusion
    mixture_gate: MixtureGate = "state"  # a mixture head's gate reads the target's state, or also how sure each is
    # a mixture head's training loss adds this many nats x the gate's source weight at each position: the price of a
    # call to the source, so that a deferring model calls it only where it gains that much (model/loss.py)
    source_call_price: float = 0.0
    # a second gate, on the target alone, trained where the mixture's token differs from the target's own: deferral
    # decides on it, so the mixture gate may read the source too (mixture_gate: confidence; model/heads.py)
    call_gate: bool = False
    heads: int | None = None  # None: 8 for the bridge [paper], the target's attention heads for fusion
    adapter_dim: int = 256
    attention_dropout: float = 0.1
    source_layer: int = -1
    # --- bridge only
    connector_layers: int = field(default=2, metadata=_only("bridge"))
    intermediate_dim: int | None = field(default=None, metadata=_only("bridge"))  # None: (d_source + d_target) // 2
    # --- fusion only
    memory: Memory = field(default="prompt", metadata=_only("fusion"))  # prompt (read once) | sequence (reads along)
    # target layers with a block in front; None: every fusion_every-th; []: no block (only a mixture gate trains)
    fusion_layers: list[int] | None = field(default=None, metadata=_only("fusion"))
    fusion_every: int = field(default=4, metadata=_only("fusion"))
    # source hidden_states read by the blocks (one, or one per block); None: the last
    source_layers: list[int] | None = field(default=None, metadata=_only("fusion"))
    train_target: TrainTarget = field(default="none", metadata=_only("fusion"))  # none [CALM] | all | lora (PEFT)
    lora_rank: int = field(default=16, metadata=_only("fusion"))
    lora_alpha: int = field(default=32, metadata=_only("fusion"))
    lora_dropout: float = field(default=0.0, metadata=_only("fusion"))
    lora_target_modules: list[str] | None = field(default=None, metadata=_only("fusion"))
    # η of deferral decoding (model/deferral.py): the source runs only where the gate's source weight (or the call
    # gate's probability) >= η; None: at every position. Needs a mixture head, a gate that reads the target alone (or
    # call_gate) and fusion_layers: []
    defer_threshold: float | None = field(default=None, metadata=_only("fusion"))

    def __post_init__(self) -> None:
        hints = _option_hints()
        for name in compose_option_names():
            _check_value(name, getattr(self, name), hints[name])
        if self.head is not None:
            _check_choice("head", self.head, FUSION_HEADS if self.topology == "fusion" else BRIDGE_HEADS)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> ComposeOptions:
        """Options from ``{name: value}``; an unknown name is an error listing the valid ones, a bad value one naming
        what is valid (``where`` prefixes both)."""
        unknown = set(values) - set(compose_option_names())
        if unknown:
            raise LLMModulesError(f"{where}unknown option(s) {sorted(unknown)}; valid options: "
                                  f"{', '.join(compose_option_names())}")
        try:
            return cls(**values)
        except LLMModulesError as error:
            raise LLMModulesError(f"{where}{error}") from None

    def to_kwargs(self, only_topology: bool = False) -> dict[str, Any]:
        """The set options (not ``None``) as ``compose()`` keywords; ``only_topology``: only those the topology reads."""
        names = compose_option_names(self.topology if only_topology else None)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def compose_option_names(topology: str | None = None) -> tuple[str, ...]:
    """The fields of ``ComposeOptions`` (those a ``topology`` reads, when given), in declaration order."""
    return tuple(f.name for f in fields(ComposeOptions)
                 if topology is None or f.metadata.get("topology", topology) == topology)


def _option_hints() -> dict[str, Any]:
    return typing.get_type_hints(ComposeOptions)


def _check_value(name: str, value: Any, hint: Any) -> None:
    """``value`` fits the type ``hint`` of option ``name``, or an error naming what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        _check_choice(name, value, args)
        return
    if origin is list:
        try:
            if not isinstance(value, (list, tuple)):
                raise TypeError(value)
            for item in value:
                _check_value(name, item, args[0])
        except (TypeError, LLMModulesError):
            raise LLMModulesError(f"{name}={value!r} is not supported; expected a list of {args[0].__name__}") from None
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise LLMModulesError(f"{name}={value!r} is not supported; expected {hint.__name__}")


def check_can_defer(config) -> None:
    """The error a user can act on, where a composition cannot decide before the source runs."""
    threshold = config.defer_threshold
    if threshold is None:
        return
    if not 0.0 <= float(threshold) <= 1.0:
        raise LLMModulesError(f"defer_threshold must be in [0, 1] (the gate's source weight), got {threshold!r}")
    if config.topology != "fusion" or config.head not in ("source_mix", "source_pointer"):
        raise LLMModulesError("defer_threshold needs topology='fusion' with head='source_mix' or 'source_pointer': "
                              "deferral decides whether to mix in the source's next-token distribution")
    if config.mixture_gate not in TARGET_ONLY_GATES and not config.call_gate:
        raise LLMModulesError(f"defer_threshold needs a gate that reads only the target (mixture_gate='state' or "
                              f"'target_confidence', or call_gate=True beside any mixture gate); mixture_gate="
                              f"{config.mixture_gate!r} reads the source's distribution, which deferral must decide "
                              "without")
    if config.fusion_layers != []:
        raise LLMModulesError("defer_threshold: cross-attention blocks that read the source along the sequence need it "
                              "at every step, so deferral cannot skip it; use fusion_layers=[] (the mixture gate alone)")


def check_call_price(config) -> None:
    """``source_call_price`` prices a mixture gate's calls: >= 0, and only where there is such a gate; so does
    ``call_gate`` need one."""
    price = config.source_call_price or 0.0
    if price < 0:
        raise LLMModulesError(f"source_call_price must be >= 0 (nats per call to the source), got {price!r}")
    if price and config.head not in ("source_mix", "source_pointer"):
        raise LLMModulesError(f"source_call_price prices a mixture gate's calls to the source: it needs "
                              f"head='source_mix' or 'source_pointer', not head={config.head!r}")
    if config.call_gate and config.head not in ("source_mix", "source_pointer"):
        raise LLMModulesError(f"call_gate learns where a mixture head's token differs from the target's own: it needs "
                              f"head='source_mix' or 'source_pointer', not head={config.head!r}")
    if config.call_gate and config.topology != "fusion":
        raise LLMModulesError("call_gate decides deferral, which needs topology='fusion' (the bridge reads the source "
                              "before the target can say anything)")


class LLMModulesConfig(PreTrainedConfig):
    """Configuration of a source -> Enhanced Cross-Attention -> target composition.

    The source is referenced (``source_name_or_path`` + ``source_revision``), never copied; the
    target's architecture is stored in full (``target_config``) so that the trainable weights
    saved beside this config rebuild it without the target's original folder.

    Paper defaults (Kolomeitsev 2025): 2 connector layers, 8 heads, adapter width 256,
    intermediate width (d_source + d_target) // 2, sigmoid gate, new head over the source vocabulary.

    Fusion (``topology="fusion"``): blocks before target layers ``fusion_layers`` (default every
    ``fusion_every``-th from 0) read source layers ``source_layers`` (one for all, or one per block);
    ``memory`` is what the source reads (the prompt once, or the whole sequence along the way);
    ``train_target`` which target weights train (none, the default as in CALM; all; or LoRA adapters).
    """

    model_type = "llm_modules"

    topology: str = "bridge"
    source_name_or_path: str | None = None
    source_revision: str | None = None
    source_config: dict | None = None
    source_layer: int = -1
    source_dtype: str | None = None
    target_name_or_path: str | None = None
    target_config: dict | None = None
    target_init: str = "pretrained"
    leaky: bool = False
    gate: str = "sigmoid"
    connector_layers: int = 2
    heads: int = 8
    adapter_dim: int = 256
    intermediate_dim: int | None = None
    attention_dropout: float = 0.1
    head: str = "new"
    mixture_gate: str = "state"
    source_call_price: float = 0.0
    call_gate: bool = False
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    memory: str = "prompt"
    fusion_layers: list[int] | None = None
    fusion_every: int = 4
    source_layers: list[int] | None = None
    train_target: str = "none"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    shared_tokenizer: bool | None = None
    defer_threshold: float | None = None

    def __post_init__(self, **kwargs):
        _check_choice("topology", self.topology, TOPOLOGIES)
        _check_choice("target_init", self.target_init, TARGET_INITS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("head", self.head, FUSION_HEADS if self.topology == "fusion" else BRIDGE_HEADS)
        _check_choice("memory", self.memory, MEMORIES)
        _check_choice("train_target", self.train_target, TRAIN_TARGETS)
        _check_choice("mixture_gate", self.mixture_gate, MIXTURE_GATES)
        if self.topology == "fusion" and self.head in ("source_mix", "source_pointer"):
            if self.memory != "sequence":
                raise LLMModulesError(f"head={self.head!r} mixes in the source's next-token distribution at every "
                                      "position, so the source must read along: use memory='sequence'")
            if self.shared_tokenizer is False:
                raise LLMModulesError(f"head={self.head!r} reads the source's vocabulary, but the source and target "
                                      "tokenizers differ; use head='target' (or a same-tokenizer pair)")
        if self.topology == "fusion" and self.target_init == "random" and self.train_target != "all":
            raise LLMModulesError("a randomly initialised fusion target must train: use train_target='all' "
                                  "(or target_init='pretrained')")
        check_can_defer(self)
        check_call_price(self)
        for name in ("connector_layers", "heads", "adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "connector_layers" else 1):
                raise LLMModulesError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise LLMModulesError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        super().__post_init__(**kwargs)
