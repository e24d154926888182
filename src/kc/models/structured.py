"""Structurally connected heads (the paper's SC layers): hidden blocks per vertical that feed only their vertical.

With the backbone feature of size s_b, M verticals, N classes and the head's last hidden widths s1, s2:

- `fc-fc`  FC(s1)-FC(s2): the dense head (`DenseHead`), the generalist's.
- `fc-sc`  FC(s1)-SC(s2): a shared FC(s1), then per vertical its own block of s2 units reading the whole shared layer;
  vertical v's classes read only v's block. With `shared_units` x > 0 (the paper's FC-SC(s2, x)) each vertical's block
  is x units shared by all verticals plus s2 - x private ones: x = 0 is FC-SC, x = s2 is FC-FC.
- `sc-sc`  SC(s1)-SC(s2): each vertical has its own s1 block on the backbone feature and its own s2 block on that.

Dense layers before the last one (fc-sc) or two (sc-sc) hidden widths are shared, as in `DenseHead`.

Fast: the per-vertical hidden layers are one matmul (fc-sc: a dense layer with M*(s2-x) outputs) or one bmm over
the M equal-sized blocks (sc-sc). The block-sparse output layer (`VerticalBlocks`) gives each large vertical one
matmul on a view of the weights and computes the small ones as one bmm per *bucket* of verticals of similar size,
so the Python-level work grows with the number of large verticals (at most N / 512), never with many small ones,
and verticals of very different sizes cost little padding. Output weights are kept (N, k) in class order, as a
dense layer keeps them, so parameter counts equal the paper's formulas and a head initialised from the
generalist's dense head starts as the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kc.models.heads import OWN_MATMUL_CLASSES, ClassBlocks, DenseHead, hidden_activation, inverse_permutation

STRUCTURES = ("fc-fc", "fc-sc", "sc-sc")


def plan_buckets(sizes: list[int], max_padding: float) -> list[list[int]]:
    """Group verticals (indices into `sizes`) so that padding each group to its largest size wastes at most
    `max_padding` of the group's padded outputs. Greedy over sizes in decreasing order: a few buckets (about
    log(largest / smallest) / log(1 / (1 - max_padding))), whatever the number of verticals."""
    order = sorted(range(len(sizes)), key=lambda v: (-sizes[v], v))
    buckets: list[list[int]] = []
    for v in order:
        if buckets:
            bucket = buckets[-1]
            padded = sizes[bucket[0]] * (len(bucket) + 1)
            if sum(sizes[u] for u in bucket) + sizes[v] >= (1 - max_padding) * padded:
                bucket.append(v)
                continue
        buckets.append([v])
    return buckets


class VerticalBlocks(nn.Module):
    """The block-sparse product logits[b, c] = hidden[v(c), :, b] . weight[c], for classes grouped by vertical.

    hidden: (M, k, B), one k-vector per vertical and image, laid out feature-major so that every matmul below reads
    contiguous memory without a transpose; weight: (N, k) in class order. Returns (B, N) logits (a transposed view).

    Large verticals (>= OWN_MATMUL_CLASSES classes) each take one matmul on their slice of the weights, got by
    `split` (views whose backward is one concatenation, no copies). The others are computed as one bmm per bucket of
    verticals of similar size: one gather puts them in bucket order and one gathers their weight rows, each
    vertical's rows padded to its bucket's largest size (padding rows repeat row 0; their outputs are computed and
    dropped, so no gradient reaches them). One final gather puts the outputs in class order. Gathers that would be
    the identity are skipped, so a vocabulary of large verticals costs no gather at all.
    """

    def __init__(self, vertical_sizes: list[int], max_padding: float = 0.25, own_matmul: int = OWN_MATMUL_CLASSES):
        super().__init__()
        starts = [0]
        for n in vertical_sizes:
            starts.append(starts[-1] + n)
        self.ranges = list(zip(starts[:-1], starts[1:], strict=True))
        self.sizes = list(vertical_sizes)
        self.large = [v for v, n in enumerate(vertical_sizes) if n >= own_matmul]
        small = [v for v, n in enumerate(vertical_sizes) if n < own_matmul]
        self.buckets = [[small[i] for i in b] for b in plan_buckets([vertical_sizes[v] for v in small], max_padding)]
        self.shapes = [(len(b), vertical_sizes[b[0]]) for b in self.buckets]  # (verticals, padded size)
        order = [v for b in self.buckets for v in b]
        gather = [0] * starts[-1]
        position = 0
        for v in self.large:
            a, b = self.ranges[v]
            gather[a:b] = range(position, position + b - a)
            position += b - a
        rows: list[int] = []
        for bucket, (_, width) in zip(self.buckets, self.shapes, strict=True):
            for v in bucket:
                a, b = self.ranges[v]
                gather[a:b] = range(position + len(rows), position + len(rows) + b - a)
                rows += list(range(a, b)) + [0] * (width - (b - a))
        self.padded_outputs = position + len(rows)
        identity = list(range(starts[-1]))
        # Index buffers follow the module's device and are not saved; None where the gather is the identity (or
        # not needed: no small verticals).
        indexes = (
            ("order", order, list(range(len(vertical_sizes))) if not self.large else None),
            ("rows", rows, identity if not self.large else None),
            ("gather", gather, identity),
        )
        for name, index, skip in indexes:
            value = None if not index or index == skip else torch.tensor(index, dtype=torch.long, device="cpu")
            self.register_buffer(name, value, persistent=False)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k, batch = weight.shape[1], hidden.shape[2]
        outputs = []
        if self.large:
            own_weights, own_hidden = weight.split(self.sizes), hidden.unbind(0)
            outputs += [own_weights[v] @ own_hidden[v] for v in self.large]  # (N_v, k) @ (k, B)
        if self.buckets:
            if self.order is not None:
                hidden = hidden.index_select(0, self.order)
            if self.rows is not None:
                weight = weight.index_select(0, self.rows)
            counts = [count for count, _ in self.shapes]
            padded = [count * width for count, width in self.shapes]
            outputs += [
                torch.bmm(w.view(count, width, k), h).view(count * width, batch)  # (Mb, P, k) @ (Mb, k, B)
                for h, w, (count, width) in zip(hidden.split(counts), weight.split(padded), self.shapes, strict=True)
            ]
        flat = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (padded outputs, B)
        if self.gather is not None:
            flat = flat.index_select(0, self.gather)
        return flat.t()

    def loop(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The same product as a Python loop over verticals: the reference for tests and benchmarks."""
        return torch.cat([weight[a:b] @ hidden[v] for v, (a, b) in enumerate(self.ranges)]).t()

    def extra_repr(self) -> str:
        return (
            f"own matmuls={len(self.large)}, buckets={len(self.buckets)}, padded_outputs={self.padded_outputs}, "
            f"classes={self.ranges[-1][1]}"
        )


def _linear_parameter(rows: int, cols: int, fan_in: int) -> nn.Parameter:
    """nn.Linear's default initialisation, for weights that are not an nn.Linear."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.Parameter(torch.empty(rows, cols).uniform_(-bound, bound))


class StructuredHead(nn.Module):
    """fc-sc (optionally with x shared units per block) or sc-sc; maps (B, in_features) -> (B, N) logits."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        vertical_sizes: list[int],
        structure: str = "fc-sc",
        shared_units: int = 0,
        dropout: float = 0.0,
        max_padding: float = 0.25,
        activation: str = "relu",
    ):
        super().__init__()
        if structure not in ("fc-sc", "sc-sc"):
            raise ValueError(f"structured head: structure '{structure}' is not fc-sc or sc-sc")
        structured_layers = 1 if structure == "fc-sc" else 2
        if len(hidden) < structured_layers:
            raise ValueError(f"structure {structure} needs at least {structured_layers} hidden widths, got {hidden}")
        s2 = hidden[-1]
        if structure == "sc-sc" and shared_units:
            raise ValueError("shared_units applies to fc-sc only")
        if not 0 <= shared_units <= s2:
            raise ValueError(f"shared_units must lie in [0, {s2}] (the last hidden width), got {shared_units}")
        self.structure, self.shared_units, self.hidden_widths = structure, shared_units, list(hidden)
        self.num_verticals, self.num_classes = len(vertical_sizes), sum(vertical_sizes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.activation = hidden_activation(activation, inplace=False)
        M, N = self.num_verticals, self.num_classes
        # The shared dense layers, laid out as DenseHead.hidden so that the generalist's copy over one to one.
        self.dense = DenseHead(in_features, hidden[:-structured_layers], 1, dropout, activation).hidden
        prev = ([in_features] + hidden)[-structured_layers - 1]
        self.sc1: nn.Linear | None = None
        self.shared: nn.Linear | None = None
        self.private: nn.Linear | None = None
        if structure == "sc-sc":
            s1 = hidden[-2]
            self.sc1 = nn.Linear(prev, M * s1)  # vertical v's block: output rows [v * s1, (v + 1) * s1)
            self.sc2_weight = nn.Parameter(torch.stack([_linear_parameter(s2, s1, s1).data for _ in range(M)]))
            self.sc2_bias = nn.Parameter(torch.stack([_linear_parameter(1, s2, s1).data[0] for _ in range(M)]))
        else:
            if shared_units:
                self.shared = nn.Linear(prev, shared_units)
            if s2 - shared_units:
                self.private = nn.Linear(prev, M * (s2 - shared_units))  # vertical v's block: rows v*(s2-x)...
        self.out_shared_weight = _linear_parameter(N, shared_units, s2) if shared_units else None
        self.out_private_weight = _linear_parameter(N, s2 - shared_units, s2) if s2 - shared_units else None
        self.out_bias = nn.Parameter(_linear_parameter(1, N, s2).data[0])
        self.blocks = VerticalBlocks(vertical_sizes, max_padding)
        # Each class's vertical, for the logits of a subset of classes; follows the module's device, not saved.
        vertical_of_class = torch.repeat_interleave(torch.arange(M), torch.tensor(vertical_sizes), output_size=N)
        self.register_buffer("vertical_of_class", vertical_of_class, persistent=False)

    def private_hidden(self, a: torch.Tensor) -> torch.Tensor | None:
        """(M, k, B): each vertical's private block of the last hidden layer, feature-major (see VerticalBlocks),
        from the shared layers' output a (B, s)."""
        M, a_t = self.num_verticals, a.t()
        if self.sc1 is not None:
            h1 = torch.addmm(self.sc1.bias.unsqueeze(1), self.sc1.weight, a_t).view(M, -1, a.shape[0])  # (M, s1, B)
            h1 = self.dropout(self.activation(h1))
            h2 = torch.baddbmm(self.sc2_bias.unsqueeze(2), self.sc2_weight, h1)  # (M, s2, B)
            return self.dropout(self.activation(h2))
        if self.private is None:
            return None
        h = torch.addmm(self.private.bias.unsqueeze(1), self.private.weight, a_t).view(M, -1, a.shape[0])
        return self.dropout(self.activation(h))

    def last_hidden(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The last hidden layer: its x units shared by every vertical (B, x) and each vertical's private block
        (M, k, B), None where the structure has none."""
        a = self.dense(features)
        shared = self.dropout(self.activation(self.shared(a))) if self.shared is not None else None
        return shared, self.private_hidden(a)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        shared, private = self.last_hidden(features)
        logits = self.out_bias
        if shared is not None:
            logits = logits + F.linear(shared, self.out_shared_weight)
        if private is not None:
            logits = logits + self.blocks(private, self.out_private_weight)
        return logits

    def class_logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of `classes` (K,) alone (a sampled loss): each vertical's private block meets only its own
        classes' output rows, one matmul per vertical among `classes`, so the cost follows K, not N."""
        shared, private = self.last_hidden(features)
        return self._column_logits(shared, private, classes)

    def subset_logits(
        self, features: torch.Tensor, columns: torch.Tensor, blocks: list[ClassBlocks]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, K) logits of `columns` for every image and, per group of `blocks`, (P, S) logits of its classes for
        its rows' images alone, each row one vertical's classes in order from its first entry (entries beyond the
        vertical's size come out 0). A row's logits are one matmul per vertical among the rows, on the vertical's
        slice of the output weights: no (P, S, k) gather of weight rows, which at verticals of 14K classes would
        outweigh the whole head."""
        shared, private = self.last_hidden(features)
        column_logits = self._column_logits(shared, private, columns)
        return column_logits, [self._block_logits(shared, private, b.rows, b.classes.clamp(min=0)) for b in blocks]

    def _grouped(self, verticals: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The order that groups entries by their vertical (`verticals`), and each vertical's count in it."""
        order = torch.argsort(verticals, stable=True)
        return order, torch.bincount(verticals, minlength=self.num_verticals).tolist()

    def _column_logits(
        self, shared: torch.Tensor | None, private: torch.Tensor | None, classes: torch.Tensor
    ) -> torch.Tensor:
        logits = self.out_bias[classes]
        if shared is not None:
            logits = logits + F.linear(shared, self.out_shared_weight[classes])
        if private is not None:
            order, counts = self._grouped(self.vertical_of_class[classes])
            weights = self.out_private_weight.index_select(0, classes[order]).split(counts)
            products = [w @ private[v] for v, w in enumerate(weights) if len(w)]
            grouped = torch.cat(products) if products else private.new_zeros(0, private.shape[2])  # (K, B)
            logits = logits + grouped.index_select(0, inverse_permutation(order)).t()
        return logits

    def _block_logits(
        self,
        shared: torch.Tensor | None,
        private: torch.Tensor | None,
        block_rows: torch.Tensor,
        block_classes: torch.Tensor,
    ) -> torch.Tensor:
        width = block_classes.shape[1]
        order, counts = self._grouped(self.vertical_of_class[block_classes[:, 0]])  # a row's vertical: its 1st class
        # split: views of each vertical's rows whose backward is one concatenation (see VerticalBlocks)
        sizes = self.blocks.sizes
        biases = self.out_bias.split(sizes)
        shared_weights = self.out_shared_weight.split(sizes) if shared is not None else None
        private_weights = self.out_private_weight.split(sizes) if private is not None else None
        parts = []
        for v, images in enumerate(block_rows[order].split(counts)):
            if not len(images):
                continue
            logits = biases[v]
            if shared_weights is not None:
                logits = logits + shared[images] @ shared_weights[v].t()  # (P_v, N_v)
            if private_weights is not None:
                logits = logits + (private_weights[v] @ private[v][:, images]).t()
            parts.append(F.pad(logits, (0, width - sizes[v])))
        if not parts:  # no rows
            return self.out_bias.new_zeros(0, width)
        return torch.cat(parts).index_select(0, inverse_permutation(order))

    @torch.no_grad()
    def copy_from_dense(self, dense: DenseHead) -> StructuredHead:
        """Start from a trained dense head of the same widths: every block copies the dense layer it replaces, so
        this head computes exactly the dense head's function (up to float rounding) until it is trained."""
        linears = [m for m in dense.hidden if isinstance(m, nn.Linear)]
        widths = [m.out_features for m in linears]
        if widths != self.hidden_widths or dense.out.out_features != self.num_classes:
            raise ValueError(
                f"cannot start a {self.structure} head {self.hidden_widths} over {self.num_classes} classes from a "
                f"dense head {widths} over {dense.out.out_features}: widths and classes must match"
            )
        own_dense = [m for m in self.dense if isinstance(m, nn.Linear)]
        for mine, theirs in zip(own_dense, linears, strict=False):
            mine.load_state_dict(theirs.state_dict())
        M, x = self.num_verticals, self.shared_units
        last = linears[-1]
        if self.sc1 is not None:
            first = linears[-2]
            self.sc1.weight.copy_(first.weight.repeat(M, 1))
            self.sc1.bias.copy_(first.bias.repeat(M))
            self.sc2_weight.copy_(last.weight.expand(M, -1, -1))
            self.sc2_bias.copy_(last.bias.expand(M, -1))
        if self.shared is not None:
            self.shared.weight.copy_(last.weight[:x])
            self.shared.bias.copy_(last.bias[:x])
            self.out_shared_weight.copy_(dense.out.weight[:, :x])
        if self.private is not None:
            self.private.weight.copy_(last.weight[x:].repeat(M, 1))
            self.private.bias.copy_(last.bias[x:].repeat(M))
        if self.out_private_weight is not None:
            self.out_private_weight.copy_(dense.out.weight[:, x:])
        self.out_bias.copy_(dense.out.bias)
        return self

    @torch.no_grad()
    def copy_from_specialists(self, heads: list[DenseHead]) -> StructuredHead:
        """Beyond the paper: vertical v's private blocks and its classes' output rows copy specialist v's top layers
        (sc-sc: both hidden layers; fc-sc: the last, its x shared units excepted), the rest staying as they are.
        A specialist's extra 'other' output is dropped. sc-sc then computes, on each vertical's classes, the
        specialist's head applied to the student's features; fc-sc feeds the specialist's last layer the shared
        layer's output instead of the specialist's own, so it starts near, not at, the specialist."""
        if len(heads) != self.num_verticals:
            raise ValueError(f"{len(heads)} specialist heads for {self.num_verticals} verticals")
        x, k = self.shared_units, self.hidden_widths[-1] - self.shared_units
        for v, (head, (a, b)) in enumerate(zip(heads, self.blocks.ranges, strict=True)):
            linears = [m for m in head.hidden if isinstance(m, nn.Linear)]
            if [m.out_features for m in linears] != self.hidden_widths or head.out.out_features < b - a:
                raise ValueError(f"specialist {v}: head widths {[m.out_features for m in linears]} do not match")
            last = linears[-1]
            if self.sc1 is not None:
                s1 = self.hidden_widths[-2]
                self.sc1.weight[v * s1 : (v + 1) * s1].copy_(linears[-2].weight)
                self.sc1.bias[v * s1 : (v + 1) * s1].copy_(linears[-2].bias)
                self.sc2_weight[v].copy_(last.weight)
                self.sc2_bias[v].copy_(last.bias)
            elif self.private is not None:
                self.private.weight[v * k : (v + 1) * k].copy_(last.weight[x:])
                self.private.bias[v * k : (v + 1) * k].copy_(last.bias[x:])
            if self.out_private_weight is not None:
                self.out_private_weight[a:b].copy_(head.out.weight[: b - a, x:])
            if self.out_shared_weight is not None:
                self.out_shared_weight[a:b].copy_(head.out.weight[: b - a, :x])
            self.out_bias[a:b].copy_(head.out.bias[: b - a])
        return self


def head_name(structure: str, hidden: list[int], shared_units: int = 0) -> str:
    """The paper's notation: FC256-FC64, FC256-SC64, SC256-SC64, FC256-SC64(x=16)."""
    kinds = {"fc-fc": [], "fc-sc": ["SC"], "sc-sc": ["SC", "SC"]}[structure]
    kinds = ["FC"] * (len(hidden) - len(kinds)) + kinds
    name = "-".join(f"{k}{w}" for k, w in zip(kinds, hidden, strict=True))
    return name + (f"(x={shared_units})" if shared_units else "")


def head_weight_formula(
    structure: str, in_features: int, hidden: list[int], num_verticals: int, num_classes: int, shared_units: int = 0
) -> int:
    """Weights (biases excluded) of a head, by the paper's formulas; leading dense layers added as s_i * s_(i+1).

    fc-fc: s_b*s1 + s1*s2 + s2*N; fc-sc(x): s_b*s1 + s1*x + M*s1*(s2-x) + s2*N; sc-sc: s_b*s1*M + M*s1*s2 + s2*N.
    """
    M, N = num_verticals, num_classes
    chain = [in_features] + hidden
    sc_layers = {"fc-fc": 0, "fc-sc": 1, "sc-sc": 2}[structure]
    dense_pairs = list(zip(chain[:-1], chain[1:], strict=True))[: len(hidden) - sc_layers]
    total = sum(a * b for a, b in dense_pairs) + hidden[-1] * N
    if structure == "fc-sc":
        s1, s2, x = chain[-2], chain[-1], shared_units
        total += s1 * x + M * s1 * (s2 - x)
    elif structure == "sc-sc":
        s_b, s1, s2 = chain[-3], chain[-2], chain[-1]
        total += s_b * s1 * M + M * s1 * s2
    return total
