"""Token ids in, text out, one token at a time: what a stream may send now, and where a stop string cut it.

Written here rather than taken from ``transformers.TextIteratorStreamer`` because that streamer serves one
sequence, knows no stop strings, and releases text by words; a server streams many sequences of one batch and
must never send text that later turns out to belong to a stop string.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import nullcontext

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what decode() shows for an incomplete UTF-8 character


class IncrementalText:
    """The completion's text as tokens arrive, holding back what could still become a stop string.

    ``add(token)`` -> (text that may be sent now, whether a stop string ended the completion).
    ``flush()`` -> the held-back rest, when the completion ends for another reason (length, end token).
    The text sent never contains a stop string, nor anything after one (OpenAI's ``stop``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (),
                 lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        # a fast tokenizer shared with a thread that encodes must not decode at the same time
        self.lock = lock if lock is not None else nullcontext()
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released

    def add(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(int(token_id))
        # Decoding the whole completion each step keeps multi-token characters and merges right; it costs
        # O(length) per token, small next to a forward pass at the lengths the server allows.
        with self.lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):  # half a character: wait for the rest of its bytes
            return "", False
        self.text = text
        if self.stop:
            start = max(0, self.sent - self.longest_stop + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = max(min(hits), self.sent)
                piece, self.sent = text[self.sent:end], len(text)
                return piece, True
        release = len(text) - self._held_back(text)
        if release <= self.sent:
            return "", False
        piece, self.sent = text[self.sent:release], release
        return piece, False

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest unsent suffix of ``text`` that begins some stop string."""
        unsent = len(text) - self.sent
        for size in range(min(unsent, self.longest_stop - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0
