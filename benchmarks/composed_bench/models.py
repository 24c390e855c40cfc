"""The benchmark's models: the paper's shapes (or tiny ones) with random weights, built from ``transformers``
config classes, nothing from a hub; the composed bridge and fusion models on them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPTNeoConfig, PreTrainedConfig, PreTrainedModel, Qwen2Config
from transformers.initialization import no_init_weights

from llm_modules.model.modeling import LLMModulesForCausalLM
from llm_modules.tiny import build_tokenizer, tiny_config

from .plan import Plan


def tiny_shapes(family: str, vocab_size: int) -> PreTrainedConfig:
    """The tiny stand-in of one side: 2 layers, 64 wide, 4 heads."""
    return tiny_config(family, vocab_size=vocab_size, hidden=64, layers=2, heads=4, max_positions=2048,
                       tokenizer=build_tokenizer())


def source_config(shapes: str) -> PreTrainedConfig:
    """Qwen2-1.5B's config (paper) or a tiny Qwen2."""
    if shapes == "tiny":
        return tiny_shapes("qwen2", 1024)
    return Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        use_sliding_window=False, sliding_window=None, max_window_layers=28, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
    )


def target_config(shapes: str) -> PreTrainedConfig:
    """GPT-Neo-125M's config (paper: 12 layers alternating global/local window 256) or a tiny GPT-Neo."""
    if shapes == "tiny":
        return tiny_shapes("gpt_neo", 512)
    return GPTNeoConfig(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        activation_function="gelu_new", embed_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
    )


def random_causal_lm(config: PreTrainedConfig, dtype: torch.dtype, device: str, seed: int = 0) -> PreTrainedModel:
    """A causal LM from ``config`` with N(0, 0.02) weights, filled in place (HF's init is 3x slower at 1.5B)."""
    torch.manual_seed(seed)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights skips the tying: Qwen2-1.5B and GPT-Neo-125M share embedding and head
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:  # norms
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def compose(shapes: str, source: PreTrainedModel | None, device: str) -> LLMModulesForCausalLM:
    """The composed model (paper defaults) on a loaded source, or without it (source-state cache)."""
    torch.manual_seed(1)
    tokenizer = build_tokenizer()
    if source is None:
        model = LLMModulesForCausalLM.compose(
            None, target_config(shapes), source_config=source_config(shapes), tokenizer=tokenizer, target_init="random"
        )
    else:
        model = LLMModulesForCausalLM.compose(source, target_config(shapes), tokenizer=tokenizer, target_init="random")
    return model.to(device)


def compose_fusion(plan: Plan, source: nn.Module | None, target: nn.Module, memory: str) -> LLMModulesForCausalLM:
    """Fusion with the paper's shapes: blocks before every 4th GPT-Neo layer (3 blocks), tanh gates at 0."""
    torch.manual_seed(1)
    tokenizer = build_tokenizer()  # stands in for both tokenizers: the inputs below are ids, given explicitly
    common = dict(tokenizer=tokenizer, source_tokenizer=tokenizer, topology="fusion", memory=memory,
                  attention_dropout=0.0)
    if source is None:
        return LLMModulesForCausalLM.compose(None, target, source_config=source_config(plan.shapes), **common)
    return LLMModulesForCausalLM.compose(source, target, **common)
