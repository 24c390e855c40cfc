"""Load test of ``llm-modules serve`` on loopback: N concurrent streaming clients for D seconds, against one client
sending the same kind of requests one after another.

    python benchmarks/serve_load.py                         # a tiny random composed model, 32 clients x 60 s
    python benchmarks/serve_load.py --run runs/x --clients 64 --duration 120 --max-tokens 64

The server runs as its own process (``python -m llm_modules.cli serve RUN``), so that its memory (RSS, sampled
every 0.5 s) is the server's alone. Each client sends streaming chat completions (``stream_options.include_usage``)
back to back until the phase ends; a request counts as an error when its status is not 200, its stream carries an
error event or ends without ``[DONE]``, or the connection fails. Time to first token = request sent -> first
chunk with text. Aggregate tokens/s = completion tokens of all requests / wall time of the phase (until the last
request started in it has finished). Writes ``serve-load-{name}.json`` and ``.md`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

import llm_modules

from composed_bench.machine import git_commit, machine_description

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "the quick brown fox jumps over a lazy dog while a small model learns from a large one".split()


@dataclass
class Sample:
    """One request as a client saw it."""

    ok: bool
    seconds: float
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Phase:
    clients: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.ok]
        ttft = sorted(s.ttft for s in ok if s.ttft is not None)
        tokens = sum(s.tokens for s in ok)
        errors = [s.error for s in self.samples if not s.ok]
        return {
            "clients": self.clients, "wall_s": round(self.wall_s, 2), "requests": len(self.samples),
            "errors": len(errors), "error_rate": round(len(errors) / max(len(self.samples), 1), 4),
            "error_examples": sorted(set(errors))[:5],
            "ttft_p50_s": quantile(ttft, 0.5), "ttft_p99_s": quantile(ttft, 0.99), "ttft_max_s": quantile(ttft, 1.0),
            "request_p50_s": quantile(sorted(s.seconds for s in ok), 0.5),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else None,
            "requests_per_s": round(len(ok) / self.wall_s, 2) if self.wall_s else None,
        }


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted ``values``."""
    if not values:
        return None
    return round(values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))], 4)


# ----------------------------------------------------------------------------------------------- clients
def chat_body(rng: random.Random, max_tokens: int) -> dict:
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    return {"model": "composed", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": rng.randrange(2**31), "stream": True, "stream_options": {"include_usage": True}}


async def one_request(http: httpx.AsyncClient, body: dict) -> Sample:
    started = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(False, time.perf_counter() - started, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return Sample(False, time.perf_counter() - started, error=event["error"]["message"][:120])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if ttft is None and any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - started
    except (httpx.HTTPError, OSError) as error:
        return Sample(False, time.perf_counter() - started, error=f"{type(error).__name__}: {error}"[:120])
    seconds = time.perf_counter() - started
    if not done:
        return Sample(False, seconds, error="stream ended without [DONE]")
    return Sample(True, seconds, ttft if ttft is not None else seconds, tokens)


async def run_phase(url: str, clients: int, duration: float, max_tokens: int, seed: int) -> Phase:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(connect=10, read=600, write=60, pool=60)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        started = time.perf_counter()
        until = started + duration
        samples: list[Sample] = []

        async def client(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < until:
                samples.append(await one_request(http, chat_body(rng, max_tokens)))

        await asyncio.gather(*(client(i) for i in range(clients)))
        return Phase(clients, time.perf_counter() - started, samples)


# ------------------------------------------------------------------------------------------------ server
class MemorySampler:
    """RSS of one process every ``every`` seconds, in a thread: (seconds since start, bytes)."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.process, self.every = psutil.Process(pid), every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter() - self.start, self.process.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(self.every)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(llm_modules.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "llm_modules.cli", "serve", str(run), "--model-name", "composed",
               "--port", str(port), "--log-level", "warning", *extra]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise SystemExit(f"the server did not answer /health within 300 s; see {log}")


def health(url: str) -> dict:
    return next(m for m in httpx.get(f"{url}/health", timeout=10).json()["models"] if m["role"] == "composed")


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a saved composed model (default: build a tiny random one)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the concurrent phase")
    parser.add_argument("--sequential-duration", type=float, default=20.0, help="seconds of the one-client phase")
    parser.add_argument("--max-tokens", type=int, default=32, help="per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="more `llm-modules serve` options, e.g. '--device cuda'")
    parser.add_argument("--name", default=None, help="results file name part (default: tiny-cpu or the run's name)")
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args(argv)

    scratch = tempfile.TemporaryDirectory(prefix="serve-load-")
    if args.run is None:
        from llm_modules.tiny import save_tiny_composed

        run, name = save_tiny_composed(Path(scratch.name) / "tiny"), args.name or "tiny-cpu"
    else:
        run, name = Path(args.run), args.name or Path(args.run).name
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(scratch.name) / "server.log"
    server = start_server(run, port, args.server_args.split(), log)
    memory = MemorySampler(server.pid)
    result: dict = {"commit": git_commit(), "machine": dict(machine_description("cpu"), server_pid_threads=None),
                    "settings": vars(args) | {"run": str(run)}}
    try:
        print(f"server up on {url}; warm-up", file=sys.stderr)
        asyncio.run(run_phase(url, 2, 2.0, args.max_tokens, args.seed + 99))
        result["machine"]["server_pid_threads"] = psutil.Process(server.pid).num_threads()

        print(f"sequential: 1 client for {args.sequential_duration:.0f} s", file=sys.stderr)
        before, start = health(url), memory.now()
        sequential = asyncio.run(run_phase(url, 1, args.sequential_duration, args.max_tokens, args.seed))
        after = health(url)
        result["sequential"] = sequential.summary() | batching(before, after)

        print(f"concurrent: {args.clients} clients for {args.duration:.0f} s", file=sys.stderr)
        before, start = health(url), memory.now()
        concurrent = asyncio.run(run_phase(url, args.clients, args.duration, args.max_tokens, args.seed + 1))
        end = memory.now()
        after = health(url)
        result["concurrent"] = concurrent.summary() | batching(before, after)
        result["memory"] = memory_summary(memory, start, end)
        result["server_alive_after"] = server.poll() is None and httpx.get(f"{url}/health").status_code == 200
    finally:
        memory.stop()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    result["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    seq, con = result["sequential"], result["concurrent"]
    result["headline"] = {
        "error_rate": con["error_rate"], "ttft_p50_s": con["ttft_p50_s"], "ttft_p99_s": con["ttft_p99_s"],
        "tokens_per_s": con["tokens_per_s"], "sequential_tokens_per_s": seq["tokens_per_s"],
        "throughput_vs_sequential": round(con["tokens_per_s"] / seq["tokens_per_s"], 2) if seq["tokens_per_s"] else None,
        "mean_batch_rows": con["mean_batch_rows"],
        "rss_growth_second_half_mib": result["memory"]["growth_second_half_mib"],
        "server_alive_after": result["server_alive_after"],
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-load-{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"serve-load-{name}.md").write_text(markdown(result, name))
    print(markdown(result, name))
    return 0 if result["server_alive_after"] else 1


def batching(before: dict, after: dict) -> dict:
    batches = after["batches"] - before["batches"]
    rows = after["sequences"] - before["sequences"]
    return {"batches": batches, "mean_batch_rows": round(rows / batches, 2) if batches else None,
            "cancelled": after["cancelled"] - before["cancelled"]}


def memory_summary(memory: MemorySampler, start: float, end: float) -> dict:
    """Server RSS: when the concurrent phase began, its peak, and whether it kept growing (peak of its second
    half minus peak of its first half)."""
    mib = 1024 * 1024
    middle = (start + end) / 2
    first, second = memory.window(start, middle), memory.window(middle, end)
    whole = first + second
    return {"samples": len(whole), "rss_start_mib": round(whole[0] / mib, 1), "rss_peak_mib": round(max(whole) / mib, 1),
            "rss_end_mib": round(whole[-1] / mib, 1),
            "growth_second_half_mib": round((max(second) - max(first)) / mib, 1),
            "rss_median_mib": round(statistics.median(whole) / mib, 1)}


def markdown(result: dict, name: str) -> str:
    seq, con, mem = result["sequential"], result["concurrent"], result["memory"]
    settings = result["settings"]
    rows = [("clients", 1, con["clients"]), ("wall s", seq["wall_s"], con["wall_s"]),
            ("requests", seq["requests"], con["requests"]), ("errors (rate)", f"{seq['errors']} ({seq['error_rate']:.2%})",
                                                             f"{con['errors']} ({con['error_rate']:.2%})"),
            ("time to first token p50 s", seq["ttft_p50_s"], con["ttft_p50_s"]),
            ("time to first token p99 s", seq["ttft_p99_s"], con["ttft_p99_s"]),
            ("request p50 s", seq["request_p50_s"], con["request_p50_s"]),
            ("completion tokens", seq["completion_tokens"], con["completion_tokens"]),
            ("aggregate tokens/s", seq["tokens_per_s"], con["tokens_per_s"]),
            ("batches (mean rows)", f"{seq['batches']} ({seq['mean_batch_rows']})", f"{con['batches']} ({con['mean_batch_rows']})")]
    table = "\n".join(f"| {what} | {a} | {b} |" for what, a, b in rows)
    return f"""# llm-modules serve: load test ({name})

- command: `python benchmarks/serve_load.py{'' if settings['run'].endswith('/tiny/composed') else ' --run ' + settings['run']} --clients {settings['clients']} --duration {settings['duration']:g} --sequential-duration {settings['sequential_duration']:g} --max-tokens {settings['max_tokens']}`
- commit: `{result['commit']}`
- machine: {json.dumps(result['machine'])}
- requests: streaming chat completions, 3-40 word prompts, max_tokens {settings['max_tokens']}, temperature 1, a seed each

| | sequential (1 client) | concurrent |
|---|---|---|
{table}

Concurrent throughput / sequential: **{result['headline']['throughput_vs_sequential']}x**.
Server memory (RSS) during the concurrent phase: {mem['rss_start_mib']} MiB at its start, peak {mem['rss_peak_mib']} MiB,
{mem['rss_end_mib']} MiB at its end; peak of the second half minus peak of the first: {mem['growth_second_half_mib']} MiB.
Server still serving afterwards: {result['server_alive_after']}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
