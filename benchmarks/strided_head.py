"""Why ``modeling.with_row_major_strides`` exists: the source's head, fed the slices deferral's catch-up makes.

    python benchmarks/strided_head.py      # Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct (real-models.py), bf16

Deferral decodes one GSM8K answer (24 tokens, the gate of ``defer_gsm8k.py`` if it was trained, else a random one
at η = 0.5). At each source call its head needs the last position of the chunk the source read: ``states[:, -1:]``,
a [1, 1, d] view whose first stride is P*d (torch counts it as contiguous). For each call the script times the head
on that view as it comes and on a row-major copy, and prints both. Measured on this project's 2-core AMD EPYC
(torch 2.13 CPU, bf16, 1 thread): 2.2-2.6 s on views of chunks longer than one token against 0.045 s on the copy;
a view made the same way outside decoding (a fresh process, one forward) was fast, so the script reproduces the
decoding context rather than a bare slice.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import defer_gsm8k


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> int:
    model = defer_gsm8k.compose(defer_gsm8k.MODELS / "qwen2.5-coder-1.5b-instruct",
                                defer_gsm8k.MODELS / "qwen2.5-coder-0.5b-instruct", torch.bfloat16)
    gate = Path(defer_gsm8k.RESULTS).with_suffix(".gate.safetensors")
    if gate.exists():
        model.head.mixture.mix_gate.load_state_dict(load_file(gate))
    head = model.source.get_output_embeddings()
    calls = []

    def timed_source_logits(states: torch.Tensor) -> torch.Tensor:
        as_given = seconds(lambda: head(states))
        copied = seconds(lambda: head(states.clone(memory_format=torch.contiguous_format)))
        calls.append((states.stride(), as_given, copied))
        return original(states)

    original, model.source_logits = model.source_logits, timed_source_logits
    question = defer_gsm8k.read_rows(defer_gsm8k.GSM8K / "test.jsonl", 3)[2]["question"]
    ids = defer_gsm8k.prompt_ids(model.tokenizer, question)
    model.config.defer_threshold = 0.5
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                   do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; per source call: strides, head on the view "
          "as given, head on a row-major copy")
    for stride, as_given, copied in calls:
        print(f"{str(stride):>22}  {as_given:.3f} s  {copied:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
