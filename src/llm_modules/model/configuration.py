"""``LLMModulesConfig``: everything needed to rebuild a composed model, with clear validation."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..errors import LLMModulesError

TOPOLOGIES = ("bridge", "fusion")
TARGET_INITS = ("pretrained", "random")
GATES = ("sigmoid", "tanh")
BRIDGE_HEADS = ("new", "source", "source_mix", "source_pointer")
FUSION_HEADS = ("target", "source_mix", "source_pointer")
HEADS = tuple(dict.fromkeys(BRIDGE_HEADS + FUSION_HEADS))
MEMORIES = ("prompt", "sequence")
TRAIN_TARGETS = ("none", "all", "lora")
MIXTURE_GATES = ("state", "confidence")  # what a mixture head's gate reads (model/heads.py)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise LLMModulesError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


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
        for name in ("connector_layers", "heads", "adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "connector_layers" else 1):
                raise LLMModulesError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise LLMModulesError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        super().__post_init__(**kwargs)
