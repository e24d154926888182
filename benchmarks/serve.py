"""HTTP server benchmark: requests/s and latency at 1, 8 and 32 concurrent clients, against the model's ceiling.

    python benchmarks/serve.py MODEL_DIR IMAGES_DIR [--concurrency 1 8 32] [--requests 400] [--json out.json]

Starts `kc serve MODEL_DIR` on a free loopback port in a subprocess, then for each concurrency level runs that many
clients (asyncio + httpx), each uploading images from IMAGES_DIR (multipart) one request after another, until
`--requests` requests are answered (bounded in time by `--max-seconds` per level). Reports requests/s, p50 and p99
latency as the clients saw them, the server's own mean latency and mean model batch size (from its /metrics), and,
side by side in this process, the model's ceiling: images/s of `scores` on preprocessed batches of the server's max
batch, and of decode + preprocess + scores. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from kc.data.images import decode_rgb
from kc.serve.runtime import open_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, seconds: float = 60.0) -> None:
    """Poll the server's /healthz until it answers 200."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"the server at {url} did not answer /healthz within {seconds:.0f} s")


def server_counters(url: str) -> tuple[int, int, float, int]:
    """(batches, images) the server's model has run so far, and (seconds, requests) of /v1/classify as the server
    measured them."""
    samples = [
        sample
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for sample in family.samples
    ]
    pairs = [(int(s.labels["size"]), int(s.value)) for s in samples if s.name == "kc_batches_total"]
    (seconds,) = [s.value for s in samples if s.name == "kc_request_seconds_sum" and s.labels["path"] == "/v1/classify"]
    (count,) = [s.value for s in samples if s.name == "kc_request_seconds_count" and s.labels["path"] == "/v1/classify"]
    return sum(n for _, n in pairs), sum(size * n for size, n in pairs), seconds, int(count)


async def load(url: str, images: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            response = await http.post(url + "/v1/classify", files={"image": images[i % len(images)]})
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def ceiling(model_dir: Path, paths: list[Path], batch: int, threads: int, repeats: int) -> dict:
    model = open_model(model_dir, threads=threads)
    chosen = (paths * (batch // len(paths) + 1))[:batch]
    inputs = np.stack([model.preprocess(decode_rgb(p)).numpy() for p in chosen])
    model.scores(inputs)  # warm-up
    forward, end_to_end = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model.scores(inputs)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.scores(np.stack([model.preprocess(decode_rgb(p)).numpy() for p in chosen]))
        end_to_end.append(time.perf_counter() - start)
    return {
        "batch": batch,
        "model_images_per_s": batch / statistics.median(forward),
        "decode_and_model_images_per_s": batch / statistics.median(end_to_end),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="server model threads")
    parser.add_argument("--json")
    args = parser.parse_args()

    paths = sorted(p for p in args.images_dir.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:256]
    images = [p.read_bytes() for p in paths]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kc.cli", "serve", str(args.model_dir), "--port", str(port)]
    command += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(url)
        asyncio.run(load(url, images, 4, 40, 30))  # warm-up
        rows = []
        for clients in args.concurrency:
            before = server_counters(url)
            row = asyncio.run(load(url, images, clients, args.requests, args.max_seconds))
            after = server_counters(url)
            row["mean_batch"] = (after[1] - before[1]) / max(1, after[0] - before[0])
            row["server_mean_ms"] = 1000 * (after[2] - before[2]) / max(1, after[3] - before[3])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    limit = ceiling(args.model_dir, paths, args.max_batch, args.threads, repeats=20)
    print(json.dumps(limit))

    print(f"\nserver: max batch {args.max_batch}, max wait {args.max_wait_ms} ms, {args.threads} model thread(s)\n")
    print(
        "| concurrent clients | requests | requests/s | p50 ms | p99 ms | server mean ms | mean model batch | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['server_mean_ms']:.1f} | {r['mean_batch']:.1f} | {r['errors']} |"
        )
    print(
        f"\nceiling (same model in-process, batch {limit['batch']}): model alone "
        f"{limit['model_images_per_s']:,.0f} images/s; decode + preprocess + model "
        f"{limit['decode_and_model_images_per_s']:,.0f} images/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"load": rows, "ceiling": limit, "args": vars(args)}, default=str))


if __name__ == "__main__":
    main()
