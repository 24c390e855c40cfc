"""The lm-evaluation-harness model type ``llm-modules``: a saved composed model (bridge or fusion) in ``lm_eval``.

Importing this module imports ``lm_eval`` (the optional extra ``eval``) and registers the type, after which
``lm_eval.simple_evaluate(model="llm-modules", model_args={"pretrained": RUN_DIR}, ...)`` and
``llm-modules lm-eval run --model llm-modules --model_args pretrained=RUN_DIR ...`` (lm-eval's own command
line) load it. ``import llm_modules`` never imports ``lm_eval``.

It is lm-eval's ``HFLM`` with three changes:
- the model is loaded with :meth:`LLMModulesForCausalLM.from_pretrained` (it references its source); an
  explicit ``dtype`` casts all of it;
- ``loglikelihood`` scores with :func:`~llm_modules.evaluation.loglikelihood.score_continuations`: left-padded
  batches with attention masks, one forward per distinct input, and for a fusion model the source side
  derived from the target's ids. With ``memory="prompt"`` the source reads the request's *context* only, as in
  training (the continuation is what is scored; the source must not read it);
- the context length comes from the target (and source) configs.
``generate_until`` is HFLM's (left padding, stop strings, ``generate()`` with the model's caches): given the
target's ids alone, a fusion model derives what its source reads from the text.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import resolve_max_length
from tqdm import tqdm

from ..errors import LLMModulesError
from ..model.loading import resolve_dtype
from ..model.modeling import LLMModulesForCausalLM
from .loglikelihood import score_continuations

MODEL_TYPE = "llm-modules"
# HFLM loading options that have no meaning for a composed model (it loads its parts from its own folder).
UNSUPPORTED = ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan")


@register_model(MODEL_TYPE)
class LLMModulesLM(HFLM):
    """``lm_eval`` model type for :class:`LLMModulesForCausalLM` (``pretrained``: a folder or a loaded model).

    Model args besides HFLM's usual ones (``device``, ``batch_size``, ``dtype``, ``max_length``...):
    none; ``batch_size`` must be a number (HFLM's ``auto`` probes with dummy inputs, which a fusion model
    would decode as text).
    """

    def __init__(self, pretrained: str | LLMModulesForCausalLM, **kwargs: Any) -> None:
        if str(kwargs.get("batch_size", 1)).startswith("auto"):
            raise LLMModulesError("batch_size=auto is not supported for a composed model; give a number")
        given = [name for name in UNSUPPORTED if kwargs.get(name)]
        if given:
            raise LLMModulesError(f"{', '.join(given)} cannot be used with model type {MODEL_TYPE!r}")
        if isinstance(pretrained, LLMModulesForCausalLM) and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = pretrained.tokenizer
        kwargs["backend"] = "causal"
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, pretrained: str, revision: str | None = "main", dtype: Any = "auto", **kwargs: Any) -> None:
        """Load the composed model (its source from its reference). ``dtype`` (other than ``auto``: the saved
        dtypes) casts all of it, source included."""
        self._model = LLMModulesForCausalLM.from_pretrained(pretrained, revision=revision)
        if dtype not in (None, "auto"):
            self._model.to(resolve_dtype(dtype) if isinstance(dtype, str) else dtype)

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        parts = [self.model.target] + ([self.model.source] if self.model.source is not None else [])
        return min(resolve_max_length(part.config, None, default=self._DEFAULT_MAX_LENGTH) for part in parts)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """requests: ((context, continuation) strings or None, context ids, continuation ids) -> (log p, greedy)."""
        model: LLMModulesForCausalLM = self.model
        extra = None
        if model.config.topology == "fusion":
            def extra(ids, mask, prompt_lengths):  # the source side of target ids; prompt memory reads the context
                return model.processor.align_ids(ids, mask, prompt_lengths=prompt_lengths)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        results = score_continuations(model, [(context, continuation) for _, context, continuation in requests], pad,
                                      batch_size=override_bs or int(self.batch_size), max_length=self.max_length,
                                      extra_inputs=extra, progress=bar.update)
        bar.close()
        for (key, _, _), answer in zip(requests, results):
            if key is not None:  # loglikelihood_rolling's windows have no key
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results
