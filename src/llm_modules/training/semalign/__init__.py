"""SemAlign (Gu, Aleti, Chen, Zhang; arXiv:2510.24208): the small model learns the large one's layer
outputs through the two models' semantic bases, then runs alone. One concept per module:

- ``bases``: semantic bases, the vocabulary check, the fixed map M = S_tgt S_srcᵀ (cached on disk);
- ``layers``: decoder layers and their taps, Gradient x Activation, the depth map and the pairs;
- ``objective``: v1 (cosine) and v2 (centred Gram + KL, frontier) losses;
- ``options``: the ``semalign:`` section of a run config;
- ``models``: the source's taps and what of the target trains (LoRA through PEFT, paired layers, all);
- ``plan``: M + attribution + pairs for a run, with its report and plot;
- ``train``: ``llm-modules train --method semalign`` on transformers' Trainer;
- ``factworld``: the ``semalign`` method of the fact-world comparison.
"""

from .bases import SemanticBases, TokenAlignment, VocabularyMismatchError, align_vocabularies, semantic_map
from .layers import LayerPair, choose_pairs, depth_map, gradient_x_activation, interpolation, partner
from .options import SemAlignOptions, options_from_mapping

__all__ = [
    "LayerPair",
    "SemAlignOptions",
    "SemanticBases",
    "TokenAlignment",
    "VocabularyMismatchError",
    "align_vocabularies",
    "choose_pairs",
    "depth_map",
    "gradient_x_activation",
    "interpolation",
    "options_from_mapping",
    "partner",
    "semantic_map",
]
