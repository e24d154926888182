"""Server memory under a burst of large images: peak and after-burst resident memory of `kc serve`.

    python benchmarks/serve_memory.py MODEL_DIR [--clients 48] [--pixels 6300] [--json out.json] [-- SERVE_FLAGS...]

Starts `kc serve MODEL_DIR` on a free loopback port (extra flags after `--` go to it), then `--clients` clients
upload at once one PNG of `--pixels` x `--pixels` pixels of a flat colour (a small file within every default limit,
which decodes to hundreds of MB), twice over. Reports the status counts, the burst's wall time, the server's peak
resident memory (VmHWM of its process) and its resident memory 3 s after the burst (VmRSS).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from serve import free_port, wait_until_healthy  # benchmarks/serve.py, beside this script


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--pixels", type=int, default=6300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("serve_flags", nargs="*")
    args = parser.parse_args()

    out = io.BytesIO()
    Image.new("RGB", (args.pixels, args.pixels), (120, 80, 200)).save(out, format="PNG")
    body = out.getvalue()
    port = free_port()
    command = [sys.executable, "-m", "kc.cli", "serve", str(args.model), "--port", str(port), *args.serve_flags]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url)
        idle = memory_mb(server.pid)["VmRSS"]
        statuses: Counter[int] = Counter()
        start = time.perf_counter()
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(args.clients) as pool:
            for _ in range(2):
                answers = pool.map(
                    lambda _: client.post(url + "/v1/classify", files={"image": body}), range(args.clients)
                )
                statuses.update(a.status_code for a in answers)
        wall = time.perf_counter() - start
        time.sleep(3)
        memory = memory_mb(server.pid)
        healthy = httpx.get(url + "/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "clients": args.clients,
        "image": f"{args.pixels}x{args.pixels} PNG, {len(body) / 1024:.0f} KB",
        "serve_flags": args.serve_flags,
        "statuses": dict(sorted(statuses.items())),
        "burst_seconds": round(wall, 1),
        "idle_rss_mb": round(idle),
        "peak_rss_mb": round(memory["VmHWM"]),
        "rss_after_burst_mb": round(memory["VmRSS"]),
        "healthy_after": healthy,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
