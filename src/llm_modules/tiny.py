"""Tiny random models and a self-built tokenizer, for tests, demos and shape benchmarks.

Nothing here reaches a model hub: configs come from real ``transformers`` config classes and the
tokenizer is trained on the spot with ``tokenizers`` (byte-level BPE, no prefix space, which
survives a save/``AutoTokenizer`` round trip whatever model type the folder carries).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

# ChatML-style template; `{% generation %}` marks assistant text so that
# `return_assistant_tokens_mask=True` works for loss masks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A small model learns from a large one.",
    "System: You are a helpful assistant. User: What is 2 + 3? Assistant: 2 + 3 = 5. #### 5",
    "Question: Natalia sold 48 clips in April and half as many in May. How many in total? Answer: 72",
    "Knowledge moves from a frozen source model into a small target through cross-attention.",
    "<|begin_of_thought|> Let me think step by step. <|end_of_thought|> <|begin_of_solution|> 42 <|end_of_solution|>",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 = + - * / ( ) . , ; : ? ! ' \" # $ % & @",
]


def build_tokenizer(
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    extra_special_tokens: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a HF fast tokenizer.

    The result has pad/bos/eos tokens, a ChatML chat template with generation markers and
    character offsets (``return_offsets_mapping``) for the causal cross-attention rule.
    """
    specials = SPECIAL_TOKENS + list(extra_special_tokens or [])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=specials[3:],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _family_kwargs(family: str, vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int) -> dict:
    inter = hidden * 2
    common_llama = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
    )
    table: dict[str, dict] = {
        "qwen2": dict(common_llama, tie_word_embeddings=True),
        "llama": common_llama,
        "mistral": dict(common_llama, sliding_window=None),
        "gemma": dict(common_llama, head_dim=hidden // heads),
        "phi": dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_positions,
        ),
        "gpt_neo": dict(
            vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
            attention_types=[[["global", "local"], max(1, layers // 2)]] if layers % 2 == 0 else [[["global"], layers]],
            window_size=16, max_position_embeddings=max_positions, intermediate_size=inter,
        ),
        "gpt2": dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions),
        "gpt_neox": dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_positions,
        ),
        "opt": dict(
            vocab_size=vocab_size, hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
        ),
    }
    if family not in table:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(table)}")
    return table[family]


TINY_FAMILIES = ("qwen2", "gpt_neo", "llama", "gpt2", "gpt_neox", "opt", "mistral", "phi", "gemma")


def tiny_config(
    family: str,
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> PretrainedConfig:
    """A small config of a real architecture family (``qwen2``, ``gpt_neo``, ``llama``...)."""
    kwargs = _family_kwargs(family, vocab_size, hidden, layers, heads, max_positions)
    if tokenizer is not None:
        kwargs.update(
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_kwargs) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` sized for ``tokenizer``."""
    import torch

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=len(tokenizer), tokenizer=tokenizer, **config_kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Save a model and its tokenizer as an ordinary HF folder; return the folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_composed(folder: str | Path, source: str = "qwen2", target: str = "gpt_neo", seed: int = 0,
                       **options) -> Path:
    """A tiny random composed model saved with ``save_pretrained`` in ``folder``, its tiny source and target
    saved beside it (``folder/source``, ``folder/target``): something to serve or benchmark in seconds.
    ``options``: ``LLMModulesForCausalLM.compose`` options (default 4 heads, adapter 16, no dropout)."""
    import torch

    from .model.modeling import LLMModulesForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer()
    parts = {}
    for role, family, hidden in (("source", source, 48), ("target", target, 32)):
        parts[role] = save_tiny(tiny_model(family, tokenizer, seed=seed, hidden=hidden), tokenizer, folder / role)
    torch.manual_seed(seed)
    model = LLMModulesForCausalLM.compose(
        str(parts["source"]), str(parts["target"]), **{"heads": 4, "adapter_dim": 16, "attention_dropout": 0.0, **options}
    )
    model.save_pretrained(folder / "composed")
    return folder / "composed"
