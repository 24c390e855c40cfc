"""The real transfer table: real models, real held-out questions (ARC-Challenge, MMLU), every method on one budget.

``llm-modules compare --config examples/real-arc.yaml``. Modules, one concept each:

- ``questions``: the fixed transfer and held-out questions (recorded by id) and their letter format;
- ``source_pass``: the frozen source reads every prompt once; its states are cached and its letter logits kept;
- ``rows``: each row as a letter scorer (target alone, SFT, LoRA-SFT, KD, the bridge, fusion) and its training;
- ``table``: the resumable runner (a finished row is written at once, skipped on restart), the report and the plot.
"""
