"""The methods compared in the fact world, each built, trained and scored the same way.

A method is a recipe (``MethodSpec``): which model answers (target, source, a head on the frozen
source, or the composed LLM Modules model), what trains, and with which loss. ``run_method`` trains
it on the transfer traces under one budget (steps, batch, early stopping on validation facts) and
scores it on test facts with ``metrics.evaluate_traces``.

Method names follow issue 4: ``target_alone``, ``target_finetuned``, ``source_alone``, ``source_head``,
``source_finetuned``, ``distill_kd`` and ``llm_modules_bridge_{leaky|causal}_{random|pretrained}``
(the suffix is the target's initialisation), plus ``_head_{source|source_mix|source_pointer}`` / ``_tanh`` /
``_layers{n}`` / ``_frozen_target`` / ``_head_init_target`` for the bridge variants the harness can vary, the fusion
rows (``llm_modules_fusion_{memory}[_head_{head}]``) and ``semalign`` (``kind: semalign`` with the options of
``training/semalign/options.py``; its model and loss live in ``factworld/semalign.py``).
Two skylines bound a composition from above (issue 15): ``skyline_source_recalls_fact`` (the source answers the
fact in its own format) and ``skyline_target_given_fact`` (the target is given the recalled fact and does the rest).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...errors import LLMModulesError
from ...model.configuration import ComposeOptions, compose_option_names
from ...model.modeling import LLMModulesForCausalLM
from ...model.loss import causal_lm_loss, composed_lm_loss, next_token_mask
from ...model.masks import positions_from_padding
from ...model.processing import shared_source_inputs
from ...training.optim import parameter_groups
from ...training.result import TrainResult
from . import semalign as semalign_world
from .lm import Example, causal_lm_loss_fn, collate, encode_trace, logits_of, train_loop
from .metrics import TraceScores, evaluate_traces, own_format_accuracy, source_recall
from .world import Fact, FactWorld

UNTRAINED = ("target_alone", "source_alone", "skyline_source_recalls_fact", "skyline_target_given_fact")
COMPOSED = ("bridge", "fusion")  # options pass to LLMModulesForCausalLM.compose
KINDS = UNTRAINED + ("target_finetuned", "source_head", "source_finetuned", "distill_kd", "semalign") + COMPOSED
# Options the fact-world harness applies itself to a bridge (compose does not take them): which target weights train
# and how the new head starts. "none" keeps the target's skill intact (measured on the composition world: a fine-tuned target overwrote it).
HARNESS_OPTIONS = {"train_target": ("all", "none"), "head_init": ("random", "target")}
# A composed method's options: the ComposeOptions fields its topology reads (the kind is the topology).
BRIDGE_OPTIONS = (*(n for n in compose_option_names("bridge") if n != "topology"), *HARNESS_OPTIONS)
FUSION_OPTIONS = tuple(n for n in compose_option_names("fusion") if n != "topology")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison. ``options`` holds a composed method's ``LLMModulesForCausalLM.compose`` options
    (``ComposeOptions`` fields: ``BRIDGE_OPTIONS`` / ``FUSION_OPTIONS``, checked here) or SemAlign's."""

    name: str
    kind: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LLMModulesError(f"method {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.options and self.kind not in (*COMPOSED, "semalign"):
            raise LLMModulesError(f"method {self.name!r}: options {sorted(self.options)} only apply to kind: "
                                  f"bridge, fusion or semalign")
        valid = {"fusion": FUSION_OPTIONS, "semalign": semalign_world.OPTIONS}.get(self.kind, BRIDGE_OPTIONS)
        unknown = set(self.options) - set(valid)
        if unknown:
            raise LLMModulesError(
                f"method {self.name!r}: unknown {self.kind} option(s) {sorted(unknown)}; valid: {', '.join(valid)}"
            )
        for key, allowed in HARNESS_OPTIONS.items():
            if self.kind == "bridge" and key in self.options and self.options[key] not in allowed:
                raise LLMModulesError(f"method {self.name!r}: {key}={self.options[key]!r}; choose one of {allowed}")
        if self.kind in COMPOSED:  # the values, as compose() will check them
            compose_options = {k: v for k, v in self.options.items() if k not in HARNESS_OPTIONS or self.kind == "fusion"}
            ComposeOptions.from_mapping({**compose_options, "topology": self.kind}, where=f"method {self.name!r}: ")

    @property
    def trains(self) -> bool:
        return self.kind not in UNTRAINED


def bridge_spec(leaky: bool = False, target_init: str = "random", head: str = "new", gate: str = "sigmoid",
                connector_layers: int = 2, train_target: str = "all", head_init: str = "random",
                **extra: Any) -> MethodSpec:
    """The bridge method named by its options: paper defaults add no suffix."""
    name = f"llm_modules_bridge_{'leaky' if leaky else 'causal'}_{target_init}"
    if head != "new":
        name += f"_head_{head}"
    if gate != "sigmoid":
        name += f"_{gate}"
    if connector_layers != 2:
        name += f"_layers{connector_layers}"
    if train_target != "all":
        name += "_frozen_target"
    if head_init != "random":
        name += f"_head_init_{head_init}"
    options = dict(leaky=leaky, target_init=target_init, head=head, gate=gate, connector_layers=connector_layers, **extra)
    options.update({k: v for k, v in (("train_target", train_target), ("head_init", head_init))
                    if v != HARNESS_OPTIONS[k][0]})
    return MethodSpec(name, "bridge", options)


def fusion_spec(memory: str = "prompt", head: str = "target", train_target: str = "none", **extra: Any) -> MethodSpec:
    """The fusion method named by its options: ``llm_modules_fusion_{memory}[_head_{head}][_train_{target}]``."""
    name = f"llm_modules_fusion_{memory}"
    if head != "target":
        name += f"_head_{head}"
    if train_target != "none":
        name += f"_train_{train_target}"
    if extra.get("fusion_layers") == []:  # no cross-attention block: only the mixture gate trains
        name += "_no_blocks"
    if extra.get("mixture_gate", "state") != "state":
        name += f"_gate_{extra['mixture_gate']}"
    if extra.get("source_call_price"):
        name += f"_price_{extra['source_call_price']:g}"
    if extra.get("call_gate"):
        name += "_call_gate"
    return MethodSpec(name, "fusion", dict(memory=memory, head=head, train_target=train_target, **extra))


def plain_specs(*kinds: str) -> list[MethodSpec]:
    """Rows named by their kind, with no options (parents, skylines, baselines)."""
    return [MethodSpec(kind, kind) for kind in kinds]


def default_methods(world: str = "facts") -> list[MethodSpec]:
    """Every row issue 4 asks for, plus the bridge and fusion configurations that can read the source; for the
    composition world (issue 15) also the two skylines and the compositions that keep the target's skill."""
    if world == "composition":
        return composition_methods()
    return [
        *plain_specs("target_alone", "target_finetuned", "source_alone", "source_head", "source_finetuned", "distill_kd"),
        bridge_spec(leaky=True, target_init="random"),  # the released code
        bridge_spec(leaky=False, target_init="random"),  # the released graph, made causal
        bridge_spec(leaky=True, target_init="pretrained"),
        bridge_spec(leaky=False, target_init="pretrained"),
        bridge_spec(leaky=False, target_init="pretrained", head="source"),
        bridge_spec(leaky=False, target_init="pretrained", head="source_mix"),
        bridge_spec(leaky=False, target_init="pretrained", head="source_pointer"),
        fusion_spec(memory="prompt"),  # the target keeps its embeddings, head and skills; reads the prompt's source
        fusion_spec(memory="sequence"),
        fusion_spec(memory="sequence", head="source_pointer"),
    ]


def composition_methods() -> list[MethodSpec]:
    """The composition world's rows: both parents, both skylines, every baseline, the paper's configurations and
    the bridges that keep the target's skill (a frozen target body, the new head started as the target's own)."""
    return [
        *plain_specs("source_alone", "target_alone", "skyline_source_recalls_fact", "skyline_target_given_fact",
                     "target_finetuned", "source_finetuned", "distill_kd"),
        bridge_spec(leaky=True, target_init="random"),  # the released code
        bridge_spec(leaky=False, target_init="random"),  # the released graph, made causal
        bridge_spec(leaky=False, target_init="pretrained"),
        bridge_spec(leaky=False, target_init="pretrained", head="source_pointer"),
        bridge_spec(leaky=False, target_init="pretrained", head="source_pointer", train_target="none"),
        bridge_spec(leaky=False, target_init="pretrained", head="source_pointer", train_target="none",
                    head_init="target"),
        fusion_spec(memory="prompt"),  # the target keeps its embeddings, head and cipher; reads the question's source
        fusion_spec(memory="sequence"),  # ... and the source reads along the reply
        fusion_spec(memory="sequence", head="source_mix"),  # ... and its next-token distribution is mixed in
        fusion_spec(memory="sequence", head="source_pointer"),  # ... also at an earlier position a pointer picks
        # The same without any cross-attention block: the target stays exactly itself and only the mixture's gate
        # (a linear probe of its state) learns where to read the source's next-token distribution.
        fusion_spec(memory="sequence", head="source_mix", fusion_layers=[]),
        fusion_spec(memory="sequence", head="source_pointer", fusion_layers=[]),
        # ... with a gate that also reads how sure each model is (heads.py, ``mixture_gate``)
        fusion_spec(memory="sequence", head="source_mix", fusion_layers=[], mixture_gate="confidence"),
        fusion_spec(memory="sequence", head="source_pointer", fusion_layers=[], mixture_gate="confidence"),
        fusion_spec(memory="sequence", head="source_mix", mixture_gate="confidence"),  # ... and blocks
        method_from_mapping({"kind": "semalign"}),  # the target learns the source's layers, then runs alone (v1, LoRA)
        method_from_mapping({"kind": "semalign", "version": "v2", "mode": "layers"}),
    ]


def method_from_mapping(values: dict | str) -> MethodSpec:
    """A method from YAML: a known name (``target_finetuned``, ``llm_modules_bridge_causal_random``...)
    or ``{name?, kind, <bridge options>}``."""
    if isinstance(values, str):
        known = {m.name: m for m in default_methods("facts") + default_methods("composition")}
        if values in known:
            return known[values]
        raise LLMModulesError(f"unknown method {values!r}; known: {', '.join(known)} (or a mapping with kind: bridge)")
    values = dict(values)
    kind = values.pop("kind", "bridge")
    name = values.pop("name", None)
    if kind in COMPOSED:
        spec = bridge_spec(**values) if kind == "bridge" else fusion_spec(**values)
        return MethodSpec(name, kind, spec.options) if name else spec
    if kind == "semalign":  # options of SemAlign's run config (training/semalign/options.py)
        return MethodSpec(name or semalign_world.method_name(values), "semalign", values)
    if values:
        raise LLMModulesError(f"method {name or kind!r}: options {sorted(values)} only apply to kind: bridge, fusion "
                              "or semalign")
    return MethodSpec(name or kind, kind)


# ---------------------------------------------------------------------------------- models per method


class FrozenSourceHead(nn.Module):
    """A fresh linear head on the frozen source's last hidden states: the cheapest way to read it."""

    def __init__(self, source: PreTrainedModel, vocab_size: int) -> None:
        super().__init__()
        self.source = source.requires_grad_(False).eval()
        self.head = nn.Linear(source.config.hidden_size, vocab_size, bias=False)

    def fact_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T, V] logits."""
        with torch.no_grad():
            hidden = self.source(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=positions_from_padding(attention_mask),
                                 output_hidden_states=True).hidden_states[-1]
        return self.head(hidden)

    def train(self, mode: bool = True) -> FrozenSourceHead:
        super().train(mode)
        self.source.eval()
        return self


@dataclass
class Workbench:
    """What every method shares: the world, its tokenizer, the pretrained source and target."""

    world: FactWorld
    tokenizer: PreTrainedTokenizerBase
    source: PreTrainedModel
    target: PreTrainedModel
    _states: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        """Pickled for worker processes (``factworld.pool``): each model travels as class, config and weights and is
        rebuilt on arrival. A pickled transformers model loses its output-capturing hooks but keeps the flag that
        says they are installed, so ``output_hidden_states=True`` returned no hidden states in the worker."""
        state = dict(self.__dict__)
        for key in ("source", "target"):
            model = state[key]
            state[key] = (type(model), model.config, model.state_dict())
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("source", "target"):
            cls, config, weights = state[key]
            model = cls(config)
            model.load_state_dict(weights)
            state[key] = model.eval()
        self.__dict__.update(state)

    def traces(self, facts) -> list[Example]:
        """Every question form of each fact, as a trace (loss on the assistant turn)."""
        return [encode_trace(self.tokenizer, self.world, f, form) for f in facts for form in range(self.world.question_forms)]

    @torch.no_grad()
    def source_states(self, batch: Sequence[Example]) -> torch.Tensor:
        """The frozen source's last hidden states for right-padded ``batch``: [B, T, d_source].

        The fact world's source-state cache: the source never changes, so each sequence runs through
        it once for all bridge methods and seeds (``llm_modules.training.cache`` does this on disk for real runs).
        """
        missing = [e for e in batch if tuple(e.input_ids) not in self._states]
        if missing:
            tensors = collate(missing, self.tokenizer.pad_token_id)
            hidden = self.source(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                                 output_hidden_states=True).hidden_states[-1]  # [B, T, d]
            for row, example in enumerate(missing):
                self._states[tuple(example.input_ids)] = hidden[row, : len(example.input_ids)].float()
        length = max(len(e.input_ids) for e in batch)
        out = torch.zeros(len(batch), length, self.source.config.hidden_size)
        for row, example in enumerate(batch):
            out[row, : len(example.input_ids)] = self._states[tuple(example.input_ids)]
        return out


def build_model(spec: MethodSpec, bench: Workbench, seed: int) -> nn.Module:
    """A fresh model for ``spec``; the shared source/target are copied, never trained in place."""
    torch.manual_seed(seed)
    if spec.kind in ("target_alone", "target_finetuned", "distill_kd", "skyline_target_given_fact"):
        return copy.deepcopy(bench.target).requires_grad_(spec.trains)
    if spec.kind in ("source_alone", "source_finetuned", "skyline_source_recalls_fact"):
        return copy.deepcopy(bench.source).requires_grad_(spec.trains)  # the shared source is frozen
    if spec.kind == "source_head":
        return FrozenSourceHead(bench.source, len(bench.tokenizer))
    if spec.kind == "semalign":
        return semalign_world.build_model(spec.options, bench, seed)
    tokenizers = {"tokenizer": bench.tokenizer}
    if spec.kind == "fusion":
        tokenizers["source_tokenizer"] = bench.tokenizer
    model = LLMModulesForCausalLM.compose(bench.source, copy.deepcopy(bench.target), **tokenizers,
                                          **composed_options(spec))
    if spec.kind == "bridge":
        _apply_harness_options(model, bench.target, harness_options(spec))
    return model


def composed_options(spec: MethodSpec) -> dict[str, Any]:
    """The ``compose()`` options (``ComposeOptions`` fields, the topology included) a composed method's model is built
    with: its own options over the harness's defaults (no dropout; fusion: a block before every layer unless
    ``fusion_layers`` says otherwise; bridge: 4 heads, the target pretrained). ``llm-modules demo --export`` writes
    exactly these into the exported run config."""
    if spec.kind not in COMPOSED:
        raise LLMModulesError(f"method {spec.name!r} (kind {spec.kind}) is not a composed model; it has no "
                              "compose options")
    options = {k: v for k, v in spec.options.items() if spec.kind == "fusion" or k not in HARNESS_OPTIONS}
    if spec.kind == "fusion":
        return {"topology": "fusion", "attention_dropout": 0.0, "fusion_every": 1, **options}
    return {"topology": "bridge", "target_init": "pretrained", "heads": 4, "attention_dropout": 0.0, **options}


def harness_options(spec: MethodSpec) -> dict[str, str]:
    """A bridge's options that the harness applies itself (``HARNESS_OPTIONS``), defaults filled in."""
    return {key: spec.options.get(key, allowed[0]) for key, allowed in HARNESS_OPTIONS.items()}


def _apply_harness_options(model: LLMModulesForCausalLM, target: PreTrainedModel, harness: dict) -> None:
    """``train_target="none"``: the target body stays as pretrained (CALM's recipe; its skill cannot be overwritten);
    ``head_init="target"``: the new head starts as the target's own output head (the vocabularies are the fact world's
    one tokenizer), so the words the target can say stay reachable from the first step."""
    if harness["train_target"] == "none":
        model.target.requires_grad_(False)
    if harness["head_init"] == "target":
        head, own = model.get_output_embeddings(), target.get_output_embeddings()
        if head is None or own is None or head.weight.shape != own.weight.shape:
            raise LLMModulesError(
                f"head_init='target' needs a new head shaped like the target's output head ({model.config.head!r} head: "
                f"{None if head is None else tuple(head.weight.shape)}, target: "
                f"{None if own is None else tuple(own.weight.shape)})")
        with torch.no_grad():
            head.weight.copy_(own.weight)


def count_parameters(spec: MethodSpec, model: nn.Module) -> tuple[int, int]:
    """(trainable, needed at inference). Frozen source weights count at inference when they run."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if spec.trains else 0
    if spec.kind == "fusion":  # the source body runs (once per prompt, or along), its own head only for mixtures
        return trainable, sum(p.numel() for p in model.parameters())
    if spec.kind == "bridge":
        embeddings = model.target.get_input_embeddings()  # never read by the bridge
        unused = embeddings.weight.numel() if embeddings is not None else 0
        return trainable, sum(p.numel() for p in model.parameters()) - unused
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- losses


def kd_loss_fn(student: nn.Module, teacher: nn.Module, pad_id: int, temperature: float = 2.0, alpha: float = 0.5):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, on the label positions.

    Source and target share the fact world's tokenizer, so the two distributions are over the same ids.
    """

    def loss_fn(batch: list[Example]) -> torch.Tensor:
        tensors = collate(batch, pad_id)
        ids, mask, labels = tensors["input_ids"], tensors["attention_mask"], tensors["labels"]
        student_logits = logits_of(student, ids, mask)  # [B, T, V]
        with torch.no_grad():
            teacher_logits = logits_of(teacher, ids, mask)
        keep = next_token_mask(labels)  # predictions made at positions whose next token has a label
        s = student_logits[:, :-1][keep].float() / temperature
        t = teacher_logits[:, :-1][keep].float() / temperature
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
        return alpha * temperature**2 * kl + (1 - alpha) * causal_lm_loss(student_logits, labels)

    return loss_fn


def bridge_loss_fn(model: LLMModulesForCausalLM, bench: Workbench) -> Callable[[list[Example]], torch.Tensor]:
    """Cross-entropy of the composed model fed with cached source states (the source does not run).

    Fusion reads the same states in the target's own columns (one tokenizer): all of them with sequence
    memory, the prompt's with prompt memory."""

    def loss_fn(batch: list[Example]) -> torch.Tensor:
        tensors = collate(batch, bench.tokenizer.pad_token_id)
        states, extra = bench.source_states(batch), {}
        if model.config.topology == "fusion":
            prompts = torch.tensor([e.prompt_length for e in batch]) if model.config.memory == "prompt" else None
            states, extra = states[:, :, None], shared_source_inputs(tensors["attention_mask"], prompts)
        output = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                       source_states=states, **extra)
        # a mixture head: its new head's own cross-entropy too (model/loss.py)
        return composed_lm_loss(output.logits, output.head_logits, tensors["labels"],
                                call_cost=output.source_call_cost)

    return loss_fn


# ----------------------------------------------------------------------------------------- one method


@dataclass
class Budget:
    """The same for every trained method."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    target_lr: float = 1e-3  # the paper's ratio: connector 1e-4, target 5e-5
    # A fusion model's mixture gate (``head: source_mix | source_pointer``): a linear probe of the target's state that
    # says where to read the source; None: ``lr``. Measured on the composition world (gate-only fusion, 600 steps):
    # at 1e-2 it was still learning where to defer (81-92% of test facts, validation rising at the last step).
    mixture_lr: float | None = None
    eval_every: int = 100
    patience: int = 3
    validation_facts: int = 64

    @property
    def mixture_rate(self) -> float:
        """The mixture gate's learning rate: ``mixture_lr``, else ``lr``."""
        return self.mixture_lr or self.lr


@dataclass
class MethodRun:
    """One trained (or untrained) method on one seed, with its scores."""

    spec: MethodSpec
    seed: int
    scores: TraceScores
    validation_accuracy: float
    trainable_params: int
    inference_params: int
    seconds: float
    train: TrainResult | None
    model: nn.Module = field(repr=False, default=None)
    inspection: dict = field(repr=False, default_factory=dict)  # composed models: inspect_composed()


def _optimizer_groups(spec: MethodSpec, model: nn.Module, budget: Budget) -> list[dict]:
    if spec.kind in COMPOSED:
        # a fusion model's mixture gate: a linear probe of the target's state (and of how sure each path is, with
        # mixture_gate=confidence), in its own group as ``llm-modules train`` trains it (lr_mixture)
        lrs = {"connector": budget.lr, "target": budget.target_lr, "mixture": budget.mixture_rate}
        return parameter_groups(model, lrs)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": budget.lr}]


@torch.no_grad()
def inspect_composed(model: LLMModulesForCausalLM, bench: Workbench) -> dict:
    """What the report plots of a composed model, computed where it was trained (a model does not leave its worker
    process: transformers' output-capturing hooks do not pickle). ``gates``: mean opening of each connector gate at
    the last forward pass (the test set's last batch); ``attention``: the last connector layer's attention [T, T]
    (mean over heads) on the first test fact's trace, with its ``tokens`` and ``prompt_length``."""
    gates = model.gate_values() if hasattr(model, "gate_values") else []
    example = encode_trace(bench.tokenizer, bench.world, bench.world.test[0])
    ids = torch.tensor([example.input_ids])
    output = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    attention = output.attentions[-1][0].float().mean(0).tolist() if output.attentions else None
    return {"gates": gates, "attention": attention, "prompt_length": example.prompt_length,
            "tokens": [bench.tokenizer.decode([t]) for t in example.input_ids]}


def score(spec: MethodSpec, model: nn.Module, bench: Workbench, facts: Sequence[Fact], seed: int = 0,
          generate: bool = True, probe_leak: bool = True) -> TraceScores:
    """Scores of ``model`` on ``facts`` the way its row reads them.

    Every model answers the world's question in the trace format, except: ``source_alone`` answers it in the
    source's own sentence form ("Remember: the cipher of Velmora's room is"; in the facts world the fact itself),
    ``skyline_source_recalls_fact`` answers the fact in that form ("Remember: Velmora's room is", scored against
    the fact's value), and ``skyline_target_given_fact`` is prompted with the gold thought up to the recalled fact.
    Their teacher-forced column stays the trace's (for the source: its recall where a connector reads it).
    """
    world, tokenizer = bench.world, bench.tokenizer
    scores = evaluate_traces(model, tokenizer, world, facts, generate=generate, probe_leak=probe_leak, seed=seed,
                             given_fact=spec.kind == "skyline_target_given_fact")
    if spec.kind in ("source_alone", "skyline_source_recalls_fact"):
        composed = spec.kind == "source_alone"
        seen = [f for f in facts if world.answer_seen(f)]
        unseen = [f for f in facts if not world.answer_seen(f)]
        scores.accuracy = own_format_accuracy(model, tokenizer, world, facts, composed)
        scores.accuracy_seen = own_format_accuracy(model, tokenizer, world, seen, composed)
        scores.accuracy_unseen = own_format_accuracy(model, tokenizer, world, unseen, composed)
    return scores


def run_method(spec: MethodSpec, bench: Workbench, budget: Budget, seed: int, progress: bool = True,
               evaluate_test: bool = True) -> MethodRun:
    """Build, train (early stopping on greedy answer accuracy over validation facts) and score."""
    start = time.perf_counter()
    model = build_model(spec, bench, seed)
    pad = bench.tokenizer.pad_token_id
    validation = bench.world.validation[: budget.validation_facts]

    def validation_accuracy() -> float:
        """Greedy answer accuracy on validation facts: the test metric, so that early stopping cannot keep
        a checkpoint that recalls the fact in its thought but has not yet learned to answer."""
        model.eval()
        accuracy = score(spec, model, bench, validation, probe_leak=False).accuracy
        model.train()
        return accuracy

    result = None
    if spec.trains:
        model.train()
        if spec.kind == "distill_kd":
            loss_fn = kd_loss_fn(model, bench.source, pad)
        elif spec.kind in COMPOSED:
            loss_fn = bridge_loss_fn(model, bench)
        elif spec.kind == "semalign":
            loss_fn = semalign_world.loss_fn(model, bench, budget.steps)
        else:
            loss_fn = causal_lm_loss_fn(model, pad)
        result = train_loop(
            _optimizer_groups(spec, model, budget), loss_fn, bench.traces(bench.world.transfer), budget.steps,
            batch_size=budget.batch_size, lr=budget.lr, seed=seed, evaluate=validation_accuracy,
            eval_every=budget.eval_every, patience=budget.patience, module=model,
            description=f"{spec.name} (seed {seed})", progress=progress,
        )
    model.eval()
    best_validation = validation_accuracy() if validation else float("nan")
    model.eval()
    scores = score(spec, model, bench, bench.world.test, seed=seed, generate=evaluate_test)
    inspection = inspect_composed(model, bench) if spec.kind in COMPOSED else {}
    trainable, inference = count_parameters(spec, model)
    return MethodRun(spec, seed, scores, best_validation, trainable, inference, time.perf_counter() - start, result,
                     model, inspection)


def recall_report(bench: Workbench) -> dict[str, float]:
    """The source's recall on every split, at the trace answer point and in its own format."""
    world = bench.world
    report = {}
    for split in ("transfer", "validation", "test"):
        facts = getattr(world, split)
        if facts:
            report[f"{split}_trace"] = source_recall(bench.source, bench.tokenizer, world, facts, "trace")
            report[f"{split}_own"] = source_recall(bench.source, bench.tokenizer, world, facts, "own")
    return report


__all__ = [
    "Budget",
    "FrozenSourceHead",
    "MethodRun",
    "MethodSpec",
    "Workbench",
    "bridge_spec",
    "composed_options",
    "default_methods",
    "harness_options",
    "method_from_mapping",
    "recall_report",
    "run_method",
    "score",
]
