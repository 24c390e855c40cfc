"""The serving engine without HTTP: text streaming with stop strings, per-row sampling, the queue, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llm_modules.serving.batching import (
    BatchEngine,
    BatchLimits,
    BatchStepper,
    GenerationRequest,
    QueueFull,
    RowSampler,
    Sampling,
)
from llm_modules.serving.stream_text import IncrementalText


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], bool]:
    tracker, pieces = IncrementalText(tokenizer, stop), []
    for token in tokenizer(text).input_ids:
        piece, stopped = tracker.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [tracker.flush()], False


def test_stop_strings_end_the_text_before_them_even_across_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    pieces, stopped = stream(tokenizer, text, ["fox jum", "nowhere"])
    assert stopped and "".join(pieces) == "The quick brown "
    pieces, stopped = stream(tokenizer, text, ["nowhere"])
    assert not stopped and "".join(pieces) == text and len([p for p in pieces if p]) > 3


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    tracker = IncrementalText(tokenizer, ["brown cow"])
    sent = ""
    for token in tokenizer("The quick brown fox").input_ids:
        piece, stopped = tracker.add(token)
        sent += piece
        assert not stopped and not sent.endswith("brown")  # "brown" might still become "brown cow"
    assert sent + tracker.flush() == "The quick brown fox"


def test_row_sampler_greedy_rows_take_the_argmax_and_seeded_rows_repeat():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    scores[:, 45:] = 100.0  # ids the tokenizer cannot decode are never chosen, even when most likely

    def rows(seed):
        made = [GenerationRequest(i, [1], Sampling(4, temperature=t, top_p=p), lambda e: None, 0.0)
                for i, (t, p) in enumerate([(0.0, 1.0), (1.0, 1.0), (1.0, 1e-6)])]
        for request in made:
            request.generator.manual_seed(seed)
        return made

    chosen = [RowSampler(rows(seed), vocab_limit=45)(None, scores.clone()).argmax(-1).tolist() for seed in (1, 1, 2, 3)]
    best = scores[:, :45].argmax(-1).tolist()
    assert all(c[0] == best[0] and c[2] == best[2] for c in chosen)  # greedy row; a top_p that keeps one token
    assert chosen[0] == chosen[1] and len({c[1] for c in chosen}) > 1 and max(c[1] for c in chosen) < 45


def test_sampled_frequencies_follow_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    request = GenerationRequest(0, [1], Sampling(1, temperature=1.0, top_p=0.8), lambda e: None, 0.0)
    request.generator.manual_seed(0)
    sampler = RowSampler([request], vocab_limit=4)
    counts = torch.bincount(torch.tensor([sampler(None, logits.clone()).argmax().item() for _ in range(4000)]),
                            minlength=4)
    assert counts[2] == counts[3] == 0  # outside the 0.8 nucleus {0.5, 0.3}
    assert abs(counts[0].item() / 4000 - 0.5 / 0.8) < 0.03


@pytest.fixture(scope="module")
def engine(composed_run):
    from llm_modules.serving.models import load_served_models

    served = load_served_models(composed_run)[0]
    made = BatchEngine(served.model, served.tokenizer, served.stop_ids, BatchLimits(max_queue=4, batch_window_s=0.0),
                       name="test").start()
    yield made, served
    made.close()


def run(engine: BatchEngine, prompt_ids: list[int], sampling: Sampling, deadline: float = 60.0):
    done, events = threading.Event(), []

    def deliver(event):
        events.append(event)
        if event.finish_reason or event.error:
            done.set()

    request = GenerationRequest(0, prompt_ids, sampling, deliver, time.monotonic() + deadline)
    engine.submit([request])
    assert done.wait(60)
    return events, request


def test_a_failing_batch_is_reported_and_the_engine_keeps_serving(engine):
    made, served = engine
    too_long = served.tokenizer("word " * 700).input_ids  # past the GPT-Neo target's 512 positions
    events, _ = run(made, too_long, Sampling(max_tokens=2))
    assert events[-1].error and "512" in events[-1].error and events[-1].status == 500
    events, request = run(made, served.tokenizer("hi").input_ids, Sampling(max_tokens=3, temperature=1.0, seed=0))
    assert events[-1].finish_reason in ("stop", "length") and request.completion_tokens <= 3


def test_a_request_past_its_deadline_in_the_queue_is_refused(engine):
    made, served = engine
    events, request = run(made, served.tokenizer("hi").input_ids, Sampling(max_tokens=3), deadline=-1)
    assert events[-1].status == 503 and "queue" in events[-1].error and request.completion_tokens == 0


def test_each_row_ends_at_its_stop_token_token_limit_deadline_or_cancellation(tokenizer):
    events = []
    settings = [(5, 1e12), (1, 1e12), (5, 0.0), (5, 1e12)]  # (max_tokens, deadline) of rows 0..3
    rows = [GenerationRequest(i, [1], Sampling(max_tokens=m), events.append, deadline)
            for i, (m, deadline) in enumerate(settings)]
    for row in rows:
        row.text = IncrementalText(tokenizer)
    rows[3].cancelled = True  # its client went away
    stepper = BatchStepper(rows, stop_ids={tokenizer.eos_token_id}, gates=None, engine_closed=lambda: False)
    word = tokenizer("fox").input_ids[0]
    assert stepper(torch.tensor([[word]] * 4), None).tolist() == [False, True, True, True]
    assert [r.finish_reason for r in rows] == [None, "length", "length", "cancelled"]
    assert stepper(torch.tensor([[word, tokenizer.eos_token_id]] * 4), None).tolist() == [True] * 4
    assert rows[0].finish_reason == "stop" and rows[0].completion_tokens == 1
    assert sorted(e.index for e in events if e.finish_reason) == [0, 1, 2]  # nothing goes to a client that left
    assert "".join(e.text for e in events if e.index == 0) == tokenizer.decode([word]) and 3 not in {e.index for e in events}


def test_the_queue_is_bounded_and_takes_a_request_whole_or_not_at_all(engine):
    made, served = engine
    ids = served.tokenizer("hi").input_ids
    requests = [GenerationRequest(i, ids, Sampling(max_tokens=1), lambda e: None, time.monotonic() + 60)
                for i in range(5)]
    with pytest.raises(QueueFull, match="limit 4"):
        made.submit(requests)
    assert made.queued == 0
