"""Decode, training and memory benchmarks of the composed model against the alternatives.

    python benchmarks/bench.py --shapes paper --device cpu --quick     # this is `llm-modules bench ...`

The code is the package beside this script, ``benchmarks/composed_bench``. See benchmarks/README.md for what
each number means.
"""

from __future__ import annotations

import sys

from composed_bench.main import bench_main

if __name__ == "__main__":
    raise SystemExit(bench_main(sys.argv[1:]))
