"""SemAlign's options: the ``semalign:`` section of a run config (``--semalign.KEY VALUE`` on the command line).

Paper values (arXiv:2510.24208v1, appendix A.2 and Tables 4/5) where it gives them: LoRA r=16 on
up/down/v/o projections, lr 3e-4, alignment data of 32-128 rows. ``version`` picks the objective's
defaults (v1: cosine layer loss + cosine-to-one-hot output loss; v2: centred-Gram layer loss + KL to
the source's output, frontier schedule); any of them can be set on its own.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass, field

from ...errors import LLMModulesError
from ..config import convert_value
from .layers import INTERFACES
from .objective import LAYER_LOSSES, OUTPUT_LOSSES

MODES = ("lora", "layers", "full")
PAPER_LORA_MODULES = ["up_proj", "down_proj", "v_proj", "o_proj"]
VERSION_DEFAULTS = {
    "v1": {"layer_loss": "cosine", "output_loss": "cosine", "frontier": False},
    "v2": {"layer_loss": "cka", "output_loss": "kl", "frontier": True},
}


@dataclass
class SemAlignOptions:
    version: str = "v1"  # v1 | v2 (defaults of the three below)
    layer_loss: str | None = None  # cosine | cka | none
    output_loss: str | None = None  # cosine | ce | kl | kd | none
    frontier: bool | None = None  # shallow-to-deep: one pair trains per phase
    layer_weight: float = 1.0
    output_weight: float = 1.0
    temperature: float = 2.0  # output_loss kd
    alpha: float = 0.5  # output_loss kd: weight of the KL term
    # --- what trains
    mode: str = "lora"  # lora (paper appendix) | layers (only the paired target layers, paper §3) | full
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_modules: list[str] = field(default_factory=lambda: list(PAPER_LORA_MODULES))
    merge: bool = True  # lora: save the merged model (else a PEFT adapter folder)
    # --- pairing
    pairs: int = 2  # how many target layers are aligned (the paper leaves it open)
    critical_layers: list[int] = field(default_factory=list)  # source layers ℓ* to pair; empty = by attribution
    interface: str = "contribution"  # contribution | mlp | output (layers.py)
    attribution_rows: int = 32  # transfer rows for Gradient x Activation [paper Table 4: 32-128]
    attribution_batch_size: int = 4
    attribution_reduce: str = "abs"  # abs | signed
    # --- semantic bases
    shared_tokens_only: bool = False  # different vocabularies: align over the tokens both hold
    map_cache: str | None = "auto"  # folder for M (auto: ~/.cache/llm-modules/semantic-maps); null: never stored

    def __post_init__(self) -> None:
        if self.version not in VERSION_DEFAULTS:
            raise LLMModulesError(f"semalign.version {self.version!r} is not one of {', '.join(VERSION_DEFAULTS)}")
        for name, value in VERSION_DEFAULTS[self.version].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, value, choices in (("mode", self.mode, MODES), ("layer_loss", self.layer_loss, LAYER_LOSSES),
                                     ("output_loss", self.output_loss, OUTPUT_LOSSES),
                                     ("interface", self.interface, INTERFACES),
                                     ("attribution_reduce", self.attribution_reduce, ("abs", "signed"))):
            if value not in choices:
                raise LLMModulesError(f"semalign.{name} {value!r} is not one of {', '.join(choices)}")
        if self.pairs < 1 and self.layer_loss != "none":
            raise LLMModulesError("semalign.pairs must be >= 1 (or layer_loss: none)")

    def to_dict(self) -> dict:
        return asdict(self)


def options_from_mapping(values: dict | None, where: str = "semalign") -> SemAlignOptions:
    """SemAlignOptions from a mapping (YAML section or ``--semalign.KEY`` strings); unknown keys are errors."""
    hints = typing.get_type_hints(SemAlignOptions)
    values = {str(k).replace("-", "_"): v for k, v in (values or {}).items()}
    for key in values.keys() - hints.keys():
        close = difflib.get_close_matches(key, list(hints), n=3)
        raise LLMModulesError(f"{where}: unknown option {key!r}; "
                              + (f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(hints)}"))

    def convert(key: str, value):
        if typing.get_origin(hints[key]) is list and typing.get_args(hints[key])[0] is int:
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
            return [convert_value(f"{where}.{key}", item, int) for item in items]
        return convert_value(f"{where}.{key}", value, hints[key])

    return SemAlignOptions(**{key: convert(key, value) for key, value in values.items()})
