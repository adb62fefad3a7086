"""Latency, throughput and held-out pass rate of a policy served by ``policygrad serve``, full precision against int8.

Exports the model twice (``policygrad export --quantize none`` and ``--quantize int8``), serves each export with
``policygrad serve`` in its own process on loopback (greedy, ``--temperature 0``), and sends the task's held-out
prompts from concurrent streaming clients at concurrency 1, 4 and 16. For every (server, concurrency) cell it records
latency and time to first token (p50, p95, p99 over the requests), completion tokens per second over the cell's wall
time, and requests per second. The full-precision export is also served without prefix caching.

The held-out pass rate of each served model is scored with the task's checker on the completions of the concurrency-16
cell (all the prompts), and set against the same export evaluated in process the way ``lm/evaluate.py`` does it
(policygrad's rollout sampler, greedy, batches of the recipe's micro_batch_size, the task's rates), together with the
fraction of prompts whose served reply is identical to the in-process one.

    python benchmarks/serve_latency.py                          # the embedded default model, ~8 min on one core
    python benchmarks/serve_latency.py --model runs/NAME --prompts 64 --levels 1 4 16 32

Writes benchmarks/results/serve_latency.json; docs/serving.md quotes the table it prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class BenchConfig:
    """Serve a policy full precision and int8, load it with concurrent clients, and score its held-out replies."""

    model: str = "default"
    """a run, checkpoint or model folder, or "default" (the embedded SmolLM2-135M-Instruct)"""
    recipe: Path = ROOT / "recipes" / "default-cpu.yaml"
    """the task settings (prompts, target length, passage length) when --model is not a run (a run uses its own)"""
    prompts: int = 32
    """held-out prompts sent at the highest concurrency and scored; each lower concurrency sends max(8, 4 x
    concurrency) other held-out prompts (no prompt reaches a server twice)"""
    levels: tuple[int, ...] = (1, 4, 16)
    """client concurrencies"""
    max_tokens: int = 48
    """completion budget per request (the recipe's max_new_tokens by default in training)"""
    threads: int = 1
    """torch threads of each server and of the in-process evaluation"""
    shared_prefix_tokens: int = 256
    """prefix caching check: the float32 server, with and without prefix caching, answers the first 16 prompts at
    concurrency 16 (at most 16 tokens each: the check is about the prompt) after a system message of this many
    tokens common to all (0: skip the check)"""
    output: Path = ROOT / "benchmarks" / "results" / "serve_latency.json"
    """where the JSON goes"""
    workdir: Path | None = None
    """where the exports are written (default: a temporary folder, removed at the end)"""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation between the closest ranks, numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---- one server -------------------------------------------------------------------------------------------------------


class Server:
    """``policygrad serve FOLDER --port 0 ...`` in a child process, stopped with SIGTERM."""

    def __init__(self, folder: Path, flags: list[str], threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [
            sys.executable,
            "-m",
            "policygrad.serve.server",
            str(folder),
            "--port",
            "0",
            "--threads",
            str(threads),
        ]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop(); a pipe nobody reads would block
        self.process = subprocess.Popen(command + flags, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("serving "):
            self.process.wait(timeout=60)
            self.log.seek(0)
            raise RuntimeError(f"the server did not start: {line}{self.log.read()}")
        self.url = line.split(" at ")[1].split()[0]
        self.name = line.split()[1]
        self.banner = line.strip()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def one_request(
    client: httpx.Client, url: str, name: str, prompt: str, max_tokens: int, system: str | None = None
) -> dict[str, Any]:
    """One streamed chat completion: latency, time to first content token, completion tokens, the reply."""
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body = {
        "model": name,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    text, tokens, finish = [], None, None
    with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                text.append(delta)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                finish = chunk["choices"][0].get("finish_reason")
    end = time.perf_counter()
    return {
        "latency_s": end - start,
        "ttft_s": (first or end) - start,
        "completion_tokens": tokens or 0,
        "finish_reason": finish,
        "reply": "".join(text),
    }


def load_level(
    server: Server, prompts: list[str], concurrency: int, max_tokens: int, system: str | None = None
) -> dict[str, Any]:
    """Send ``prompts`` from ``concurrency`` clients, each taking the next prompt when its last reply is done (after
    a ``system`` message common to all, where given)."""
    work: queue.Queue = queue.Queue()
    for index, prompt in enumerate(prompts):
        work.put((index, prompt))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    errors: list[str] = []

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                try:
                    index, prompt = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[index] = one_request(client, server.url, server.name, prompt, max_tokens, system)
                except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                    errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    workers = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    latency = [r["latency_s"] for r in done]
    ttft = [r["ttft_s"] for r in done]
    tokens = sum(r["completion_tokens"] for r in done)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": wall,
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "latency_p99_s": percentile(latency, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "ttft_p99_s": percentile(ttft, 99),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(done) / wall,
        "mean_completion_tokens": statistics.fmean(r["completion_tokens"] for r in done) if done else 0.0,
        "replies": [r["reply"] if r else None for r in results],
    }


# ---- in-process reference -------------------------------------------------------------------------------------------


def in_process(folder: Path, records: list[dict[str, Any]], task: Any, max_tokens: int, batch: int) -> dict[str, Any]:
    """What lm/evaluate.py measures for ``folder``: greedy replies from policygrad's rollout sampler in batches of
    ``batch``, scored by the task's rates."""
    import torch

    from policygrad.lm.evaluate import group_fields
    from policygrad.lm.models import load_model
    from policygrad.lm.rollout import sample

    model, tokenizer = load_model(str(folder))
    model.eval()
    started = time.perf_counter()
    replies: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(records), batch):
            chunk = [r["prompt"] for r in records[start : start + batch]]
            rollout = sample(model, tokenizer, chunk, 1, max_tokens, 1.0, 1.0, greedy=True, score_tokens=False)
            replies.extend(rollout.completions)
    seconds = time.perf_counter() - started
    rates = task.rates(replies, group_fields(records, 1))
    del model
    return {"rates": rates, "replies": replies, "seconds": seconds}


# ---- the whole benchmark --------------------------------------------------------------------------------------------


def main(config: BenchConfig) -> None:
    import torch

    from policygrad.lm.config import load_config
    from policygrad.lm.data import prompts_for
    from policygrad.lm.evaluate import group_fields
    from policygrad.lm.models import load_model
    from policygrad.runs import CONFIG_FILE
    from policygrad.serve.export import ExportConfig, export, resolve_source
    from policygrad.variants import TASKS

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # a line per 8-bit product
    torch.set_num_threads(config.threads)
    began = time.perf_counter()
    source = resolve_source(config.model)
    recipe = source.run / CONFIG_FILE if source.run is not None else config.recipe
    task_config = load_config(recipe, {"model": str(source.folder), "output_dir": "/tmp/serve-latency"})
    _, tokenizer = load_model(str(source.folder))
    # Each concurrency gets prompts of its own, so that no prompt reaches a server twice: a prompt seen before would
    # find its pages in the prefix cache and make the cells with caching look faster than they are. The highest
    # concurrency gets the first `prompts` (scored for the pass rate), each lower one the next max(8, 4 x level),
    # and the warm-up request one more.
    top = max(config.levels)
    sizes = {level: config.prompts if level == top else max(8, 4 * level) for level in config.levels}
    heldout = prompts_for(task_config, tokenizer).heldout
    needed = sum(sizes.values()) + 1
    if len(heldout) < needed:
        raise SystemExit(f"{recipe} holds out {len(heldout)} prompts; this benchmark needs {needed}")
    records = heldout[: config.prompts]
    sets, cursor = {}, config.prompts
    for level in config.levels:
        if level == top:
            sets[level] = [r["prompt"] for r in records]
        else:
            sets[level] = [r["prompt"] for r in heldout[cursor : cursor + sizes[level]]]
            cursor += sizes[level]
    warmup = heldout[cursor]["prompt"]
    task = TASKS[task_config.task]
    print(f"{needed} held-out prompts of {recipe} ({task_config.prompts}, task {task_config.task}); CPU {cpu_name()}")

    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="serve-latency-"))
    exports = {}
    for quantize in ("none", "int8"):
        out = workdir / f"policy-{quantize}"
        facts = export(
            ExportConfig(source=config.model, output=out, quantize=quantize, overwrite=True, threads=config.threads)
        )
        exports[quantize] = {"folder": out, "bytes": facts["export"]["bytes"], "fidelity": facts.get("fidelity")}
        print(f"exported {quantize}: {facts['export']['bytes'] / 1e6:.0f} MB, fidelity {facts.get('fidelity')}")

    base = [
        "--temperature",
        "0",
        "--max-tokens",
        str(config.max_tokens),
        "--max-concurrent-requests",
        str(max(config.levels)),
    ]
    servers = [
        ("float32", "none", "continuous batching, prefix caching", base),
        ("float32", "none", "continuous batching, no prefix caching", [*base, "--no-prefix-caching"]),
        ("int8 (bitsandbytes)", "int8", "continuous batching, prefix caching", base),
    ]
    runs = []
    for precision, quantize, engine, flags in servers:
        server = Server(exports[quantize]["folder"], flags, config.threads)
        print(server.banner)
        levels = []
        try:
            with httpx.Client(timeout=600) as client:
                one_request(client, server.url, server.name, warmup, 4)
            for level in config.levels:
                result = load_level(server, sets[level], level, config.max_tokens)
                levels.append(result)
                print(
                    f"  c={level:>2}: {result['requests']} requests in {result['wall_s']:.1f} s, "
                    f"p50 {result['latency_p50_s']:.2f} s, ttft p50 {result['ttft_p50_s']:.2f} s, "
                    f"{result['tokens_per_s']:.1f} tok/s, {result['errors']} errors"
                )
        finally:
            server.stop()
        full = levels[-1]
        served_rates = task.rates(full["replies"], group_fields(records[: full["requests"]], 1))
        runs.append(
            {
                "precision": precision,
                "quantize": quantize,
                "engine": f"transformers {engine}",
                "levels": levels,
                "served_rates": served_rates,
            }
        )

    prefix_check = []
    if config.shared_prefix_tokens > 0:
        from policygrad.lm.data import corpus_passages, truncate_to_tokens

        system = truncate_to_tokens(" ".join(corpus_passages()[:20]), tokenizer, config.shared_prefix_tokens)
        for engine, flags in (("prefix caching", base), ("no prefix caching", [*base, "--no-prefix-caching"])):
            server = Server(exports["none"]["folder"], flags, config.threads)
            try:
                with httpx.Client(timeout=600) as client:
                    one_request(client, server.url, server.name, warmup, 4)  # without the system prompt
                result = load_level(server, sets[top][:16], top, min(config.max_tokens, 16), system)
            finally:
                server.stop()
            result.pop("replies")
            prefix_check.append({"engine": f"transformers continuous batching, {engine}", **result})
            print(
                f"  shared {config.shared_prefix_tokens}-token system prompt, {engine}: {result['requests']} requests "
                f"in {result['wall_s']:.1f} s, ttft p50 {result['ttft_p50_s']:.2f} s, {result['tokens_per_s']:.1f} tok/s"
            )

    reference = {}
    for quantize in ("none", "int8"):
        reference[quantize] = in_process(
            exports[quantize]["folder"], records, task, config.max_tokens, task_config.micro_batch_size
        )
        print(f"in process {quantize}: {reference[quantize]['rates']} in {reference[quantize]['seconds']:.0f} s")
    for run in runs:
        own = reference[run["quantize"]]
        served = run["levels"][-1]["replies"]
        run["in_process_rates"] = own["rates"]
        run["identical_to_in_process"] = sum(a == b for a, b in zip(served, own["replies"])) / len(served)

    document = {
        "benchmark": "benchmarks/serve_latency.py",
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores_visible": os.cpu_count(),
        "threads_per_server": config.threads,
        "model": config.model,
        "source_folder": str(source.folder),
        "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "heldout_prompts": len(records),
        "requests_per_level": sizes,
        "max_tokens": config.max_tokens,
        "decoding": "greedy (temperature 0), streamed",
        "exports": {q: {"bytes": e["bytes"], "fidelity": e["fidelity"]} for q, e in exports.items()},
        "runs": runs,
        "shared_prefix_tokens": config.shared_prefix_tokens,
        "shared_prefix_check": prefix_check,
        "in_process_seconds": {q: r["seconds"] for q, r in reference.items()},
        "total_seconds": time.perf_counter() - began,
        "load_average_at_end": os.getloadavg(),  # other jobs on the machine: read the numbers with it
    }
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(json.dumps(document, indent=1) + "\n")
    print_table(document)
    print(f"wrote {config.output} in {document['total_seconds']:.0f} s")
    if config.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def print_table(document: dict[str, Any]) -> None:
    """The Markdown tables docs/serving.md quotes."""
    print(
        "\n| weights | engine | clients | requests | p50 / p95 / p99 latency (s) | p50 / p95 / p99 first token (s) | completion tok/s | req/s |"
    )
    print("|---|---|---:|---:|---|---|---:|---:|")
    for run in document["runs"]:
        for level in run["levels"]:
            print(
                f"| {run['precision']} | {run['engine'].removeprefix('transformers ')} | {level['concurrency']} "
                f"| {level['requests']} | {level['latency_p50_s']:.2f} / {level['latency_p95_s']:.2f} / "
                f"{level['latency_p99_s']:.2f} | {level['ttft_p50_s']:.2f} / {level['ttft_p95_s']:.2f} / "
                f"{level['ttft_p99_s']:.2f} | {level['tokens_per_s']:.1f} | {level['requests_per_s']:.2f} |"
            )
    if document.get("shared_prefix_check"):
        print(
            f"\nWith a {document['shared_prefix_tokens']}-token system prompt common to every request (float32, at "
            "most 16 tokens a reply):\n"
        )
        print("| engine | clients | requests | p50 / p95 latency (s) | p50 / p95 first token (s) | completion tok/s |")
        print("|---|---:|---:|---|---|---:|")
        for row in document["shared_prefix_check"]:
            print(
                f"| {row['engine'].removeprefix('transformers ')} | {row['concurrency']} | {row['requests']} "
                f"| {row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} | {row['ttft_p50_s']:.2f} / "
                f"{row['ttft_p95_s']:.2f} | {row['tokens_per_s']:.1f} |"
            )
    print(
        "\n| weights | engine | pass rate served | pass rate in process | length rule served / in process | digit rule served / in process | replies identical |"
    )
    print("|---|---|---:|---:|---|---|---:|")
    for run in document["runs"]:
        s, p = run["served_rates"], run["in_process_rates"]
        print(
            f"| {run['precision']} | {run['engine'].removeprefix('transformers ')} | {s.get('pass_rate', 0):.1%} "
            f"| {p.get('pass_rate', 0):.1%} | {s.get('length_rate', 0):.1%} / {p.get('length_rate', 0):.1%} "
            f"| {s.get('digits_rate', 0):.1%} / {p.get('digits_rate', 0):.1%} | {run['identical_to_in_process']:.0%} |"
        )


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
