"""What ``llm-modules serve`` serves: the composed model, and with ``--compare`` its source and its target alone.

Each served model has its own tokenizer, prompt renderer (the model's chat template, or the layout the composed
model was trained with), end-of-turn tokens, context length and batch engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LLMModulesError
from ..model.configuration import check_can_defer
from ..model.loading import load_causal_lm, load_tokenizer
from ..training.data import Renderer
from .batching import BatchEngine, BatchLimits

ROLES = ("composed", "source", "target")
DEFAULT_CONTEXT = 2048  # when no config states a context length
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SENTINEL = "\u2063llm-modules-end-of-turn\u2063"


@dataclass(eq=False)
class ServedModel:
    """One model behind the API, with everything a request needs to become token ids and back."""

    id: str
    role: str                       # "composed" | "source" | "target"
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    renderer: Renderer
    context_length: int             # prompt + completion tokens the model can take
    stop_ids: set[int]              # end-of-sequence and end-of-turn tokens
    system_prompt: str | None = None  # the composed model's training system prompt, used when a chat has none
    note: str | None = None         # shown in /v1/models and on the page
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the tokenizer across threads
    engine: BatchEngine | None = None

    def start(self, limits: BatchLimits) -> ServedModel:
        self.engine = BatchEngine(self.model, self.tokenizer, self.stop_ids, limits, self.lock, self.id).start()
        return self

    def render(self, messages: Sequence[dict]) -> str:
        """The chat as the model reads it, ending where the assistant's answer begins."""
        messages = list(messages)
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.renderer.render(messages, add_generation_prompt=True)

    def encode(self, text: str, chat: bool) -> list[int]:
        """Token ids of ``text``. A rendered chat already holds its special tokens (no second BOS)."""
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=not chat).input_ids)

    def card(self) -> dict:
        return {"context_length": self.context_length,
                "gate_values": hasattr(self.model, "gate_values"), **({"note": self.note} if self.note else {})}


# ----------------------------------------------------------------------------------------------- loading
def load_served_models(run: str | Path, compare: Sequence[str] = (), device: str = "cpu",
                       name: str | None = None, max_model_len: int | None = None,
                       defer_threshold: float | None = None, cpu_linear: str = "torch") -> list[ServedModel]:
    """The composed model saved in ``run`` and, for each role in ``compare`` ("source", "target"), that model
    alone. Errors a user can fix (no such folder, a target that exists only as a config) are ``LLMModulesError``.
    ``defer_threshold``: serve the composed model with deferral decoding at this η (its saved η otherwise).
    ``cpu_linear="onednn"``: every float32 linear layer of every served model through oneDNN (``model/onednn.py``:
    the same numbers, faster on a CPU, most of all for a deferral's catch-up over several tokens)."""
    from ..model.modeling import LLMModulesForCausalLM
    from ..model.onednn import OneDNNLinear, check_cpu_linear, for_decoding

    check_cpu_linear(cpu_linear, device)  # before anything loads

    unknown = sorted(set(compare) - {"source", "target"})
    if unknown:
        raise LLMModulesError(f"--compare takes 'source', 'target' or 'source,target'; got {','.join(unknown)}")
    folder = Path(run).expanduser()
    if not folder.is_dir():
        raise LLMModulesError(f"{folder} is not a folder; give a folder written by save_pretrained() / llm-modules train")
    composed = LLMModulesForCausalLM.from_pretrained(folder).to(device).eval()
    if defer_threshold is not None:
        composed.config.defer_threshold = defer_threshold
        check_can_defer(composed.config)  # the error says why this composition cannot defer
    tokenizer = composed.tokenizer or load_tokenizer(str(folder), "saved model")
    settings = _trained_settings(folder)
    served = [_served(name or folder.name, "composed", composed, tokenizer, max_model_len, settings)]
    if "source" in compare:
        served.append(_source_alone(composed, device, max_model_len))
    if "target" in compare:
        served.append(_target_alone(composed, tokenizer, device, max_model_len))
    _unique_ids(served)
    for model in served:  # served models only decode
        for_decoding(model.model, cpu_linear, device)
        if cpu_linear == "onednn":  # said at start-up and in /v1/models: a bfloat16 model has nothing to swap
            # counted, not taken from the swap: the source alone is the composed model's own, swapped with it
            swapped = sum(isinstance(m, OneDNNLinear) for m in model.model.modules())
            said = (f"{swapped} float32 linear layers through oneDNN" if swapped else
                    f"--cpu-linear onednn swapped nothing (no frozen float32 linear layers: the model is {model.model.dtype})")
            model.note = "; ".join(filter(None, [model.note, said]))
    return served


def _trained_settings(folder: Path) -> dict:
    from ..evaluation.evaluate import training_settings  # the template and system prompt training used

    return training_settings(folder)


def _served(model_id: str, role: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            max_model_len: int | None, settings: dict | None = None, note: str | None = None) -> ServedModel:
    settings = settings or {}
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    template = settings.get("template") or ("chat" if getattr(tokenizer, "chat_template", None) else "plain")
    renderer = Renderer(tokenizer, template, settings.get("append_eos", True))
    length = context_length(model)
    if max_model_len:
        length = min(length, max_model_len)
    if template == "plain" and role != "composed":
        note = " ".join(filter(None, [note, "no chat template: chats use the plain System:/User:/Assistant: layout"]))
    return ServedModel(id=model_id, role=role, model=model, tokenizer=tokenizer, renderer=renderer,
                       context_length=length, stop_ids=stop_token_ids(model, tokenizer, renderer),
                       system_prompt=settings.get("system_prompt"), note=note)


def _source_alone(composed: PreTrainedModel, device: str, max_model_len: int | None) -> ServedModel:
    reference = composed.config.source_name_or_path
    if not reference:
        raise LLMModulesError("--compare source: the saved model's config names no source (source_name_or_path)")
    source = getattr(composed, "source", None)
    # The composed model's frozen source, when it holds the whole causal LM (the bridge does), is the same model
    # AutoModelForCausalLM.from_pretrained(source_name_or_path) would load: serve it without a second copy. It is
    # frozen and in eval mode, and generate() keeps its state in per-call caches, so two threads may share it.
    if not (isinstance(source, PreTrainedModel) and isinstance(source, GenerationMixin)
            and source.get_output_embeddings() is not None):
        source = load_causal_lm("source", reference, composed.config.source_revision,
                                composed.config.source_dtype).to(device)
    tokenizer = load_tokenizer(reference, "source")
    return _served(Path(str(reference)).name, "source", source.eval(), tokenizer, max_model_len)


def _target_alone(composed: PreTrainedModel, fallback: PreTrainedTokenizerBase, device: str,
                  max_model_len: int | None) -> ServedModel:
    config = composed.config
    reference = getattr(config, "target_name_or_path", None)
    if not reference:
        raise LLMModulesError(
            "--compare target: this model's target was given as a config (random weights, "
            f"target_init={getattr(config, 'target_init', None)!r}), so there is no target model to serve alone; "
            "use --compare source"
        )
    if not Path(str(reference)).expanduser().exists() and str(reference).startswith((".", "/", "~")):
        raise LLMModulesError(f"--compare target: the target folder {reference} named in the saved config does not exist")
    target = load_causal_lm("target", str(reference))
    tokenizer, note = fallback, "no tokenizer in the target's folder: it reads the composed model's tokenizer"
    folder = Path(str(reference)).expanduser()
    if not folder.is_dir() or any((folder / name).exists() for name in TOKENIZER_FILES):
        # (transformers 5 builds an empty tokenizer for a folder that has none, hence the look first)
        try:
            tokenizer, note = load_tokenizer(str(reference), "target"), None
        except LLMModulesError:
            pass
    if getattr(config, "target_init", "pretrained") == "random":
        note = " ".join(filter(None, [note, "the composed model's target started from random weights, not these"]))
    return _served(Path(str(reference)).name, "target", target.to(device).eval(), tokenizer, max_model_len, note=note)


def _unique_ids(served: list[ServedModel]) -> None:
    seen: set[str] = set()
    for model in served:
        if model.id in seen:
            model.id = f"{model.id}-{model.role}"
        seen.add(model.id)


# ----------------------------------------------------------------------------------------------- details
def context_length(model: PreTrainedModel) -> int:
    """The smallest context any part of ``model`` states (a composed model's config holds its source's and target's)."""
    configs: list = [model.config]
    for key in ("source_config", "target_config"):
        nested = getattr(model.config, key, None)
        if isinstance(nested, dict):
            configs += [nested, nested.get("text_config") or {}]
    found = []
    for config in configs:
        if not isinstance(config, dict):
            config = config.get_text_config().to_dict()
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(config.get(key), int) and config[key] > 0:
                found.append(config[key])
                break
    return min(found, default=DEFAULT_CONTEXT)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, renderer: Renderer) -> set[int]:
    """End-of-sequence ids (generation config, tokenizer) and the special token that ends an assistant turn in the
    model's chat template (found by rendering a turn and reading what follows its text)."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(v for v in (value if isinstance(value, list) else [value]) if v is not None)
    try:
        text = renderer.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}])
    except Exception:  # a template that refuses this chat: the end-of-sequence ids must do
        return ids
    after = text.split(_SENTINEL, 1)[-1] if _SENTINEL in text else ""
    following = tokenizer(after, add_special_tokens=False).input_ids[:1]
    if following and following[0] in set(tokenizer.all_special_ids):
        ids.add(following[0])
    return ids
