"""What every run's result records around its rows: the plan, the commit, the machine (with its load average at
the start), the machine load per stage and the wall time of the run."""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from .bound import BoundRow
from .machine import git_commit, machine_description
from .plan import Plan
from .rows import DecodeRow, TrainRow


class RunRecord:
    """Started with the run (clock and load average); ``load`` collects the stages (``progress.stage``)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.start = time.perf_counter()
        self.load_at_start = os.getloadavg()
        self.load: dict[str, dict] = {}

    def result(self, headline: dict, decode: list[DecodeRow], train: list[TrainRow], bound: list[BoundRow],
               bandwidth: float | None, **first: str) -> dict:
        """The run's JSON result: ``first`` (e.g. the topology) leads, the wall time is taken now."""
        return {
            **first, "plan": asdict(self.plan), "commit": git_commit(),
            "machine": dict(machine_description(self.plan.device), load_average_1_5_15_min_at_start=self.load_at_start),
            "headline": headline, "load": self.load,
            "decode": [asdict(r) for r in decode], "train": [asdict(r) for r in train],
            "bound": [asdict(b) for b in bound], "copy_bandwidth_bytes_per_s": bandwidth,
            "wall_s": time.perf_counter() - self.start,
        }
