"""``llm-modules bench``: decode, training and memory benchmarks against the alternatives, in one run.

A developer tool beside the library (it imports ``llm_modules``; the library never imports it). Run it as
``python benchmarks/bench.py`` (``benchmarks/`` is then on ``sys.path``), or as ``llm-modules bench`` in a
source checkout.

Models are built at the paper's real shapes with random weights (performance does not depend on
weight values): a Qwen2-1.5B-shaped source and a GPT-Neo-125M-shaped target, both from their
``transformers`` config classes, nothing from a hub. Every number is a median over repeats after a
warm-up, and every row carries its ratio to a baseline measured in the same run.

Measured:
  decode    tokens/s of the composed model with its caches, a release-style loop that recomputes
            the whole prefix per token, the source alone (HF ``generate``) and the target alone;
            per-token time at several lengths; achieved FLOP/s and (GPU) MFU. Where a whole run is
            too slow (CPU at paper shapes) steps are timed at a few lengths and summed piecewise-linearly;
            the plan's notes say which.
  train     step time, tokens/s, MFU (GPU) and peak memory: composed without cache, composed from the
            source-state cache (source not loaded), the target fine-tuned alone. One fresh subprocess
            each, so that CPU peak memory (process peak RSS) belongs to one configuration.
  bound     weight bytes read per decoded token / measured copy bandwidth, and the fraction reached.
  load      cores used by this benchmark and by other processes during every row and stage.

Modules, each importing only those above it in this list (no circle):
  memory, plan, models, inputs, weights, timing, load, progress, machine, sampling
                  the shared pieces: RSS, what a run measures, the random models and inputs, weight
                  counts, timers, machine load, progress lines, the machine's description, sampled sums
  generation, release_loop, rows, bound
                  timed ``generate``, the release loop (baseline), result rows and ratios, the bandwidth bound
  train_configs, training
                  what each training configuration builds; the training subprocesses
  record, report  what every result records around its rows; the JSON and Markdown files
  bridge, fusion  the two topologies' runs (``--topology bridge|fusion``); neither imports the other
  main            the command line (``bench_main``)
"""
