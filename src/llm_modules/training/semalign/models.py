"""The two models' sides of SemAlign: the frozen source's taps, and what of the target trains.

Source taps are named ``"{interface}:{layer}"`` (1-based) plus ``"final"`` (the source's last hidden
state after its final norm, from which its head gives the logits that the KL/KD output losses read).
They are what the source-state cache stores for a SemAlign run: [T, n_taps, d_src] per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import LLMModulesError
from ...model.masks import positions_from_padding
from .layers import LayerPair, LayerTaps, decoder_layers
from .options import PAPER_LORA_MODULES, SemAlignOptions

# Role names of the paper's LoRA targets (up, down, v, o) in architectures that spell them otherwise.
LORA_ALTERNATIVES = {"gpt_neo": ["c_fc", "c_proj", "v_proj", "out_proj"], "gpt2": ["c_fc", "c_proj"]}


def tap_names(pairs: Sequence[LayerPair], interface: str, final: bool) -> list[str]:
    """The source taps the pairs read (each layer once, by depth), plus ``final`` when the output loss needs it."""
    layers = sorted({layer for pair in pairs for layer in pair.source_layers()})
    return [f"{interface}:{layer}" for layer in layers] + (["final"] if final else [])


@torch.no_grad()
def source_tap_states(source: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      taps: Sequence[str]) -> torch.Tensor:
    """The frozen source's taps for a right-padded batch: [B, T] -> [B, T, n_taps, d_src]."""
    interfaces = {name.split(":")[0] for name in taps if name != "final"}
    if len(interfaces) > 1:
        raise LLMModulesError(f"taps {list(taps)} mix interfaces; one run reads one interface")
    layers = [int(name.split(":")[1]) for name in taps if name != "final"]
    with LayerTaps(source, layers, next(iter(interfaces), "contribution")) as hooks:
        output = source.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=positions_from_padding(attention_mask))
    columns = [output.last_hidden_state if name == "final" else hooks.values[int(name.split(":")[1])] for name in taps]
    return torch.stack(columns, dim=2)


def _lora_modules(model: nn.Module, wanted: list[str]) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if any(name in names for name in wanted):
        return wanted
    if wanted == PAPER_LORA_MODULES:
        alternative = LORA_ALTERNATIVES.get(getattr(model.config, "model_type", ""))
        if alternative and any(name in names for name in alternative):
            return alternative
    raise LLMModulesError(f"none of the LoRA modules {wanted} exist in {type(model).__name__}; "
                          "set semalign.lora_modules to its projection names")


def prepare_target(model: nn.Module, options: SemAlignOptions,
                   pairs: Sequence[LayerPair]) -> tuple[nn.Module, dict[int, list[nn.Parameter]]]:
    """The target as it trains, and its trainable parameters per target layer (1-based; 0 = outside layers).

    ``lora``: PEFT LoRA (r, alpha, dropout, modules from the options) on every layer, base frozen;
    ``layers``: only the paired target layers' own weights; ``full``: every weight.
    """
    if options.mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=_lora_modules(model, list(options.lora_modules)), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    else:
        model.requires_grad_(options.mode == "full")
        if options.mode == "layers":
            _, blocks = decoder_layers(model)
            for pair in pairs:
                blocks[pair.target - 1].requires_grad_(True)
    prefix, blocks = decoder_layers(model)
    by_layer: dict[int, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = 0
        if name.startswith(prefix + "."):
            layer = int(name[len(prefix) + 1:].split(".", 1)[0]) + 1
        by_layer.setdefault(layer, []).append(parameter)
    if not by_layer:
        raise LLMModulesError("nothing of the target trains (no pairs in mode: layers?)")
    return model, by_layer


def set_frontier(by_layer: dict[int, list[nn.Parameter]], active: Sequence[int] | None) -> None:
    """Frontier schedule: only the active target layers' parameters get gradients (None: all of them)."""
    for layer, parameters in by_layer.items():
        on = active is None or layer in active
        for parameter in parameters:
            parameter.requires_grad_(on)


def plain_model(model: nn.Module, merge: bool = True) -> nn.Module:
    """A PEFT model merged into an ordinary transformers model (``merge``), else returned as is."""
    if merge and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
