"""Semantic bases (SemAlign §2.1/2.3, Gu et al. arXiv:2510.24208): one direction per vocabulary item.

A model's output head ``W`` [V, D] reads logits as ``z = W h``. The least-squares way back from a
one-hot logit vector ``e_i`` to hidden space is ``s_i = W⁺ e_i`` (column i of the pseudo-inverse,
[D, V]); scaled to unit length it is token i's *semantic basis*. Decomposing a state over the bases
(``a = Sᵀ h/‖h‖``, cosine coefficients) and recomposing it in another model's space with that
model's bases (``h̃ = S_tgt a``) is one fixed linear map, ``M = S_tgt S_srcᵀ`` [D_tgt, D_src]. We
precompute M once (a pinv of each head in fp32) and cache it on disk, fingerprinted by both heads'
weights and the token alignment.

The bases are index-aligned only if the two models share a vocabulary: :func:`align_vocabularies`
checks that and names the first tokens that differ, or (``shared_tokens_only``) pairs the tokens the
two vocabularies have in common by their text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...errors import LLMModulesError
from ...model.processing import describe_differences, vocabulary_differences

MAP_VERSION = 1


class VocabularyMismatchError(LLMModulesError):
    """The source and target vocabularies differ, so their semantic bases are not index-aligned."""


# ------------------------------------------------------------------------------------------- heads
def output_head(model: str | os.PathLike | PreTrainedModel) -> torch.Tensor:
    """The output head ``W`` [V, D] (float32) of a loaded model or a local folder.

    For a folder only the head tensor is read from its safetensors files (the 1.5B source need not
    load); the tied input embedding stands in where the config ties them. Anything else (hub ids,
    .bin checkpoints) loads the model once.
    """
    if isinstance(model, PreTrainedModel):
        return model.get_output_embeddings().weight.detach().float()
    folder = Path(model).expanduser()
    if folder.is_dir() and list(folder.glob("*.safetensors")):
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
        text = config.get("text_config", config)
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        wanted = ["lm_head.weight", "embed_out.weight"]
        if tied:
            wanted += ["model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
                       "model.decoder.embed_tokens.weight", "model.language_model.embed_tokens.weight"]
        for name in wanted:
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    if name in handle.keys():
                        return handle.get_tensor(name).float()
    from ...model.loading import load_causal_lm

    loaded = load_causal_lm("model", str(model))
    head = output_head(loaded)
    del loaded
    return head


# ------------------------------------------------------------------------------------- vocabularies
@dataclass(frozen=True)
class TokenAlignment:
    """Which head rows of the two models mean the same token: ``source_ids[i]`` <-> ``target_ids[i]``."""

    source_ids: list[int]
    target_ids: list[int]
    shared_only: bool

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.source_ids, self.target_ids]).encode())
        return digest.hexdigest()[:16]


def align_vocabularies(
    source: PreTrainedTokenizerBase,
    target: PreTrainedTokenizerBase,
    source_rows: int,
    target_rows: int,
    shared_tokens_only: bool = False,
) -> TokenAlignment:
    """Check that the vocabularies are one (every id both heads produce names the same token, as a mixture head
    needs: ``model.processing.vocabulary_differences``) and return the aligned head rows.

    ``*_rows`` are the heads' row counts (``config.vocab_size`` may exceed ``len(tokenizer)``: padding
    rows carry no token and get no basis; a token past the other head's rows is not aligned). Different vocabularies raise a VocabularyMismatchError that
    names the first differing ids, unless ``shared_tokens_only``: then the tokens both vocabularies
    hold (same text) are paired, whatever their ids.
    """
    differences = vocabulary_differences(source, target, source_rows, target_rows)
    if not differences:  # one vocabulary over every id both heads produce (model/processing.py)
        rows = min(source_rows, target_rows)
        ids = sorted(i for i in source.get_vocab().values() if i < rows)
        return TokenAlignment(ids, ids, False)
    source_vocab = {t: i for t, i in source.get_vocab().items() if i < source_rows}
    target_vocab = {t: i for t, i in target.get_vocab().items() if i < target_rows}
    if shared_tokens_only:
        shared = sorted(set(source_vocab) & set(target_vocab), key=lambda t: source_vocab[t])
        if not shared:
            raise VocabularyMismatchError("the source and target vocabularies share no token; SemAlign cannot align them")
        return TokenAlignment([source_vocab[t] for t in shared], [target_vocab[t] for t in shared], True)
    raise VocabularyMismatchError(
        f"the source and target vocabularies differ ({len(source_vocab)} vs {len(target_vocab)} tokens; first "
        f"differences: {describe_differences(differences, 'source', 'target')}), so their semantic bases are not "
        "index-aligned. Use a pair that shares one tokenizer, or set semalign.shared_tokens_only: true to align over "
        "the tokens both hold"
    )


# ------------------------------------------------------------------------------------------- bases
@dataclass
class SemanticBases:
    """Unit-length semantic bases of one model: ``vectors`` [D, m], one column per aligned token."""

    vectors: torch.Tensor

    @classmethod
    def from_head(cls, head: torch.Tensor, rows: list[int] | None = None) -> SemanticBases:
        """head [V, D] -> bases [D, m]: columns ``rows`` of pinv(head) (fp32), each scaled to unit length."""
        inverse = torch.linalg.pinv(head.float())  # [D, V]
        if rows is not None:
            inverse = inverse[:, torch.as_tensor(rows, dtype=torch.long)]
        return cls(inverse / inverse.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def decompose(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> cosine coefficients [..., m] (``Sᵀ h/‖h‖``)."""
        hidden = hidden.float()
        return (hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ self.vectors

    def recompose(self, coefficients: torch.Tensor) -> torch.Tensor:
        """[..., m] -> [..., D] (``S a``)."""
        return coefficients @ self.vectors.T


def semantic_map(source_head: torch.Tensor, target_head: torch.Tensor, alignment: TokenAlignment,
                 chunk: int = 32768) -> torch.Tensor:
    """``M = S_tgt S_srcᵀ`` [D_tgt, D_src] from the two heads ([V, D] each), summed over aligned tokens.

    The bases are built one model at a time and multiplied in chunks of tokens, so the peak memory is
    one pinv, not two.
    """
    source = SemanticBases.from_head(source_head, alignment.source_ids).vectors  # [D_src, m]
    target_inverse = torch.linalg.pinv(target_head.float())  # [D_tgt, V]
    rows = torch.as_tensor(alignment.target_ids, dtype=torch.long)
    out = torch.zeros(target_inverse.shape[0], source.shape[0])
    for start in range(0, len(rows), chunk):
        block = target_inverse[:, rows[start: start + chunk]]
        block = block / block.norm(dim=0, keepdim=True).clamp_min(1e-12)
        out += block @ source[:, start: start + chunk].T
    return out


def heads_fingerprint(source_head: torch.Tensor, target_head: torch.Tensor, alignment: TokenAlignment) -> str:
    """sha256 over both heads' bytes and the token alignment: what M depends on, exactly."""
    digest = hashlib.sha256(f"v{MAP_VERSION}".encode())
    for head in (source_head, target_head):
        tensor = head.detach().float().contiguous().cpu()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(alignment.fingerprint().encode())
    return digest.hexdigest()[:24]


def cached_semantic_map(source_head: torch.Tensor, target_head: torch.Tensor, alignment: TokenAlignment,
                        folder: str | os.PathLike | None) -> tuple[torch.Tensor, str, bool]:
    """M from ``folder/semantic-map-<fingerprint>.safetensors`` or computed and stored there.

    Returns (M [D_tgt, D_src], fingerprint, whether it came from disk). ``folder=None`` never stores.
    The file name carries the fingerprint of both heads and the alignment, so a map is only ever
    reused for the very heads it was computed from; its metadata repeats the fingerprint and is checked.
    """
    fingerprint = heads_fingerprint(source_head, target_head, alignment)
    path = Path(folder) / f"semantic-map-{fingerprint}.safetensors" if folder is not None else None
    if path is not None and path.exists():
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored != fingerprint:
            raise LLMModulesError(f"{path} holds a map for fingerprint {stored!r}, not {fingerprint!r}; delete it")
        return load_file(str(path))["map"], fingerprint, True
    matrix = semantic_map(source_head, target_head, alignment)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"map": matrix.contiguous()}, str(path), metadata={
            "fingerprint": fingerprint, "shared_tokens_only": str(alignment.shared_only),
            "tokens": str(len(alignment.source_ids)), "version": str(MAP_VERSION)})
    return matrix, fingerprint, False
