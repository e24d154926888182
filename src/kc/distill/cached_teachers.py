"""Reading the soft-target cache: the student's targets from its shards (`kc.distill.cache_format`), checked
against the run (classes, training images, preprocessing, teacher weights, each array's SHA-256) when opened."""

from __future__ import annotations

import numpy as np
import torch

from kc.data.samples import Sample
from kc.distill.cache_format import PARTS, base_fingerprint, cache_dir, read_shards, shard_prefix
from kc.distill.targets import BlockTargets, Teachers
from kc.errors import CheckpointError
from kc.io import sha256_file
from kc.run import Run
from kc.taxonomy import Taxonomy


class CachedTeachers(Teachers):
    """Soft targets from the cache, built as `OnlineTeachers` builds them (same targets), by training index: the
    index into `samples`, the student's training images the cache was built over."""

    def __init__(
        self,
        run: Run,
        samples: list[Sample],
        specialist_digests: list[str],
        top_k: int,
        temperature: float,
        unselected: str = "zero",
    ):
        directory = cache_dir(run)
        shards = read_shards(run)
        if not shards:
            raise CheckpointError(f"{directory}: no soft-target cache; build it with `kc cache-targets RUN`")
        taxonomy: Taxonomy = run.taxonomy
        base = base_fingerprint(run, samples)
        stale = {PARTS[key] for m in shards.values() for key, value in base.items() if m["base"].get(key) != value}
        stale |= {PARTS["specialists"] for v, m in shards.items() if m["specialist"] != specialist_digests[v]}
        if stale:
            raise CheckpointError(
                f"{directory}: the soft-target cache was built from other {' and '.join(sorted(stale))} than this "
                "run now has; rebuild it with `kc cache-targets RUN` (or delete it to train with online teachers)"
            )
        missing = [taxonomy.verticals[v].id for v in range(taxonomy.num_verticals) if v not in shards]
        if missing:
            raise CheckpointError(
                f"{directory}: the cache lacks the teachers of {', '.join(missing[:10])}; finish it with "
                "`kc cache-targets RUN`"
            )
        short = [
            taxonomy.verticals[v].id
            for v in range(taxonomy.num_verticals)
            if shards[v]["k"] < min(top_k, taxonomy.vertical_size(v))
        ]
        if short:
            kept = min(shards[v]["top_k"] for v in range(taxonomy.num_verticals))
            raise CheckpointError(
                f"{directory}: the cache keeps the top {kept} logits, fewer than student.top_k={top_k} "
                f"(verticals {', '.join(short[:10])}); rebuild it with `kc cache-targets RUN --top-k {top_k}`"
            )
        rows, logits, classes = [], [], []
        for v in range(taxonomy.num_verticals):
            prefix = shard_prefix(v)
            for part, recorded in shards[v].get("sha256", {}).items():  # absent in caches built before digests
                path = directory / f"{prefix}.{part}.npy"
                if not path.is_file() or sha256_file(path) != recorded:
                    raise CheckpointError(
                        f"{path}: damaged or missing (its SHA-256 is not the one {prefix}.json recorded); rebuild "
                        "the cache with `kc cache-targets RUN`"
                    )
            rows.append(np.load(directory / f"{prefix}.rows.npy"))
            logits.append(np.load(directory / f"{prefix}.logits.npy", mmap_mode="r"))
            classes.append(np.load(directory / f"{prefix}.classes.npy", mmap_mode="r"))
        super().__init__(taxonomy, top_k, temperature, unselected)
        self._hold(rows, logits, classes)

    @classmethod
    def from_arrays(
        cls,
        taxonomy: Taxonomy,
        rows: list[np.ndarray],
        logits: list[np.ndarray],
        classes: list[np.ndarray],
        top_k: int,
        temperature: float,
        unselected: str = "zero",
    ) -> CachedTeachers:
        """Teachers over the cache's arrays as given (the constructor opens and checks a run's): per vertical v,
        `rows[v]` the ascending training indices of its images, `logits[v]` and `classes[v]` (n_v, k) their
        teacher's largest logits and the class indices within v."""
        teachers = cls.__new__(cls)
        Teachers.__init__(teachers, taxonomy, top_k, temperature, unselected)
        teachers._hold(rows, logits, classes)
        return teachers

    def _hold(self, rows: list[np.ndarray], logits: list[np.ndarray], classes: list[np.ndarray]) -> None:
        # Per shard: the sorted training indices of its images (searched per batch), and the memory-mapped arrays.
        # Plain ndarray views of the memory maps (same pages): np.memmap's indexing costs more per call than the read.
        self.rows, self.logits, self.classes = rows, [np.asarray(z) for z in logits], [np.asarray(c) for c in classes]
        self.width = max((min(self.top_k, z.shape[1]) for z in logits), default=0)  # most targets kept per pair
        # Every (training index, vertical) pair of the cache, by key index * V + v, sorted, with its row in the
        # vertical's shard: a batch's pairs are found by one search, not one per vertical.
        keys = np.concatenate([r.astype(np.int64) * self.num_verticals + v for v, r in enumerate(rows)] or [[]])
        local = np.concatenate([np.arange(len(r)) for r in rows] or [[]]).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self.pair_keys, self.pair_row = keys[order], local[order]

    @torch.no_grad()
    def blocks(self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor) -> BlockTargets:
        # One read per selected vertical into shared buffers, then one reordering for every pair: at 100K classes a
        # batch selects about 400 verticals, and torch calls per vertical cost more than the reads.
        selected, rows, verticals, _ = self.pairs(labels)
        pairs, device = len(rows), labels.device
        indices = sample_index.cpu().numpy()[rows.cpu().numpy()]
        pair_verticals = verticals.cpu().numpy()
        # Pairs grouped by vertical (a stable sort), each group's rows read into one contiguous slice of the buffers.
        order = np.argsort(pair_verticals, kind="stable")
        found = np.searchsorted(self.pair_keys, indices[order] * self.num_verticals + pair_verticals[order])
        shard_rows = self.pair_row[found]  # each pair's row in its vertical's shard, in `order`
        z = np.full((pairs, self.width), -np.inf, dtype=np.float32)  # sigmoid(-inf) = 0: padding adds nothing
        where_class = np.full((pairs, self.width), -1, dtype=np.int32)  # -1: no class kept there
        ends = [*np.flatnonzero(np.diff(pair_verticals[order])) + 1, pairs] if pairs else []
        begin = 0
        for end in ends:
            v, where = int(pair_verticals[order[begin]]), shard_rows[begin:end]
            if self.logits[v].shape[1] == self.width:  # the usual case: whole rows, straight into the buffers
                self.logits[v].take(where, axis=0, out=z[begin:end])
                self.classes[v].take(where, axis=0, out=where_class[begin:end])
            else:  # a vertical smaller than the rest, or a cache that keeps more than top_k
                k = min(self.top_k, self.logits[v].shape[1])
                z[begin:end, :k] = self.logits[v][where, :k]
                where_class[begin:end, :k] = self.classes[v][where, :k]
            begin = end
        unsorted = torch.from_numpy(np.argsort(order)).to(device)  # buffer row of each pair
        values = torch.sigmoid(torch.from_numpy(z).to(device) / self.temperature)[unsorted]
        classes = torch.from_numpy(where_class).to(device).long()[unsorted]
        return BlockTargets(rows, verticals, classes, values, selected)
