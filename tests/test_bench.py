"""The benchmark runs end to end on tiny shapes and writes its results (no timed assertions)."""

from __future__ import annotations

import json

from composed_bench.bridge import HEADLINE_KEYS
from composed_bench.main import bench_main
from composed_bench.sampling import interpolated_sum, sample_lengths
from composed_bench.train_configs import TRAIN_CONFIGS


def test_bench_runs_end_to_end_on_tiny_shapes(tmp_path, capsys):
    assert bench_main(["--shapes", "tiny", "--quick", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench-tiny-cpu-float32-quick.json").read_text())
    assert set(HEADLINE_KEYS) <= set(result["headline"])
    assert all(isinstance(result["headline"][key], float) for key in HEADLINE_KEYS)
    assert {row["method"] for row in result["decode"]} == {
        "ours_cached", "release_recompute", "source_generate", "target_generate"
    }
    # Both ways of timing: whole runs and sampled lengths (what CPU runs at paper shapes use).
    assert {"whole" in row["measured"] or "sampled" in row["measured"] or "prefix lengths" in row["measured"]
            for row in result["decode"]} == {True}
    assert any("sampled" in row["measured"] for row in result["decode"])
    assert {row["method"] for row in result["decode"] if row["new_tokens"] == 32} == {
        "ours_cached", "release_recompute", "source_generate", "target_generate"
    }
    assert all(row["cpu"]["wall_s"] > 0 for row in result["decode"])
    assert [row["config"] for row in result["train"]] == list(TRAIN_CONFIGS)
    assert all(row["peak_memory_bytes"] > 0 and row["tokens_per_s"] > 0 for row in result["train"])
    assert {b["batch"] for b in result["bound"]} == {1, 2}
    assert result["commit"] and result["machine"]["cpu_cores"]
    markdown = (tmp_path / "bench-tiny-cpu-float32-quick.md").read_text()
    assert "decode_speedup_vs_recompute_256" in markdown and "## Training step" in markdown
    assert "## Headline" in capsys.readouterr().out


def test_release_loop_total_from_sampled_lengths_is_exact_for_linear_cost():
    lengths = sample_lengths(128, 255, 4)
    assert lengths[0] == 128 and lengths[-1] == 255 and len(lengths) == 4
    cost = {n: 0.01 * n for n in lengths}
    assert abs(interpolated_sum(cost, 128, 255) - sum(0.01 * n for n in range(128, 256))) < 1e-9
    # Outside the known lengths the nearest known value holds (sampled cached steps start after a prefill).
    assert abs(interpolated_sum({130: 1.0, 140: 2.0}, 128, 142) - (3 * 1.0 + sum(1 + (n - 130) / 10 for n in range(131, 141)) + 2 * 2.0)) < 1e-9
