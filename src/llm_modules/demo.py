"""``llm-modules demo``: the project's main job on an embedded default, on CPU.

Until the fact-world harness lands this builds a tiny composed model from self-built parts,
trains it briefly on one sentence and generates from it with KV caches, to prove the path works.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def demo_main(argv: list[str]) -> int:
    try:
        from .compare import demo_main as factworld_demo  # the real demo, once present
    except ImportError:
        factworld_demo = None
    if factworld_demo is not None:
        return factworld_demo(argv)
    parser = argparse.ArgumentParser(prog="llm-modules demo")
    parser.add_argument("--output", default=None)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    from .modeling import LLMModulesForCausalLM
    from .tiny import build_tokenizer, save_tiny, tiny_model

    start = time.perf_counter()
    folder = args.output or tempfile.mkdtemp(prefix="llm-modules-demo-")
    tokenizer = build_tokenizer()
    source = save_tiny(tiny_model("qwen2", tokenizer, hidden=64), tokenizer, f"{folder}/source")
    target = save_tiny(tiny_model("gpt_neo", tokenizer, hidden=32), tokenizer, f"{folder}/target")
    model = LLMModulesForCausalLM.compose(str(source), str(target), heads=4, adapter_dim=32)
    text = "A small model learns from a large one."
    ids = tokenizer(text, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(args.steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    prompt = tokenizer("A small", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    new_tokens = generated.shape[1] - prompt.input_ids.shape[1]
    model.save_pretrained(f"{folder}/composed")
    print(f"composed model built (qwen2 source -> gpt_neo target), trained {args.steps} steps, final loss {loss.item():.3f}")
    print(f"generated {new_tokens} tokens: {tokenizer.decode(generated[0])!r}")
    print(f"saved to {folder}/composed in {time.perf_counter() - start:.1f}s")
    return 0
