"""Kill -9 fuzz: SIGKILL ``llm-modules train`` at random moments, resume, and compare with an uninterrupted run.

    python scripts/kill_fuzz.py [--trials 5] [--seed 0] [--steps 16] [--out benchmarks/results/kill-fuzz.md]

Tiny random models (llm_modules.tiny), CPU, a source-state cache built one row per shard. Each
trial starts a fresh run, kills it with SIGKILL in one phase (during the cache build, while a
checkpoint is being written, during a training step), records what the kill left on disk, checks
that every file a manifest or seal vouches for verifies, resumes (``--resume auto`` when a sealed
checkpoint exists, else a plain restart reusing the cache) and compares the final loss and
weights with the uninterrupted run. Exits 1 if any resume differs by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from llm_modules.tiny import build_tokenizer, save_tiny, tiny_model
from llm_modules.training.cache import MANIFEST, shard_problem
from llm_modules.training.checkpoints import SEAL, checkpoint_folders, last_good_checkpoint, verify

PHASES = ("cache build", "checkpoint write", "step")


def setup(folder: Path, rows: int) -> dict[str, str]:
    tokenizer = build_tokenizer()
    save_tiny(tiny_model("qwen2", tokenizer, seed=0, hidden=48), tokenizer, folder / "source")
    save_tiny(tiny_model("gpt_neo", tokenizer, seed=0), tokenizer, folder / "target")
    data = folder / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i + 3}?", "answer": f"{i} + {i + 3} = {2 * i + 3}. "
                                        f"#### {2 * i + 3}"}) + "\n" for i in range(rows)))
    return {"source": str(folder / "source"), "target": str(folder / "target"), "data": str(data)}


def command(paths: dict[str, str], output: Path, steps: int, save_steps: int, resume: str | None) -> list[str]:
    options = {**paths, "output": output, "heads": 4, "adapter_dim": 16, "max_steps": steps, "batch_size": 4,
               "validation": 0, "logging_steps": 1, "report_to": "none", "progress": "false", "save_steps": save_steps,
               "save_total_limit": 3, "seed": 7, "cache": "auto", "cache_dtype": "float32", "cache_batch_size": 1,
               "cache_shard_mb": 0.0001, "device": "cpu"}
    if resume:
        options["resume"] = resume
    return [sys.executable, "-m", "llm_modules.cli", "train", *[f"--{k}={v}" for k, v in options.items()]]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def final_state(output: Path, steps: int) -> tuple[float, dict]:
    """The loss logged at the last step and the saved trainable weights of a finished run."""
    history = json.loads((output / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    loss = [e["loss"] for e in history if "loss" in e and e["step"] == steps][-1]
    return loss, load_file(output / "model.safetensors")


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0, poll: float = 0.0005) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll)
    return False


def logged_steps(log: Path) -> int:
    return log.read_text(errors="replace").count("'loss':") if log.exists() else 0


def kill_during(phase: str, process: subprocess.Popen, output: Path, log: Path, rng: random.Random,
                steps: int, save_steps: int) -> str:
    """Wait for the phase, SIGKILL inside it; return what the kill was aimed at."""
    cache = output / "source-cache"
    if phase == "cache build":
        reached = wait_for(lambda: cache.is_dir() and any(cache.glob("states-*")), process)
        aim = "after the first cache shard, + {:.0f} ms"
        delay = rng.uniform(0.0, 0.4)
    elif phase == "checkpoint write":
        step = rng.choice(range(2 * save_steps, steps, save_steps))  # a sealed checkpoint precedes it
        reached = wait_for(lambda: (output / f"checkpoint-{step}").is_dir(), process)
        aim = f"as checkpoint-{step} appeared, + {{:.0f}} ms"
        delay = rng.uniform(0.0, 0.01)
    else:
        step = rng.randrange(1, steps - 1)
        reached = wait_for(lambda: logged_steps(log) >= step, process, poll=0.005)
        aim = f"after step {step} was logged, + {{:.0f}} ms"
        delay = rng.uniform(0.0, 0.15)
    time.sleep(delay)
    if not reached or process.poll() is not None:
        return "missed: the run ended before the phase was reached"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return aim.format(delay * 1000)


def snapshot(output: Path) -> dict:
    """What the kill left: checkpoints (sealed or not), cache shards listed or not, temporaries; and whether every
    file vouched for by a seal or a manifest verifies."""
    cache = output / "source-cache"
    checkpoints = {p.name: (p / SEAL).exists() for p in checkpoint_folders(output)}
    vouched_ok = all(verify(output / name) for name, sealed in checkpoints.items() if sealed)
    listed = json.loads((cache / MANIFEST).read_text())["shards"] if (cache / MANIFEST).exists() else {}
    parts = {}
    for part in cache.glob("manifest.part-*.json") if cache.is_dir() else []:
        parts.update(json.loads(part.read_text())["shards"])
    for name, record in {**listed, **parts}.items():  # a shard vouched for by a manifest must verify
        vouched_ok &= shard_problem(cache / name, record) is None
    shards = sorted(p.name for p in cache.glob("states-*")) if cache.is_dir() else []
    temporaries = sorted(str(p.relative_to(output)) for p in output.rglob(".*tmp-*"))
    return {"checkpoints": checkpoints, "shards on disk": len(shards), "shards vouched for": len(listed) + len(parts),
            "manifest": bool(listed), "temporaries": temporaries, "vouched files verify": bool(vouched_ok)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", help="write the report (markdown) here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = setup(work, args.rows)
    started = time.time()
    base_out = work / "uninterrupted"
    base = start(command(paths, base_out, args.steps, args.save_steps, None), work / "uninterrupted.log")
    if base.wait() != 0:
        print((work / "uninterrupted.log").read_text()[-3000:])
        return 1
    base_loss, base_weights = final_state(base_out, args.steps)
    lines = [f"uninterrupted run: final loss {base_loss!r} at step {args.steps} "
             f"({time.time() - started:.0f} s)", ""]
    phases = [PHASES[i % len(PHASES)] for i in range(args.trials)]
    rng.shuffle(phases)
    worst = 0.0
    for trial, phase in enumerate(phases, start=1):
        output = work / f"trial-{trial}"
        log = work / f"trial-{trial}.log"
        for attempt in range(3):  # a kill aimed too late (the phase was over) is tried again
            process = start(command(paths, output, args.steps, args.save_steps, None), log)
            aim = kill_during(phase, process, output, log, rng, args.steps, args.save_steps)
            state = snapshot(output)
            hit = _hit(phase, state)
            if hit or attempt == 2:
                break
            shutil.rmtree(output, ignore_errors=True)
        good = last_good_checkpoint(output)
        resume_log = work / f"trial-{trial}-resume.log"
        resumed = start(command(paths, output, args.steps, args.save_steps, "auto" if good else None), resume_log)
        code = resumed.wait()
        text = resume_log.read_text(errors="replace")
        if code != 0:
            lines.append(f"trial {trial} ({phase}): resume FAILED (exit {code}):\n```\n{text[-2000:]}\n```")
            worst = float("inf")
            continue
        loss, weights = final_state(output, args.steps)
        diff = abs(loss - base_loss)
        weight_diff = max(float((weights[k] - base_weights[k]).abs().max()) for k in base_weights)
        worst = max(worst, diff)
        said = [line for line in text.splitlines() if line.startswith(("skipping", "resuming from", "source-state cache"))]
        lines += [
            f"## trial {trial}: kill -9 during {phase} (attempt {attempt + 1}: {aim}; landed in the phase: {hit})",
            f"- left on disk: {json.dumps(state)}",
            f"- resumed {'from ' + good.name if good else 'from scratch (no sealed checkpoint), reusing the cache'}; "
            f"the resumed run said:",
            *[f"    {line}" for line in said],
            f"- final loss {loss!r}: |difference| {diff:.2e}; largest weight difference {weight_diff:.2e}",
            "",
        ]
    lines.append(f"largest final-loss difference over {args.trials} kills: {worst:.2e} (tolerance {args.tolerance:g}); "
                 f"total {time.time() - started:.0f} s")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        header = (f"# kill -9 fuzz\n\n`python scripts/kill_fuzz.py --trials {args.trials} --seed {args.seed} "
                  f"--steps {args.steps}` (tiny models, CPU)\n\n")
        Path(args.out).write_text(header + report)
    return 0 if worst <= args.tolerance else 1


def _hit(phase: str, state: dict) -> bool:
    """Whether the kill landed inside the phase it aimed at, judged from what it left on disk."""
    if phase == "cache build":
        return not state["manifest"] and not state["checkpoints"]
    if phase == "checkpoint write":
        return any(not sealed for sealed in state["checkpoints"].values())
    return state["manifest"] and all(state["checkpoints"].values())


if __name__ == "__main__":
    sys.exit(main())
