"""Streaming text generation from a composed model (KV caches for source, connector and target)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None, raw: bool = False) -> str:
    """The prompt as the model was trained to see it: the chat template when the tokenizer has one."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces as ``model.generate`` produces them (greedy when temperature is 0)."""
    if seed is not None:
        torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
        except BaseException as error:  # re-raised in the caller's thread below
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
