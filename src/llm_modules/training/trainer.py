"""``llm-modules train``: the composed model on transformers' ``Trainer`` (accelerate underneath).

What the Trainer gives us as is: warmup + schedule, gradient accumulation, clipping, bf16/fp16,
gradient checkpointing, evaluation, checkpoints with optimizer/scheduler/RNG state and exact
``resume_from_checkpoint``, ``report_to`` (tensorboard...), progress bars, early stopping.
What we add: named parameter groups (connector vs target, paper 1e-4 / 5e-5), a token-weighted
loss that stays right under gradient accumulation, the source-state cache, a data report, step
times and a loss-curve PNG.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..model.fusion import source_view_rows
from ..model.loss import composed_lm_loss
from ..model.masks import positions_from_padding
from ..model.loading import load_causal_lm
from ..model.processing import CompositionProcessor
from ..model.source import read_source
from .alignment import CompositionCollator, add_source_alignment
from .cache import CachedStatesDataset, CacheFields, SourceStateCache, is_cache_file, tokenizer_fingerprint, weights_fingerprint
from .checkpoints import SealedCheckpoints, resume_checkpoint
from .nonfinite import NonFiniteLossGuard
from .optim import CLIPPED_ALONE, clip_gradients, parameter_groups
from .result import TrainResult, trainer_summary
from .data import DataOptions, PaddingCollator, PreparedData, prepare_data
from ..errors import LLMModulesError
from ..model.loading import load_config as load_model_config
from ..model.loading import load_tokenizer
from ..model.modeling import LLMModulesForCausalLM
from ..model.loading import allow_remote_code
from .atomic import atomic_write_json
from .config import TrainConfig, dump_config, validate

def model_options(config: TrainConfig) -> dict:
    """The compose() options of a run (``ComposeOptions`` fields its topology reads); unset ones (None) take the
    topology's defaults."""
    return config.compose_options().to_kwargs(only_topology=True)


def reads_source_head(config: TrainConfig) -> bool:
    """Does the model need the source's weights even when its states are cached (a head over its vocabulary)?"""
    return config.head not in (None, "new", "target")


@dataclass
class Tokenizers:
    """The tokenizer the model reads and writes (``main``) and, for fusion, the source's own."""

    main: object
    source: object


def load_tokenizers(config: TrainConfig) -> Tokenizers:
    fusion = config.topology == "fusion"
    main_ref = config.tokenizer or (config.target if fusion else config.source)
    main = load_tokenizer(main_ref, "tokenizer" if config.tokenizer else ("target" if fusion else "source"))
    if main.pad_token_id is None:
        main.pad_token = main.eos_token  # as the paper: pad = eos (labels on padding are -100 anyway)
    return Tokenizers(main, load_tokenizer(config.source, "source") if fusion else main)


# ----------------------------------------------------------------------------------------- model
def compose_model(config: TrainConfig, tokenizers: Tokenizers, with_source: bool = True) -> LLMModulesForCausalLM:
    """The composed model a run trains; ``with_source=False`` builds it from the source's config only
    (training from the source-state cache: the source's weights are never loaded)."""
    common = dict(tokenizer=tokenizers.main, source_revision=config.source_revision, source_dtype=config.source_dtype,
                  **model_options(config))
    if config.topology == "fusion":
        common["source_tokenizer"] = tokenizers.source
    if with_source:
        return LLMModulesForCausalLM.compose(config.source, config.target, **common)
    source_config = load_model_config("source", config.source, config.source_revision)
    model = LLMModulesForCausalLM.compose(None, config.target, source_config=source_config, **common)
    # Saved models must still name their source, so that from_pretrained() can load it for generation.
    model.config.source_name_or_path = str(config.source)
    return model


# ----------------------------------------------------------------------------------------- cache
def cache_fields(config: TrainConfig, tokenizers: Tokenizers) -> CacheFields:
    source_config = load_model_config("source", config.source, config.source_revision).get_text_config()
    tokenizer = tokenizer_fingerprint(tokenizers.main)
    layout = "bridge"
    if config.topology == "fusion":
        tokenizer += "+" + tokenizer_fingerprint(tokenizers.source)
        layout = f"fusion memory={config.memory} layers={fusion_read_layers(config)}"
    return CacheFields(
        source=str(config.source),
        source_revision=config.source_revision,
        source_weights=weights_fingerprint(config.source),
        source_layer=config.source_layer,
        source_dtype=config.source_dtype,
        tokenizer=tokenizer,
        template=config.template,
        max_length=config.max_length,
        hidden_size=int(source_config.hidden_size),
        dtype=config.cache_dtype,
        layout=layout,
    )


def fusion_read_layers(config: TrainConfig) -> tuple[int, ...]:
    """The source layers a fusion run's cache stores: those its blocks read, + the last for mixture heads."""
    layers = tuple(dict.fromkeys(config.source_layers or [-1]))
    if reads_source_head(config) and -1 not in layers:
        layers = (*layers, -1)
    return layers


def cache_folder(config: TrainConfig) -> Path | None:
    if config.cache in (None, "", "none", "off"):
        return None
    return Path(config.output) / "source-cache" if config.cache == "auto" else Path(config.cache)


def prepare_cache(config: TrainConfig, tokenizers: Tokenizers, data: PreparedData, state: PartialState
                  ) -> tuple[SourceStateCache, dict]:
    """Open the run's cache (refusing a stale one), repair it, and compute what it lacks. Returns (cache, stats).

    Under DDP every rank computes its own batches into its own shards; the main rank then merges
    the shards' lists into the manifest, and every rank reads the whole cache.
    """
    folder = cache_folder(config)
    assert folder is not None
    device = state.device
    fields = cache_fields(config, tokenizers)
    if config.rebuild_cache and state.is_main_process and folder.is_dir():
        for path in folder.iterdir():
            if is_cache_file(path):
                path.unlink()
    state.wait_for_everyone()
    cache = SourceStateCache.open(folder, fields)  # every rank: a stale cache is refused everywhere alike
    if state.is_main_process:
        cache.consolidate(log=_stderr)  # what a killed build left behind; damaged shards are dropped
    state.wait_for_everyone()
    cache = SourceStateCache.open(folder, fields)
    datasets = [data.train] + ([data.validation] if data.validation is not None else [])
    rows = [ids for dataset in datasets for ids in dataset["input_ids"]]
    missing = cache.missing(rows)
    stats = {"folder": str(folder), "rows": len(rows), "computed": len(missing), "seconds": 0.0,
             "ranks": state.num_processes}
    shards = dict(batch_size=config.cache_batch_size, shard_bytes=int(config.cache_shard_mb * 2**20), device=device,
                  progress=config.progress, rank=state.process_index, world_size=state.num_processes)
    if missing:
        started = time.perf_counter()
        source = load_causal_lm("source", config.source, config.source_revision, config.source_dtype).to(device).eval()
        width = int(source.config.get_text_config().hidden_size)
        fusion = config.topology == "fusion"
        tokens = sum(len(rows[i]) for i in missing)
        layers = len(fusion_read_layers(config)) if fusion else 1
        gib = tokens * width * layers * (4 if config.cache_dtype == "float32" else 2) / 2**30
        if state.is_main_process:
            _stderr(f"source-state cache: computing {len(missing)} of {len(rows)} rows ({tokens} tokens, "
                    f"~{gib:.2f} GiB) into {folder} on {state.num_processes} process(es)")
        if fusion:
            by_ids = {tuple(row["input_ids"]): row for dataset in datasets for row in dataset}
            collate = CompositionCollator(tokenizers.main.pad_token_id)

            def rows_fn(batch_ids: list[list[int]]) -> list[torch.Tensor]:
                batch = collate([{k: v for k, v in by_ids[tuple(ids)].items() if k != "row"} for ids in batch_ids])
                batch = {k: v.to(device) for k, v in batch.items()}
                return source_view_rows(source, batch, fusion_read_layers(config))

            cache.build(rows, None, rows_fn=rows_fn, **shards)
        else:
            def states_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return read_source(source, ids, mask, positions_from_padding(mask), (config.source_layer,))[0]

            cache.build(rows, states_fn, **shards)
        del source
        stats["seconds"] = round(time.perf_counter() - started, 2)
    state.wait_for_everyone()
    if state.is_main_process:
        cache.consolidate(log=_stderr)
    state.wait_for_everyone()
    cache = SourceStateCache.open(folder, fields)
    if not cache.covers(rows):
        raise LLMModulesError(f"the source-state cache in {folder} still lacks {len(cache.missing(rows))} rows after "
                              "building them (another machine's shards not visible here? a shard damaged meanwhile?)")
    stats["bytes"] = cache.size_bytes()
    return cache, stats


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------- trainer
def token_mean_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over trained tokens / tokens in the whole accumulated batch.

    logits [B, T, V], labels [B, T] (-100 ignored, shifted here). With ``num_items_in_batch``
    (the Trainer's count over all micro-batches of one optimizer step) every token weighs the
    same whatever the accumulation; without it (evaluation) it is the plain mean.
    """
    return composed_lm_loss(outputs["logits"], outputs.get("head_logits"), labels, num_items_in_batch,
                            outputs.get("source_call_cost"))


class ComposedTrainer(NonFiniteLossGuard, SealedCheckpoints, Trainer):
    """``Trainer`` with named learning rates per parameter group (connector, target, and fusion's mixture gate: the
    groups of ``trainable_parameter_groups(mixture=True)``, as the fact-world harness trains them), sealed
    (crash-safe) checkpoints and a policy for NaN/inf losses (nonfinite.py)."""

    def __init__(self, *args, group_lrs: dict[str, float], nonfinite_policy: str = "stop", **kwargs) -> None:
        super().__init__(*args, compute_loss_func=token_mean_loss, **kwargs)
        self.group_lrs = group_lrs
        self.nonfinite_policy = nonfinite_policy
        self._loss_shifts_labels = True  # count num_items_in_batch over labels[:, 1:], as token_mean_loss does
        self.model_accepts_loss_kwargs = False  # forward(**kwargs) ignores num_items_in_batch

    def _clip_grad_norm(self, model):
        """A call gate's gradient clipped on its own (``training/optim.py``); otherwise ``Trainer``'s own clipping.
        (An override of a private ``Trainer`` method, transformers pinned in pyproject.toml: it has no public hook
        between backward and the optimizer step that may change how gradients are clipped.)"""
        groups = self.optimizer.param_groups
        if self._has_mixed_mesh_grads(model) or not any(g.get("group") in CLIPPED_ALONE for g in groups):
            return super()._clip_grad_norm(model)
        return clip_gradients(groups, self.args.max_grad_norm, self.accelerator.clip_grad_norm_)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.group_lrs, self.args.weight_decay,
                                      set(self.get_decay_parameter_names(model)))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (seconds), for the results file and benchmarks."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._started)


def plot_loss_curve(log_history: list[dict], path: str | Path) -> Path | None:
    """Training (and validation) loss against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), marker="o", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title("llm-modules training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _precision(config: TrainConfig, device: str) -> dict[str, bool]:
    choice = config.precision
    if choice == "auto":
        if device == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "fp32"
    if choice not in ("fp32", "bf16", "fp16"):
        raise LLMModulesError(f"precision={config.precision!r} is not supported; choose auto, fp32, bf16 or fp16")
    if choice == "fp16" and device != "cuda":
        raise LLMModulesError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def _device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMModulesError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return config.device


def training_arguments(config: TrainConfig, has_validation: bool, device: str) -> TrainingArguments:
    if config.early_stopping_patience and not has_validation:
        raise LLMModulesError("early_stopping_patience needs validation data: set validation (a fraction) or validation_data")
    eval_strategy = "no" if not has_validation else ("steps" if config.eval_steps else "epoch")
    save_strategy, save_steps = ("steps", config.save_steps) if config.save_steps else ("epoch", None)
    if config.early_stopping_patience:  # the best checkpoint is picked among evaluated ones
        save_strategy, save_steps = eval_strategy, config.eval_steps
    report_to = [r for r in config.report_to if r != "none"] or "none"
    return TrainingArguments(
        output_dir=config.output,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr_target,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup if config.warmup < 1 else int(config.warmup),
        lr_scheduler_type=config.scheduler,
        max_grad_norm=config.max_grad_norm,
        # torch's fused AdamW is ~20x slower than the foreach one on CPU (measured, torch 2.13).
        optim=config.optim if config.optim != "auto" else ("adamw_torch_fused" if device == "cuda" else "adamw_torch"),
        activation_checkpointing=config.gradient_checkpointing,
        eval_strategy=eval_strategy,
        eval_steps=config.eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=bool(config.early_stopping_patience),
        metric_for_best_model="eval_loss" if config.early_stopping_patience else None,
        greater_is_better=False if config.early_stopping_patience else None,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        report_to=report_to,
        seed=config.seed,
        disable_tqdm=not config.progress,
        remove_unused_columns=False,  # the collator picks its columns (input_ids, labels, source_states)
        dataloader_num_workers=config.dataloader_workers,
        use_cpu=device == "cpu",
        **_precision(config, device),
    )


# ------------------------------------------------------------------------------------------ run
def check_config(config: TrainConfig) -> None:
    """Paths, names and values of the run config, all checked before anything loads (config.validate)."""
    validate(config)


def run_data(config: TrainConfig, tokenizer, output: Path, main: bool = True) -> PreparedData:
    """The run's tokenized train/validation rows; the main process writes ``data_report.json`` into ``output``."""
    options = DataOptions(
        format=config.format, template=config.template, loss_on=config.loss_on, max_length=config.max_length,
        overlength=config.overlength, on_bad_row=config.on_bad_row, system_prompt=config.system_prompt,
        append_eos=config.append_eos, limit=config.limit, split=config.dataset_split,
    )
    data = prepare_data(config.data, tokenizer, options, config.validation, config.validation_data, config.split_seed)
    if main:
        print(f"data: {data.report.summary()}", file=sys.stderr)
        atomic_write_json(output / "data_report.json", data.report.to_dict())
    return data


def train(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Run one training: data -> (cache) -> composed model -> Trainer -> saved model + report files.

    Files in ``config.output``: the model (trainable weights, config, tokenizer), ``checkpoint-*``,
    ``train_config.yaml``, ``data_report.json``, ``train_results.json``, ``loss_curve.png``, ``runs/`` (tensorboard).
    """
    check_config(config)
    device = _device(config)
    # Under `accelerate launch` / `torchrun` this joins the process group (gloo on CPU, nccl on GPU);
    # TrainingArguments below reuses the same state.
    state = PartialState(cpu=device == "cpu")
    main = state.is_main_process
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    if main:
        dump_config(config, output / "train_config.yaml")
    with allow_remote_code(config.trust_remote_code):
        tokenizers = load_tokenizers(config)
    tokenizer = tokenizers.main
    data = run_data(config, tokenizer, output, main)

    collator = PaddingCollator(tokenizer.pad_token_id, keep_rows=True)
    if config.topology == "fusion":  # what the source reads of each row, through its own tokenizer
        # a mixture head reads the source at the target's ids (one vocabulary, checked by compose)
        processor = CompositionProcessor(tokenizer, tokenizers.source, config.memory,
                                         shared=True if reads_source_head(config) else None)
        data.train = add_source_alignment(data.train, processor)
        data.validation = add_source_alignment(data.validation, processor) if data.validation is not None else None
        pad = tokenizers.source.pad_token_id
        collator = CompositionCollator(tokenizer.pad_token_id, source_pad_token_id=pad if pad is not None else 0,
                                       keep_rows=True)
    train_set, eval_set = data.train, data.validation
    cache_stats = None
    with_source = True
    if cache_folder(config) is not None:
        with allow_remote_code(config.trust_remote_code):
            cache, cache_stats = prepare_cache(config, tokenizers, data, state)
        train_set = CachedStatesDataset(train_set, cache)
        eval_set = CachedStatesDataset(eval_set, cache) if eval_set is not None else None
        with_source = reads_source_head(config)  # the source's head is part of the model for head=source/source_mix
    resume = resume_checkpoint(config.resume, output, log=_stderr if main else None)

    set_seed(config.seed)  # the connector's initialisation depends only on the seed, cached or not
    with allow_remote_code(config.trust_remote_code):
        model = compose_model(config, tokenizers, with_source=with_source)
    args = training_arguments(config, eval_set is not None, device)
    timer = StepTimer()
    all_callbacks: list[TrainerCallback] = [timer, *(callbacks or [])]
    if config.early_stopping_patience:
        all_callbacks.append(EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold))
    trainer = ComposedTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=all_callbacks,
        group_lrs={"connector": config.lr_connector, "target": config.lr_target,
                   "mixture": config.lr_connector if config.lr_mixture is None else config.lr_mixture},
        nonfinite_policy=config.on_nonfinite_loss,
    )
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    trainer.save_model(str(output))
    metrics = dict(outcome.metrics)
    if eval_set is not None:
        last = [e for e in trainer.state.log_history if "eval_loss" in e]
        if last and last[-1]["step"] == trainer.state.global_step and not config.early_stopping_patience:
            metrics.update({k: v for k, v in last[-1].items() if k.startswith("eval_")})
        else:  # the final (or best, with early stopping) weights were not evaluated yet
            metrics.update(trainer.evaluate())
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    groups = model.trainable_parameter_groups()
    results = {
        "metrics": metrics,
        **trainer_summary(trainer, timer.times, config.on_nonfinite_loss),
        "trainable_parameters": {name: sum(p.numel() for p in ps) for name, ps in groups.items()},
        "data": data.report.to_dict(),
        "data_fingerprint": data.fingerprint,
        "cache": cache_stats,
        "source_loaded": with_source,
        "device": device,
        "processes": state.num_processes,
    }
    if main:
        atomic_write_json(output / "train_results.json", results)
        plot_loss_curve(trainer.state.log_history, output / "loss_curve.png")
    return TrainResult.of_trainer(trainer, output, metrics, timer.times, model, seconds)
