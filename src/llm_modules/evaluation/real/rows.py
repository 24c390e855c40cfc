"""The rows of the real table: what each one builds, trains and scores, on one budget.

===================  ============================================================================================
``target_alone``     the target as it is
``source_alone``     the frozen source (its letters from the source pass)
``sft``              every target weight, the letter's cross-entropy
``lora_sft``         LoRA (PEFT) on the target's attention and MLP projections, the same loss
``kd``               every target weight, KD on the letters from the source (Hinton, T=2, alpha 0.5)
``bridge``           the paper's graph made causal: source states -> connector -> the pretrained target -> a new
                     head over the source's vocabulary (lrs 1e-4 connector / 5e-5 target, the paper's)
``fusion_prompt``    fusion with prompt memory, the target frozen (CALM): gated cross-attention blocks read the
                     source's states of the question; only the blocks train
``semalign``         SemAlign v1 (the paper's recipe: LoRA r16, layer loss through semantic bases); one vocabulary
===================  ============================================================================================

Learning rates are fixed before any score was seen (the library's and the papers' defaults, listed in
``RowLearningRates``); no choice in this table was made on its held-out questions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LLMModulesError
from ...model.loading import load_causal_lm, load_config, load_tokenizer
from ...model.modeling import LLMModulesForCausalLM
from .scorers import BridgeScorer, FusionScorer, TargetScorer
from .source_pass import SourcePass

ROWS = ("target_alone", "source_alone", "sft", "lora_sft", "kd", "bridge", "fusion_prompt", "semalign")
UNTRAINED = ("target_alone", "source_alone")
READS_SOURCE = ("source_alone", "bridge", "fusion_prompt")  # rows that need the source at inference
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class RowLearningRates:
    full: float = 1e-5  # every weight of a pretrained target (SFT, KD): higher wrecks a small model in few steps
    lora: float = 3e-4  # LoRA adapters (SemAlign's paper value)
    connector: float = 1e-4  # the bridge's connector (the paper)
    bridge_target: float = 5e-5  # the bridge's target and new head (the paper)
    fusion: float = 1e-3  # fusion blocks from closed gates in one short epoch (examples/gsm8k-real.yaml's value)
    lora_rank: int = 16
    lora_alpha: int = 32


@dataclass
class BuiltRow:
    """A row ready to train and score: the model, its scorer and its parameter groups (name -> (params, lr))."""

    model: torch.nn.Module
    scorer: object
    groups: dict
    inference_params: int


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_row(row: str, target: str, source: SourcePass, source_path: str, source_params: int,
              rates: RowLearningRates, seed: int) -> BuiltRow:
    """The model of ``row`` (seeded), on CPU or the one GPU, float32 for everything that trains."""
    if row not in ROWS or row in ("source_alone", "semalign"):
        raise LLMModulesError(f"build_row: {row!r} is not a row built here; rows: {', '.join(ROWS)}")
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if row in ("target_alone", "sft", "lora_sft", "kd"):
        model = load_causal_lm("target", target, dtype="float32")
        scorer = TargetScorer(load_tokenizer(target, "target"))
        params = _count(model)
        if row == "lora_sft":
            from peft import LoraConfig, get_peft_model

            names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            config = LoraConfig(r=rates.lora_rank, lora_alpha=rates.lora_alpha, lora_dropout=0.0,
                                target_modules=[m for m in LORA_MODULES if m in names], task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        lr = rates.lora if row == "lora_sft" else rates.full
        return BuiltRow(model.to(device), scorer, {"target": (trainable, lr)}, params)
    source_config = load_config("source", source_path)
    if row == "bridge":
        model = LLMModulesForCausalLM.compose(None, target, source_config=source_config, tokenizer=source.tokenizer,
                                              topology="bridge", target_init="pretrained", head="new",
                                              heads=_heads(target))
        model.config.source_name_or_path = str(source_path)  # saved models name their source (from_pretrained loads it)
        scorer = BridgeScorer(source)
        groups = model.trainable_parameter_groups()
        return BuiltRow(model.to(device), scorer, {"connector": (groups["connector"], rates.connector),
                                                   "target": (groups["target"], rates.bridge_target)},
                        _count(model) + source_params)
    model = LLMModulesForCausalLM.compose(None, target, source_config=source_config, source_tokenizer=source.tokenizer,
                                          tokenizer=load_tokenizer(target, "target"), topology="fusion",
                                          memory="prompt", train_target="none", source_layers=[-1])
    model.config.source_name_or_path = str(source_path)
    groups = model.trainable_parameter_groups()
    return BuiltRow(model.to(device), FusionScorer(model.processor, source),
                    {"connector": (groups["connector"], rates.fusion), "target": (groups["target"], rates.full)},
                    _count(model) + source_params)


def _heads(target: str) -> int:
    """Cross-attention heads for the bridge: the target's own count (SmolLM2: 9 of 64; the paper's 8 divide 768)."""
    return int(load_config("target", target).get_text_config().num_attention_heads)
