"""``llm-modules train --method semalign``: SemAlign on transformers' ``Trainer``; the target then runs alone.

The run: data (the same pipeline as every ``train`` run) -> plan (vocabulary check, semantic map M
cached on disk, Gradient x Activation on the source, pairs; ``semalign_plan.json`` and
``semalign_pairs.png``) -> the source's taps at the paired layers through the source-state cache
(``training/cache.py``; a sub-folder per tap set, so one ``cache`` folder serves every method) ->
``SemAlignTrainer`` (the objective as its loss, the frontier schedule as a callback) -> the target
saved as an ordinary HF folder (LoRA merged, or a PEFT adapter with ``merge: false``), loadable with
``AutoModelForCausalLM.from_pretrained`` without this package.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed

from ...errors import LLMModulesError
from ...model.loading import load_causal_lm, load_config as load_model_config, load_tokenizer
from ..atomic import atomic_write_json
from ..cache import CachedStatesDataset, SourceStateCache
from ..checkpoints import SealedCheckpoints, resume_checkpoint
from ..config import TrainConfig, dump_config
from ..data import PaddingCollator
from ..nonfinite import NonFiniteLossGuard
from ..result import TrainResult, trainer_summary
from ..trainer import (StepTimer, _device, _stderr, cache_fields, cache_folder, check_config, load_tokenizers, plot_loss_curve,
                       run_data, training_arguments)
from .layers import LayerTaps, layer_count
from .models import plain_model, prepare_target, set_frontier, source_tap_states
from .objective import Frontier, Objective
from .options import SemAlignOptions, options_from_mapping
from .plan import AlignmentPlan, output_head, plan_alignment


class _SemAlignLoss(Trainer):
    """``Trainer`` whose loss is SemAlign's objective on the target's taps and the source's (cached or live)."""

    def __init__(self, *args, objective: Objective, frontier: Frontier, source: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.frontier, self.source = objective, frontier, source
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated token count itself
        self._loss_shifts_labels = True  # num_items_in_batch counts labels[:, 1:], as the output loss does
        self.model_accepts_loss_kwargs = False
        self.parts: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        states = inputs.get("source_states")
        if states is None and self.objective.taps:
            if self.source is None:
                raise LLMModulesError("no cached source states and no source model to compute them")
            states = source_tap_states(self.source, ids, mask, self.objective.taps)
        layers = [p.target for p in self.objective.pairs] if self.objective.uses_layers else []
        with LayerTaps(model, layers, self.objective.interface) as taps:
            output = model(input_ids=ids, attention_mask=mask)
        training = model.training
        active = self.frontier.active(self.state.global_step, self.state.max_steps) if training else None
        loss, self.parts = self.objective(
            taps.values, output.logits, labels, mask, states, active,
            num_items=num_items_in_batch if training else None,
            layer_scale=1.0 / self.current_gradient_accumulation_steps if training else 1.0,
        )
        return (loss, output) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the objective only (no [N, T, V] logits gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # the objective's parts of the last micro-batch, next to the Trainer's loss
            logs = {**logs, **{f"semalign_{k}": round(v, 5) for k, v in self.parts.items()}}
        super().log(logs, *args, **kwargs)


class SemAlignTrainer(NonFiniteLossGuard, SealedCheckpoints, _SemAlignLoss):
    """SemAlign's ``Trainer`` with the crash safety of every run: sealed (crash-safe) checkpoints and a policy for
    NaN/inf losses (``nonfinite_policy``: stop | skip; nonfinite.py)."""

    def __init__(self, *args, nonfinite_policy: str = "stop", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nonfinite_policy = nonfinite_policy


class FrontierCallback(TrainerCallback):
    """Before each optimizer step: only the frontier's current target layer keeps its gradients (v2)."""

    def __init__(self, frontier: Frontier, by_layer: dict[int, list[nn.Parameter]]) -> None:
        self.frontier, self.by_layer = frontier, by_layer

    def on_step_begin(self, args, state, control, **kwargs):
        set_frontier(self.by_layer, self.frontier.active(state.global_step, state.max_steps))


def _taps_cache(config: TrainConfig, tokenizers, taps: list[str], rows: list[list[int]], source_fn) -> tuple[SourceStateCache, dict]:
    """The cache of this tap set (``CACHE/taps-<hash>``), completed with the rows it lacks."""
    folder = cache_folder(config)
    assert folder is not None
    folder = folder / ("taps-" + hashlib.sha256(json.dumps(taps).encode()).hexdigest()[:12])
    fields = replace(cache_fields(config, tokenizers), source_layer=list(taps), layout="semalign-taps")
    cache = SourceStateCache.open(folder, fields)
    cache.consolidate(log=_stderr)  # what a killed build left behind
    missing = cache.missing(rows)
    stats = {"folder": str(folder), "rows": len(rows), "computed": len(missing), "seconds": 0.0, "taps": taps}
    if missing:
        started = time.perf_counter()
        _stderr(f"source-state cache: computing taps {taps} for {len(missing)} of {len(rows)} rows into {folder}")
        cache.build([rows[i] for i in missing], lambda ids, mask: source_tap_states(source_fn(), ids, mask, taps),
                    batch_size=config.cache_batch_size, device=_device(config), progress=config.progress)
        cache.consolidate(log=_stderr)  # the new shards join the manifest
        stats["seconds"] = round(time.perf_counter() - started, 2)
    stats["bytes"] = cache.size_bytes()
    return cache, stats


def save_target(model: nn.Module, tokenizer, output: Path, options: SemAlignOptions) -> nn.Module:
    """The trained target as an ordinary HF folder (merged LoRA, or a PEFT adapter with merge: false)."""
    final = plain_model(model, options.merge)
    final.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return final


def train_semalign(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """One SemAlign run; files in ``config.output``: the target model, ``semalign_plan.json``,
    ``semalign_pairs.png``, ``train_results.json``, ``loss_curve.png``, ``data_report.json``, checkpoints."""
    check_config(config)
    options = options_from_mapping(config.semalign)
    device = _device(config)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    dump_config(config, output / "train_config.yaml")
    tokenizers = load_tokenizers(config)
    tokenizer = tokenizers.main  # the source's (SemAlign needs one vocabulary)
    target_tokenizer = load_tokenizer(config.target, "target")
    data = run_data(config, tokenizer, output)
    train_rows = [dict(r) for r in data.train]

    source_model: list[nn.Module] = []

    def source() -> nn.Module:  # loaded once, only if something needs it
        if not source_model:
            loaded = load_causal_lm("source", config.source, config.source_revision, config.source_dtype)
            source_model.append(loaded.to(device).eval().requires_grad_(False))
        return source_model[0]

    target = load_causal_lm("target", config.target, dtype="float32").to(device)
    attribution = not options.critical_layers and options.layer_loss != "none"
    plan = _plan(config, options, source, attribution, target, tokenizer, target_tokenizer, train_rows, device)
    plan.write(output)
    _stderr(f"semalign: pairs (target <- source) {[(p.target, p.source_a, p.source_b, round(p.weight, 3)) for p in plan.pairs]}")

    train_set, eval_set, cache_stats = data.train, data.validation, None
    if plan.taps and cache_folder(config) is not None:
        rows = [list(r) for r in data.train["input_ids"]] + (
            [list(r) for r in data.validation["input_ids"]] if data.validation is not None else [])
        cache, cache_stats = _taps_cache(config, tokenizers, plan.taps, rows, source)
        train_set = CachedStatesDataset(train_set, cache)
        eval_set = CachedStatesDataset(eval_set, cache) if eval_set is not None else None
    live_source = source() if plan.taps and cache_stats is None else None
    source_loaded = bool(source_model)
    if source_model and live_source is None:
        source_model.clear()  # the attribution is done and the cache holds the rest: free the source's memory

    resume = resume_checkpoint(config.resume, output, log=_stderr)
    set_seed(config.seed)  # LoRA's initialisation depends only on the seed
    model, by_layer = prepare_target(target, options, plan.pairs)
    objective = Objective(plan.pairs, plan.semantic_map, plan.taps, options.interface, options.layer_loss,
                          options.output_loss, options.layer_weight, options.output_weight, options.temperature,
                          options.alpha, plan.source_head)
    frontier = Frontier(plan.pairs, bool(options.frontier) and objective.uses_layers)
    timer = StepTimer()
    trainer = SemAlignTrainer(
        model=model, args=training_arguments(config, eval_set is not None, device), train_dataset=train_set,
        eval_dataset=eval_set, data_collator=PaddingCollator(tokenizer.pad_token_id, keep_rows=True),
        processing_class=target_tokenizer, callbacks=[timer, FrontierCallback(frontier, by_layer), *(callbacks or [])],
        objective=objective, frontier=frontier, source=live_source, nonfinite_policy=config.on_nonfinite_loss,
    )
    trainable = sum(p.numel() for ps in by_layer.values() for p in ps)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    set_frontier(by_layer, None)
    metrics = dict(outcome.metrics)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    final = save_target(model, target_tokenizer, output, options)
    results = {
        "method": "semalign",
        "options": options.to_dict(),
        "metrics": metrics,
        **trainer_summary(trainer, timer.times, config.on_nonfinite_loss),
        "trainable_parameters": trainable,
        "inference_parameters": sum(p.numel() for p in final.parameters()),
        "plan": plan.report(),
        "data": data.report.to_dict(),
        "data_fingerprint": data.fingerprint,
        "cache": cache_stats,
        "source_loaded": source_loaded,
        "device": device,
        "saved_as": "adapter" if hasattr(final, "peft_config") else "model",
    }
    atomic_write_json(output / "train_results.json", results)
    plot_loss_curve(trainer.state.log_history, output / "loss_curve.png")
    return TrainResult.of_trainer(trainer, output, metrics, timer.times, final, seconds, plan=plan)


def _plan(config, options, source, attribution, target, tokenizer, target_tokenizer, rows, device) -> AlignmentPlan:
    source_config = load_model_config("source", config.source, config.source_revision).get_text_config()
    return plan_alignment(
        source() if attribution else None, int(source_config.num_hidden_layers), output_head(config.source),
        output_head(target), layer_count(target), tokenizer, target_tokenizer, rows, options,
        tokenizer.pad_token_id, device,
    )
