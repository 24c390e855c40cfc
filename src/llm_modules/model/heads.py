"""Output heads: how the composed model turns its last hidden states into next-token logits.

- ``new`` (bridge, the release): a fresh linear head over the source's vocabulary.
- ``source`` (bridge): a learned d_t -> d_s projection into the source's frozen output head.
- ``target`` (fusion): the target's own head, as it is.
- ``source_mix``: log(g * p_source(here) + (1 - g) * p_base), g a per-position gate: every word the source
  can say stays reachable. p_base is the new head (bridge) or the target's own head (fusion).
- ``source_pointer``: three paths, log(g_here p_source(here) + g_pointed p_source(pointed) + g_base p_base).
  p_source(pointed) is the source's head on an attention-weighted sum of the source states at positions <= i
  (one causal pointer head): the model can repeat what the source predicted earlier, e.g. copy the fact
  its reasoning recalled into the answer, for words that never occurred in the transfer data.

Mixture heads read the source's vocabulary, so they need one tokenizer for both models.

What the gate reads (``mixture_gate``): ``state``, the target's hidden state at the position; ``confidence``, that
state and how sure each path is (its largest probability and its entropy over log V, two numbers per path, held
constant for the gradient). "Defer to the source where the target is unsure" is then one direction of the gate,
whatever the token: a gate on the state alone learns *where in the format* the source was right in the transfer
data, which does not carry to numbers it never saw there (measured on the composition world: the state-only gate
deferred to the source at the cipher's second digit of unseen numbers, where the frozen target was sure).

A call gate (``call_gate``) is a second gate for deferral (model/deferral.py): it reads the target alone (its state
and its own confidence) and learns, beside the mixture, where the mixture's most likely token differs from the
target's own, the only positions where calling the source changes a greedy answer. Deferral then decides on it, and
the mixture gate that mixes where the source ran may read the source's confidence too (``mixture_gate:
confidence``). Its inputs are detached and it starts at zero: it learns without moving anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMModulesError

MIX_FLOOR = 0.05  # every path of a mixture keeps at least this weight
POINTER_DIM = 64  # query/key width of the pointer attention
MIXTURE_HEADS = ("source_mix", "source_pointer")
CONFIDENCE_FEATURES = 2  # per path: largest probability, entropy / log V


def confidence_features(log_probs: torch.Tensor) -> torch.Tensor:
    """[.., V] log-probabilities -> [.., 2]: the largest probability and the entropy over log V, both in [0, 1]."""
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1) / math.log(log_probs.shape[-1])
    return torch.stack([probs.amax(-1), entropy], -1)


@dataclass
class PointerMemory:
    """The pointer head's past during decoding: projected keys [B, T, POINTER_DIM] and source states [B, T, d_s].
    Both topologies' caches carry it."""

    pointer_keys: torch.Tensor | None = None
    pointer_states: torch.Tensor | None = None

    def extend_pointer(self, keys: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' pointer keys/states; return all of them (past + new)."""
        if self.pointer_keys is not None:
            keys, states = torch.cat([self.pointer_keys, keys], 1), torch.cat([self.pointer_states, states], 1)
        self.pointer_keys, self.pointer_states = keys, states
        return keys, states

    def reorder_pointer(self, beam_idx: torch.Tensor) -> None:
        if self.pointer_keys is not None:
            self.pointer_keys = self.pointer_keys.index_select(0, beam_idx.to(self.pointer_keys.device))
            self.pointer_states = self.pointer_states.index_select(0, beam_idx.to(self.pointer_states.device))


class SourceMixture(nn.Module):
    """The gate (and pointer) of a mixture head; the distributions it mixes come from the caller."""

    def __init__(self, d_target: int, d_source: int, pointer: bool, confidence: bool = False,
                 target_only: bool = False, call_gate: bool = False) -> None:
        super().__init__()
        self.pointer = pointer
        self.confidence = confidence
        self.target_only = target_only  # the gate reads the target alone (its state and, with confidence, its own)
        paths = 3 if pointer else 2
        read_paths = 1 if target_only else paths
        # source_mix: one logit (sigmoid, starts at 0.5); source_pointer: softmax over [here, pointed, base].
        self.mix_gate = nn.Linear(d_target + (CONFIDENCE_FEATURES * read_paths if confidence else 0),
                                  paths if pointer else 1)
        if pointer:
            # Queries from the target's stream (which knows where in the format it is); keys from both streams:
            # the source's state says "a fact's value comes next" whatever the entity's name, where the target's
            # alone let the pointer land a few tokens off on names of another length (measured in the fact world:
            # it pointed at "that" instead of "is" and answered the name).
            self.pointer_query = nn.Linear(d_target, POINTER_DIM, bias=False)
            self.pointer_key = nn.Linear(d_target, POINTER_DIM, bias=False)
            self.pointer_key_source = nn.Linear(d_source, POINTER_DIM, bias=False)
        self.call_gate = None
        if call_gate:  # zeros, and the random stream put back: every other weight starts as it would without it
            with torch.random.fork_rng(devices=[]):
                self.call_gate = nn.Linear(d_target + CONFIDENCE_FEATURES, 1)
            nn.init.zeros_(self.call_gate.weight)
            nn.init.zeros_(self.call_gate.bias)

    def pointer_keys(self, hidden: torch.Tensor, source_states: torch.Tensor) -> torch.Tensor:
        """[B, T, d_t], [B, T, d_s] -> [B, T, POINTER_DIM]: projected once per position (decoding caches them)."""
        dtype = self.pointer_key.weight.dtype
        return self.pointer_key(hidden.to(dtype)) + self.pointer_key_source(source_states.to(dtype))

    def point(self, hidden: torch.Tensor, keys: torch.Tensor, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Causal pointer attention. hidden [B, t, d_t] (the last t of T positions), keys [B, T, POINTER_DIM],
        states [B, T, d_s], valid [B, T] (not padding) -> [B, t, d_s], a weighted sum of source states."""
        t, total = hidden.shape[1], keys.shape[1]
        scores = self.pointer_query(hidden.to(keys.dtype)) @ keys.transpose(1, 2) / POINTER_DIM**0.5  # [B, t, T]
        rows = torch.arange(total - t, total, device=hidden.device)[:, None]
        columns = torch.arange(total, device=hidden.device)[None, :]
        # causal and not padding; a padding query keeps its own position, so that its row is not all -inf (NaN)
        allowed = ((columns <= rows)[None] & valid[:, None, :].bool()) | (columns == rows)[None]
        weights = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1)
        return weights.to(states.dtype) @ states

    def weights(self, hidden: torch.Tensor, paths: list[torch.Tensor]) -> torch.Tensor:
        """The mixture's weights [B, t, paths] (the base path last), each >= MIX_FLOOR. hidden [B, t, d_t]; paths:
        log-probabilities [B, t, V] (a gate that reads the target alone reads only the last, the base head's)."""
        # Every weight kept >= MIX_FLOOR: a gate that saturates where the source is usually right cuts the base
        # head's gradient at the positions where the source is wrong (measured in the fact world: the trace's
        # format tokens after the thought never got learned). The floor alone was not enough with three paths:
        # the gate kept choosing the source where the barely trained new head was worse (the training loss
        # stalled at 0.28, -log 0.5 on format tokens), so training also adds the base head's own cross-entropy
        # (the model returns head_logits for that).
        return self.weights_given(hidden, self.gate_features(paths))

    def gate_features(self, paths: list[torch.Tensor]) -> torch.Tensor | None:
        """What the gate reads of the paths [B, t, V] besides the state: [B, t, 2 per path read] (their largest
        probability and entropy; the base path's alone for a target-only gate), or None for a state-only gate.
        No gradient flows into the paths through their confidence."""
        if not self.confidence:
            return None
        read = paths[-1:] if self.target_only else paths
        return torch.cat([confidence_features(path.detach()) for path in read], -1)

    def weights_given(self, hidden: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """The weights [B, t, paths] from the state [B, t, d_t] and ``gate_features`` (cached ones: a gate trained
        on stored features, as benchmarks/defer_gsm8k.py does)."""
        gate_input = hidden.to(self.mix_gate.weight.dtype)
        if features is not None:
            gate_input = torch.cat([gate_input, features.to(gate_input.dtype)], -1)
        logits = self.mix_gate(gate_input).float()
        count = 3 if self.pointer else 2
        if count == 2:
            weights = torch.cat([torch.sigmoid(logits), torch.sigmoid(-logits)], -1)
        else:
            weights = logits.softmax(-1)  # [B, t, 3]
        return MIX_FLOOR + (1 - count * MIX_FLOOR) * weights

    def call_logits(self, hidden: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
        """The call gate's logit [B, t] that the source changes the token here, from the target's state [B, t, d_t]
        and its own log-probabilities [B, t, V] (both detached: it learns without moving them)."""
        features = confidence_features(base_log_probs.detach().float())
        gate_input = torch.cat([hidden.detach().to(features.dtype), features], -1)
        return self.call_gate(gate_input.to(self.call_gate.weight.dtype)).float()[..., 0]

    def call_score(self, hidden: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
        """[B, t] in [0, 1], from the target alone: deferral calls the source where it is >= η. The call gate's
        probability where there is one, else the weight the mixture gate would give the source (which only a gate
        that reads the target alone can give before the source runs). hidden [B, t, d_t], base_log_probs [B, t, V]."""
        if self.call_gate is not None:
            return torch.sigmoid(self.call_logits(hidden, base_log_probs))
        if not self.target_only:
            raise LLMModulesError("this mixture gate reads the source's distribution: it cannot decide before the "
                                  "source runs (mixture_gate='state' or 'target_confidence' can, or add call_gate=True)")
        paths = [base_log_probs] * (3 if self.pointer else 2)  # only the last (base) is read
        return 1.0 - self.weights(hidden, paths)[..., -1]

    def forward(
        self,
        hidden: torch.Tensor,
        base_logits: torch.Tensor,
        source_logits: Callable[[torch.Tensor], torch.Tensor],
        here_states: torch.Tensor,
        pointer: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed log-probabilities [B, t, V] and the weight given to the source's paths [B, t].

        hidden [B, t, d_t]; base_logits [B, t, V]; source_logits: source states [.., d_s] -> fp32 logits [.., V];
        here_states [B, t, d_s] (the source at each position); pointer: (keys, states, valid) of all positions.
        """
        paths = [source_logits(here_states).log_softmax(-1)]
        if self.pointer:
            paths.append(source_logits(self.point(hidden, *pointer)).log_softmax(-1))
        paths.append(base_logits.float().log_softmax(-1))
        weights = self.weights(hidden, paths)  # [B, t, paths]
        log_weights = torch.log(weights)
        mixed = torch.stack([log_weights[..., i, None] + path for i, path in enumerate(paths)]).logsumexp(0)
        return mixed, 1.0 - weights[..., -1]


# ------------------------------------------------------------------------------------------ output heads
@dataclass
class HeadInputs:
    """What an output head reads at one forward.

    hidden [B, t, d_t]: the target's last states at the positions that get logits (the last t of T new positions);
    full_hidden [B, T, d_t]: at every new position (the pointer's keys need them); base_logits [B, t, V]: the
    target's own logits (fusion), None for the bridge; source_states [B, T, d_s]: the source's last layer at each
    new position (mixture heads), else None; attention_mask [B, past + T]; cache: the decoding cache (its pointer
    memory); source_logits: source states [.., d_s] -> fp32 logits [.., V] through the frozen source's own head.
    """

    hidden: torch.Tensor
    full_hidden: torch.Tensor | None
    base_logits: torch.Tensor | None
    source_states: torch.Tensor | None
    attention_mask: torch.Tensor
    cache: PointerMemory | None
    source_logits: Callable[[torch.Tensor], torch.Tensor]
    defer_threshold: float | None = None  # η of deferral decoding (evaluation only; a mixture head reads it)


class HeadOutput(NamedTuple):
    """What an output head gives: logits [B, t, V] (mixed log-probabilities for a mixture head); a mixture head's base
    head's own logits [B, t, V] (training adds their cross-entropy); its gate's source weight [B, t] (training
    prices it: ``source_call_price``); and a call gate's loss [B, t] (training adds it)."""

    logits: torch.Tensor
    head_logits: torch.Tensor | None = None
    source_weight: torch.Tensor | None = None
    call_gate_loss: torch.Tensor | None = None  # [B, t]: the call gate's cross-entropy at each position (training)


class OutputHead(nn.Module):
    """Turns ``HeadInputs`` into a ``HeadOutput``. A head owns its weights."""

    def forward(self, inputs: HeadInputs) -> HeadOutput:
        raise NotImplementedError

    @property
    def output_embeddings(self) -> nn.Module | None:
        """The linear layer that produces token logits, where the head has one of its own."""
        return None


class NewTokenHead(OutputHead):
    """``new`` (bridge, the release): a fresh linear head over the source's vocabulary.

    The head is sized by the tokenizer, which can hold more entries than the source embeds (a reloaded Qwen2
    tokenizer adds <|endoftext|>); the bridge feeds its tokens back to the source, so ids the source cannot read get
    -inf and are never sampled (without this, sampling one crashed the source)."""

    def __init__(self, d_target: int, vocab_size: int, readable: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_target, vocab_size, bias=False)
        self.readable = readable

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, t, d_t] -> [B, t, V], unreadable ids at the dtype's minimum."""
        logits = self.linear(hidden.to(self.linear.weight.dtype))
        if logits.shape[-1] <= self.readable:
            return logits
        return logits.index_fill(-1, torch.arange(self.readable, logits.shape[-1], device=logits.device),
                                 torch.finfo(logits.dtype).min)

    def forward(self, inputs: HeadInputs) -> HeadOutput:
        return HeadOutput(self.logits(inputs.hidden))

    @property
    def output_embeddings(self) -> nn.Module:
        return self.linear


class SourceProjectionHead(OutputHead):
    """``source`` (bridge): a learned d_t -> d_s projection into the source's frozen output head."""

    def __init__(self, d_target: int, d_source: int) -> None:
        super().__init__()
        self.projection = nn.Linear(d_target, d_source, bias=False)

    def forward(self, inputs: HeadInputs) -> HeadOutput:
        return HeadOutput(inputs.source_logits(self.projection(inputs.hidden.to(self.projection.weight.dtype))))


class TargetHead(OutputHead):
    """``target`` (fusion): the target's own head, as it is (its logits come from the target's forward)."""

    def forward(self, inputs: HeadInputs) -> HeadOutput:
        return HeadOutput(inputs.base_logits)


class MixtureHead(OutputHead):
    """``source_mix`` / ``source_pointer``: the base head's distribution mixed with the source's (``SourceMixture``).

    The base is the new head (bridge) or the target's own head (fusion, ``base=None``). Returns the mixed
    log-probabilities, the base head's logits (training adds their cross-entropy: ``loss.composed_lm_loss``) and the
    gate's source weight (training adds its price, ``source_call_price``)."""

    def __init__(self, base: NewTokenHead | None, d_target: int, d_source: int, pointer: bool, confidence: bool,
                 target_only: bool = False, call_gate: bool = False) -> None:
        super().__init__()
        self.base = base
        self.mixture = SourceMixture(d_target, d_source, pointer=pointer, confidence=confidence, target_only=target_only,
                                     call_gate=call_gate)

    def forward(self, inputs: HeadInputs) -> HeadOutput:
        hidden = inputs.hidden
        base = (self.base.logits(hidden) if self.base is not None else inputs.base_logits).float()
        states = inputs.source_states
        pointer = None
        if self.mixture.pointer:
            full = inputs.full_hidden
            # keys are projected once per position and cached projected: a decode step projects only its own
            keys = self.mixture.pointer_keys(full, states[:, -full.shape[1]:])
            all_states = states
            if inputs.cache is not None:
                keys, all_states = inputs.cache.extend_pointer(keys, states)
            pointer = (keys, all_states, inputs.attention_mask)
        mixed, source_weight = self.mixture(hidden, base, inputs.source_logits, states[:, -hidden.shape[1]:], pointer)
        if inputs.defer_threshold is not None:  # deferral (deferral.py): below η the target's own distribution
            base_log_probs = base.log_softmax(-1)
            calls = self.mixture.call_score(hidden, base_log_probs) >= inputs.defer_threshold
            mixed = torch.where(calls[..., None], mixed, base_log_probs)
        call_gate_loss = None
        if self.mixture.call_gate is not None and self.training:
            # where calling the source changes the greedy token: the mixture's argmax is not the target's own
            changes = (mixed.detach().argmax(-1) != base.detach().argmax(-1)).float()
            call_gate_loss = F.binary_cross_entropy_with_logits(
                self.mixture.call_logits(hidden, base.log_softmax(-1)), changes, reduction="none")
        return HeadOutput(mixed, base, source_weight, call_gate_loss)

    @property
    def output_embeddings(self) -> nn.Module | None:
        return None if self.base is None else self.base.output_embeddings
