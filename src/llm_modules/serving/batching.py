"""The request queue and batched decoding: concurrent requests share one ``model.generate()`` call.

A worker thread per served model takes queued sequences (one per prompt) in arrival order, as many as fit the
batch limits, left-pads them into one batch and runs ``generate()``. Each row keeps its own sampling
(temperature, top-p, seed), token limit, stop strings, deadline and cancellation, through two hooks that
``generate()`` calls once per step: a logits processor that samples each row with its own settings
(``RowSampler``) and a stopping criterion that turns each row's new token into text for its client and says
which rows are done (``BatchStepper``). Requests that arrive while a batch decodes wait for the next one
(request-level batching): joining a running batch would need surgery on the composed model's three caches,
which the model's public API (``generate``) does not offer.

transformers' own server (``transformers serve``) batches only through continuous batching, which needs
paged attention inside every attention layer (not the case for a source + connector + target), and otherwise
serves one request at a time; hence this module.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase
from transformers import StoppingCriteria, StoppingCriteriaList

from .stream_text import IncrementalText


class QueueFull(Exception):
    """The bounded queue has no room for the request (the server answers 429)."""


class EngineClosed(QueueFull):
    """The engine stopped taking requests: the server is shutting down (503)."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32        # rows decoded together
    max_batch_tokens: int = 32768   # sum over rows of prompt + max_tokens (bounds the KV caches)
    max_queue: int = 256            # sequences waiting; beyond it requests are refused
    batch_window_s: float = 0.005   # after the first request, how long to wait for others to join


@dataclass(frozen=True)
class Sampling:
    """One sequence's decoding settings (OpenAI semantics: temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Event:
    """What the engine reports about one sequence: new text, its end, or a failure."""

    index: int                          # the sequence's index within its request (a completion's prompt number)
    text: str = ""
    finish_reason: str | None = None    # "stop" | "length" once the sequence ended
    completion_tokens: int = 0
    gate_values: list[float] | None = None  # composed models: mean gate opening per layer over the answer
    error: str | None = None
    status: int = 500                   # HTTP status that fits the error


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to decode. ``deliver`` is called from the engine thread with each ``Event``."""

    index: int
    prompt_ids: list[int]
    sampling: Sampling
    deliver: Callable[[Event], None]
    deadline: float                     # time.monotonic() after which the sequence ends ("length")
    cancelled: bool = False             # set by the server when the client goes away
    # decoding state, owned by the engine thread
    text: IncrementalText | None = None
    completion_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None    # "stop" | "length" | "cancelled" | "error"
    generator: torch.Generator = field(default_factory=torch.Generator)

    @property
    def cost(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_tokens


class RowSampler(LogitsProcessor):
    """Per-row sampling inside one batched ``generate()``: scores [B, V] -> [B, V], 0 at the chosen token, -inf
    elsewhere, so that generate's greedy step takes it. Rows at temperature 0 take the argmax; the others sample
    from softmax(scores / T) cut to the top-p nucleus, with their own generator (a seed gives the same answer
    whatever else shares the batch, up to the float noise of padding). Ids the tokenizer cannot decode
    (a head wider than the vocabulary) are never chosen."""

    def __init__(self, rows: Sequence[GenerationRequest], vocab_limit: int) -> None:
        self.rows = list(rows)
        self.vocab_limit = vocab_limit
        self.temperature = torch.tensor([r.sampling.temperature for r in rows], dtype=torch.float32)
        self.top_p = torch.tensor([r.sampling.top_p for r in rows], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if scores.shape[-1] > self.vocab_limit:
            scores[:, self.vocab_limit:] = float("-inf")
        choice = scores.argmax(-1)                                        # [B]
        sampled = (self.temperature > 0).nonzero().flatten().tolist()
        if sampled:
            rows = torch.tensor(sampled, device=scores.device)
            temperature = self.temperature[sampled].to(scores.device)[:, None]
            top_p = self.top_p[sampled].to(scores.device)[:, None]
            probs = (scores[rows] / temperature).softmax(-1)              # [S, V]
            probs, order = probs.sort(-1, descending=True)
            keep = probs.cumsum(-1) - probs < top_p                       # the nucleus; the top token always stays
            cumulative = (probs * keep).cumsum(-1)                        # [S, V]
            draws = torch.stack([torch.rand((), generator=self.rows[i].generator) for i in sampled])
            point = (draws.to(scores.device)[:, None] * cumulative[:, -1:]).contiguous()
            position = torch.searchsorted(cumulative, point).clamp(max=probs.shape[-1] - 1)
            choice[rows] = order.gather(-1, position).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


class BatchStepper(StoppingCriteria):
    """Called by ``generate()`` after each step with the ids so far [B, T]: hands each row's new token to its
    text tracker, delivers the text, ends rows (end token, stop string, token limit, deadline, cancellation)
    and returns which rows are done [B] (generate stops when all are)."""

    def __init__(self, rows: Sequence[GenerationRequest], stop_ids: set[int], gates: Callable[[], list[float]] | None,
                 engine_closed: Callable[[], bool]) -> None:
        self.rows = list(rows)
        self.stop_ids = stop_ids
        self.gates = gates
        self.engine_closed = engine_closed
        self.gate_sum: list[float] | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        self._record_gates()
        tokens = input_ids[:, -1].tolist()
        now, closed = time.monotonic(), self.engine_closed()
        for row, token in zip(self.rows, tokens):
            if not row.finished:
                self._advance(row, token, now, closed)
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)

    def _advance(self, row: GenerationRequest, token: int, now: float, closed: bool) -> None:
        if row.cancelled or closed:
            row.finished, row.finish_reason = True, "cancelled"
            if closed and not row.cancelled:
                row.deliver(Event(row.index, error="the server is shutting down", status=503))
            return
        if token in self.stop_ids:
            return self.finish(row, "stop")
        row.completion_tokens += 1
        piece, stopped = row.text.add(token)
        if stopped:
            return self.finish(row, "stop", piece)
        if row.completion_tokens >= row.sampling.max_tokens or now >= row.deadline:
            return self.finish(row, "length", piece + row.text.flush())
        if piece:
            row.deliver(Event(row.index, text=piece, completion_tokens=row.completion_tokens))

    def finish(self, row: GenerationRequest, reason: str, piece: str | None = None) -> None:
        """End ``row``: send what is left of its text with the finish reason."""
        row.finished, row.finish_reason = True, reason
        text = row.text.flush() if piece is None else piece
        row.deliver(Event(row.index, text=text, finish_reason=reason, completion_tokens=row.completion_tokens,
                          gate_values=self.mean_gates()))

    def _record_gates(self) -> None:
        if self.gates is None:
            return
        values = self.gates()
        self.gate_sum = values if self.gate_sum is None else [a + b for a, b in zip(self.gate_sum, values)]
        self.steps += 1

    def mean_gates(self) -> list[float] | None:
        """Mean gate opening per layer over the batch's forward passes so far (NaN -> None for JSON)."""
        if self.gate_sum is None:
            return None
        return [None if math.isnan(v) else round(v / self.steps, 6) for v in self.gate_sum]


def decodable_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """How many ids (0..n-1) a model may emit: the tokenizer must decode them and, fed back, the model's input
    embeddings must hold them (a saved tokenizer can be longer than the table: seen with a reloaded folder whose
    tokenizer class added ``<|endoftext|>``, which the composed model's head could then emit and its source not read)."""
    limit = len(tokenizer)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(embeddings, "num_embeddings", None):
        limit = min(limit, int(embeddings.num_embeddings))
    return limit


class BatchEngine:
    """A bounded FIFO of ``GenerationRequest`` and a worker thread that decodes them in batches."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int],
                 limits: BatchLimits = BatchLimits(), tokenizer_lock: threading.Lock | None = None,
                 name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.limits = limits
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.name = name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.gates = getattr(model, "gate_values", None)
        self.vocab_limit = decodable_ids(model, tokenizer)
        self._queue: deque[GenerationRequest] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batch-engine-{name}", daemon=True)
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "cancelled": 0}  # for /health

    # ----------------------------------------------------------------------------------- server side
    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._condition.notify_all()
        for request in waiting:
            request.deliver(Event(request.index, error="the server is shutting down", status=503))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue all of ``requests`` (one HTTP request's prompts) or none: raises ``QueueFull``."""
        for request in requests:
            request.text = IncrementalText(self.tokenizer, request.sampling.stop, self.tokenizer_lock)
            seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
            request.generator.manual_seed(seed)
        with self._condition:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) + len(requests) > self.limits.max_queue:
                raise QueueFull(f"{len(self._queue)} sequences are waiting for {self.name} (limit {self.limits.max_queue})")
            self._queue.extend(requests)
            self._condition.notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ----------------------------------------------------------------------------------- engine side
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[GenerationRequest] | None:
        """Wait for work; then take queued requests in order while they fit the limits (None once closed)."""
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
        if self.limits.batch_window_s > 0:
            time.sleep(self.limits.batch_window_s)  # let requests sent at the same moment join
        batch: list[GenerationRequest] = []
        tokens = 0
        now = time.monotonic()
        with self._condition:
            while self._queue and len(batch) < self.limits.max_batch_size:
                request = self._queue[0]
                if request.cancelled:
                    self._queue.popleft()
                    continue
                if now >= request.deadline:
                    self._queue.popleft()
                    request.deliver(Event(request.index, error="the request waited in the queue past its time limit",
                                          status=503))
                    continue
                if batch and tokens + request.cost > self.limits.max_batch_tokens:
                    break
                batch.append(self._queue.popleft())
                tokens += request.cost
        return batch

    def _run(self, batch: list[GenerationRequest]) -> None:
        """Decode one batch; every failure is reported to its rows and the engine goes on."""
        stepper = BatchStepper(batch, self.stop_ids, self.gates, lambda: self._closed)
        try:
            width = max(len(r.prompt_ids) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, request in enumerate(batch):  # left padding: every prompt ends where decoding starts
                ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
                mask[row, width - len(request.prompt_ids):] = 1
            device = self.model.device
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max(r.sampling.max_tokens for r in batch),
                    do_sample=False,  # RowSampler has already chosen; greedy takes its choice
                    temperature=None, top_p=None, top_k=None,
                    logits_processor=LogitsProcessorList([RowSampler(batch, self.vocab_limit)]),
                    stopping_criteria=StoppingCriteriaList([stepper]),
                    pad_token_id=self.pad_id,
                    eos_token_id=sorted(self.stop_ids) or None,
                )
            for request in batch:  # generate() ended without the row's own end (e.g. a model's max_length)
                if not request.finished and not request.cancelled:
                    stepper.finish(request, "length")
        except Exception as error:  # reported to the rows, never raised: one bad batch must not stop the server
            for request in batch:
                if not request.finished:
                    request.finished, request.finish_reason = True, "error"
                    request.deliver(Event(request.index, error=f"generation failed: {type(error).__name__}: {error}",
                                          status=500))
        self.stats["batches"] += 1
        self.stats["sequences"] += len(batch)
        self.stats["tokens"] += sum(r.completion_tokens for r in batch)
        self.stats["cancelled"] += sum(r.finish_reason == "cancelled" for r in batch)

