"""A soak of `kc serve`: mixed clients at a fixed rate for a fixed time, on loopback.

    python benchmarks/serve_soak.py MODEL_DIR [--seconds 600] [--rate 20] [--json out.json] [-- SERVE_FLAGS...]

Starts `kc serve MODEL_DIR` on a free loopback port (its default limits unless flags follow `--`), then starts
`--rate` requests a second for `--seconds`, each of a kind drawn at random (seeded) by the weights below, at most
`--max-in-flight` at once (a request due while that many are open waits, and counts as late):

    png, jpeg, webp        valid photos-like images of several sizes (PNG, JPEG, WebP)
    huge                   a flat-colour PNG of 6300 x 6300 pixels: a small file within every default limit that
                           decodes to about 120 MB
    truncated              the first half of a valid PNG
    not_image              random bytes
    slow                   a valid PNG sent in 16 pieces over about 2 s
    disconnect             headers and half the body, then the connection closed

Records requests/s, p50/p99 latency of the valid images sent at once (png, jpeg, webp), the status counts per
kind, the server's resident memory every second (peak VmHWM, and 5 s after the end), and whether it is healthy at
the end. The goals: peak RSS under 2 GB for the demo model whatever the mix, no 5xx but 503, a healthy server at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from serve import free_port, wait_until_healthy  # benchmarks/serve.py, beside this script
from serve_memory import memory_mb

WEIGHTS = {
    "png": 30,
    "jpeg": 20,
    "webp": 10,
    "huge": 8,
    "truncated": 8,
    "not_image": 8,
    "slow": 8,
    "disconnect": 8,
}
TIMED = ("png", "jpeg", "webp")  # the latency figures: valid images sent at once (slow senders take 2 s by design)


def encoded(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


def bodies(rng: np.random.Generator) -> dict[str, list[bytes]]:
    """A few request bodies of each kind (drawn from per request)."""

    def photo(
        size: int,
    ) -> np.ndarray:  # smooth colour fields plus noise: compresses like a photo, not like a flat fill
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)

    sizes = (64, 256, 640, 1600)
    pngs = [encoded(photo(s), "PNG") for s in sizes]
    huge = io.BytesIO()
    Image.new("RGB", (6300, 6300), (120, 80, 200)).save(huge, format="PNG")
    return {
        "png": pngs,
        "jpeg": [encoded(photo(s), "JPEG", quality=88) for s in sizes],
        "webp": [encoded(photo(s), "WEBP", quality=80) for s in sizes],
        "huge": [huge.getvalue()],
        "truncated": [p[: len(p) // 2] for p in pngs],
        "not_image": [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (100, 10_000, 500_000)],
        "slow": pngs[:3],
        "disconnect": pngs,
    }


def multipart(body: bytes) -> tuple[bytes, str]:
    boundary = "kcsoakboundary7d1f"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def raw_request(port: int, body: bytes, pieces: int, pause_s: float, close_after: float | None) -> int | None:
    """POST /v1/classify over a plain socket: the body in `pieces` with pauses between, or cut off after the share
    `close_after` of it (then no status: the client went away)."""
    payload, content_type = multipart(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode())
        if close_after is not None:
            writer.write(payload[: int(len(payload) * close_after)])
            await writer.drain()
            return None
        step = -(-len(payload) // pieces)
        for start in range(0, len(payload), step):
            writer.write(payload[start : start + step])
            await writer.drain()
            await asyncio.sleep(pause_s)
        status_line = await asyncio.wait_for(reader.readline(), timeout=120)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def soak(port: int, pid: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    choose = random.Random(args.seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    samples = bodies(rng)
    url = f"http://127.0.0.1:{port}/v1/classify"
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    latencies: list[float] = []
    rss: list[float] = []
    gate = asyncio.Semaphore(args.max_in_flight)
    late = 0

    async def one(http: httpx.AsyncClient, kind: str) -> None:
        body = choose.choice(samples[kind])
        start = time.perf_counter()
        try:
            if kind == "slow":
                status = await raw_request(port, body, pieces=16, pause_s=0.125, close_after=None)
            elif kind == "disconnect":
                status = await raw_request(port, body, pieces=1, pause_s=0, close_after=0.5)
            else:
                status = (await http.post(url, files={"image": body})).status_code
            statuses[kind]["closed by client" if status is None else str(status)] += 1
            if kind in TIMED and status == 200:
                latencies.append(time.perf_counter() - start)
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            statuses[kind][f"client error: {type(exc).__name__}"] += 1
        finally:
            gate.release()

    async def sample_memory(stop: asyncio.Event) -> None:
        while not stop.is_set():
            rss.append(memory_mb(pid)["VmRSS"])
            await asyncio.sleep(1.0)

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(stop))
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=16)
    tasks = []
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        total = int(args.seconds * args.rate)
        for n in range(total):
            due = start + n / args.rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if gate.locked():
                late += 1
            await gate.acquire()
            tasks.append(asyncio.create_task(one(http, choose.choices(kinds, weights)[0])))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
        await asyncio.sleep(5)
        after = memory_mb(pid)
        healthy = (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        check = (await http.post(url, files={"image": samples["png"][0]})).status_code
        exposition = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    stop.set()
    await sampler
    counts = Counter(status for per_kind in statuses.values() for status in per_kind.elements())
    # What the server itself counted (its Prometheus exposition), disconnected clients included.
    served = {
        line.split('status="')[1].split('"')[0]: int(float(line.rsplit(" ", 1)[1]))
        for line in exposition.splitlines()
        if line.startswith('kc_requests_total{path="/v1/classify"')
    }
    return {
        "requests": total,
        "seconds": seconds,
        "requests_per_s": total / seconds,
        "late_starts": late,
        "valid_p50_ms": 1000 * float(np.percentile(latencies, 50)) if latencies else None,
        "valid_p99_ms": 1000 * float(np.percentile(latencies, 99)) if latencies else None,
        "statuses": dict(counts),
        "statuses_by_kind": {k: dict(v) for k, v in sorted(statuses.items())},
        "server_counted": served,
        "5xx_other_than_503": {
            "clients_saw": sum(n for s, n in counts.items() if s.startswith("5") and s != "503"),
            "server_counted": sum(n for s, n in served.items() if s.startswith("5") and s != "503"),
        },
        "peak_rss_mb": after["VmHWM"],
        "rss_samples_max_mb": max(rss) if rss else None,
        "rss_after_mb": after["VmRSS"],
        "healthy_after": healthy,
        "valid_request_after": check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rate", type=float, default=20, help="requests started per second")
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("serve_flags", nargs="*")
    args = parser.parse_args()

    port = free_port()
    command = [sys.executable, "-m", "kc.cli", "serve", str(args.model), "--port", str(port), *args.serve_flags]
    log = tempfile.NamedTemporaryFile("w", prefix="kc-serve-soak-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)  # a pipe would fill up
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}")
        idle = memory_mb(server.pid)["VmRSS"]
        result = {"idle_rss_mb": idle, **asyncio.run(soak(port, server.pid, args))}
        result["settings"] = {k: str(v) for k, v in vars(args).items()}
        result["server_log"] = log.name
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
