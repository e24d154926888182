"""Training-data throughput on large photos: decoding every epoch vs the decoded cache (data.decoded_cache).

    python benchmarks/decoded_cache.py [--images 300] [--side 900] [--size 48] [--rounds 3] [--workers 0]

Writes `--images` PNG files of `--side` x `--side` pixels (smooth colour fields plus noise, so that they compress
like photos rather than flat colours) and a manifest into a temporary folder, prepares one run with the cache and
one without, then reads every training image through the training Dataset (augmented, batch 64, `--workers`
DataLoader processes), round after round, alternating the two so the machine's drift hits both alike. Reports the
time to build the cache, median images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from kc.config import config_from_dict
from kc.data.dataset import ImageDataset, collate
from kc.run import prepare_run


def write_photos(root: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    classes = [f"c{i}" for i in range(4)]
    taxonomy = {"verticals": ["all"], "classes": [{"id": c, "vertical": "all"} for c in classes]}
    (root / "taxonomy.json").write_text(json.dumps(taxonomy))
    y, x = np.mgrid[0:side, 0:side] / side
    rows = ["path,labels,split"]
    for i in range(count):
        a, b, c = rng.uniform(0.5, 4, 3)
        field = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y + a)], axis=-1)
        pixels = ((field + 1) * 110 + rng.normal(0, 12, field.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{classes[i % 4]},{'train' if i % 10 else 'val'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def epoch_rate(dataset: ImageDataset, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=64, collate_fn=collate, num_workers=workers)
    start = time.perf_counter()
    count = sum(len(batch["images"]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--side", type=int, default=900)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_photos(root / "photos", args.images, args.side)
        runs = {}
        for cached in (False, True):
            cfg = config_from_dict(
                {
                    "run_dir": str(root / f"run-{cached}"),
                    "data": {
                        "manifest": str(root / "photos" / "manifest.csv"),
                        "taxonomy": str(root / "photos" / "taxonomy.json"),
                        "image_size": args.size,
                        "decoded_cache": cached,
                        "augment": {"hflip": True, "crop_padding": 4},
                    },
                }
            )
            start = time.perf_counter()
            run = prepare_run(cfg, progress=False)
            runs[cached] = (run, time.perf_counter() - start)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for epoch in range(args.rounds):
            for cached, (run, _) in runs.items():
                dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, True, decoded=run.decoded)
                dataset.set_epoch(epoch)
                rates[cached].append(epoch_rate(dataset, args.workers))
        plain, cached = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"{args.images} PNGs of {args.side}x{args.side} px read at {args.size} px, {args.workers} workers")
        print(f"prepare run: {runs[False][1]:.1f} s (checks every image); with the cache {runs[True][1]:.1f} s")
        print(
            f"decoding every epoch: {plain:,.0f} images/s; decoded cache: {cached:,.0f} images/s "
            f"({cached / plain:.0f}x)"
        )


if __name__ == "__main__":
    main()
