"""Distillation on extra unlabeled images, an experiment on a finished `paper-1k` seed run (not yet a kc feature).

    python benchmarks/unlabeled_images.py runs/p1k/seed_0/run runs/p1k-u60/seed_0/run 0 60
    kc pipeline runs/p1k-u60/seed_0/run/config.yaml

Hypothesis test: does distillation on extra unlabeled images (routed by the generalist) beat the ground-truth
controls, and a self-training control on the same images? Copies a finished paper-1k seed run, keeps its generalist
and specialists, appends U unlabeled rows per class to the copy's train split with the generalist's argmax class as
the label (which, with ground_truth none, only selects the teacher's vertical for the student; for the controls
the same pseudo-label is self-training)."""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from kc.config import load_config
from kc.data.feature_benchmark import FEATURE_PRESETS, class_centres
from kc.run import prepare_run
from kc.stages import GENERALIST, load_stage, new_generalist_model

src_run, dst_run, seed, per_class = (
    Path(sys.argv[1]).resolve(),
    Path(sys.argv[2]).resolve(),
    int(sys.argv[3]),
    int(sys.argv[4]),
)
spec = replace(FEATURE_PRESETS["paper-1k"], seed=seed)
centres = class_centres(spec)
D = spec.dim
C = len(centres)
if dst_run.exists():
    shutil.rmtree(dst_run)
dst_run.mkdir(parents=True)
for part in ("config.yaml", "taxonomy.json", "data", GENERALIST, "specialists"):
    (shutil.copytree if (src_run / part).is_dir() else shutil.copy)(src_run / part, dst_run / part)
cfg_text = (dst_run / "config.yaml").read_text()
cfg = yaml.safe_load(cfg_text)
cfg["run_dir"] = str(dst_run)
(dst_run / "config.yaml").write_text(yaml.safe_dump(cfg))
run = prepare_run(load_config(dst_run / "config.yaml"), progress=False)
urng = np.random.default_rng(10_000 + seed)
classes = np.repeat(np.arange(C), per_class)
feats = (centres[classes] + urng.normal(0.0, spec.noise, (len(classes), D))).astype(np.float16)
root = run.image_root
np.save(root / f"unlabeled_{per_class}.npy", feats)
gen = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)).eval()
with torch.no_grad():
    pseudo = torch.cat(
        [gen(torch.from_numpy(feats[i : i + 4096].astype(np.float32))).argmax(1) for i in range(0, len(feats), 4096)]
    ).numpy()
vert = np.asarray(run.taxonomy.vertical_of_class)
print(
    f"unlabeled {len(feats)}: generalist argmax = true class {np.mean(pseudo == classes):.3f}, "
    f"vertical right {np.mean(vert[pseudo] == vert[classes]):.3f}"
)
with open(dst_run / "data/train.jsonl", "a") as f:
    for i, c in enumerate(pseudo.tolist()):
        f.write(json.dumps({"path": f"unlabeled_{per_class}.npy#{i}", "labels": [c], "where": f"unlabeled:{i}"}) + "\n")
