"""Gaussian filtering in a few feature dimensions with the permutohedral lattice (Adams, Baek & Davis,
"Fast High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics 2010), as the dense CRF
of Krähenbühl & Koltun builds it (docs/crf.md §4), vectorised in PyTorch.

For N points with features f (N, d) and values v (N, C) the filter approximates

    out_i = Σ_j exp(-|f_i - f_j|² / 2) v_j            (the j = i term included)

up to a constant factor, in O(N·d²·C): each point is *splatted* onto the d+1 vertices of the lattice
simplex that encloses it (barycentric weights), the lattice is *blurred* with [1/2, 1, 1/2] along each
of its d+1 axes, and the result is *sliced* back at the points with the same weights. The features are
scaled so that the blurred lattice's Gaussian has unit standard deviation: a Gaussian of width θ is
filtered by dividing the features by θ first.

Where the C++ implementation keeps the vertices in a hash table and loops over them, here they are
integer keys made unique by one sort and found by binary search (torch.searchsorted), and splat, blur
and slice are sparse matrices built once per lattice (filtering is then d+3 sparse matrix products).
The same vertices, weights and blur as the reference: the output equals its output up to float
summation order. Works on any device. `Exact` is the O(N²) definition, for measuring the lattice's
error on small inputs.
"""

from __future__ import annotations

import math
import warnings

import torch

# Keys are packed into one int64 per vertex; the packed range must stay below this (sign bit, headroom).
MAX_KEY = 2 ** 62


class Lattice:
    """The lattice of N points' features (N, d), d >= 1; `filter` then runs on values (N, C)."""

    def __init__(self, features: torch.Tensor):
        if features.ndim != 2 or features.shape[1] < 1:
            raise ValueError(f"features: expected (N, d) with d >= 1, got {tuple(features.shape)}")
        n, d = features.shape
        weights, keys, radix = _simplices(features.float())  # (N, d+1) each; (d,)
        # One stable sort gives the vertices (M, ascending), each point's d+1 vertices, and the splat
        # matrix S (M, N) row by row: the points at each vertex, in point order, with their weights.
        key, order = torch.sort(keys.flatten(), stable=True)
        vertices, vertex, count = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
        del key
        self.m = m = len(vertices)
        self.splat = _csr(torch.cat([count.new_zeros(1), count.cumsum(0)]),
                          torch.div(order, d + 1, rounding_mode="floor"), weights.flatten()[order], (m, n))
        # Slice αSᵀ (N, M): each point's vertices (ascending) and weights; α = 1 / (1 + 2^-d) is the
        # reference's normalising constant of the blur.
        offsets = torch.empty_like(vertex).scatter_(0, order, vertex).reshape(n, d + 1)
        del order, vertex
        cols, pick = offsets.sort(1)
        self.slice = _csr(torch.arange(0, n * (d + 1) + 1, d + 1, device=offsets.device), cols,
                          weights.gather(1, pick) / (1.0 + 2.0 ** -d), (n, m))
        del offsets, cols, pick, weights
        self.blur = [_blur(vertices, radix, j) for j in range(d + 1)]

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C): splat, blur along each axis, slice."""
        x = self.splat @ values.float()  # (M, C)
        for b in self.blur:
            x = b @ x
        return self.slice @ x


def _simplices(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's enclosing simplex, as the reference computes it (Adams et al. §3.1 and p.10): the
    barycentric weights (N, d+1) of its vertices, their packed keys (N, d+1) int64 (vertex r in column r),
    and the packing's radix (d,)."""
    n, d = f.shape
    dev = f.device
    # E's diagonal part times the inverse of the lattice blur's standard deviation, sqrt(2/3)(d+1):
    # computed in float64 and rounded to float32 as the C++ code does.
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], dtype=torch.float32,
                         device=dev)
    cf = f * scale  # (N, d)
    # Elevate onto the plane Σ x = 0 of R^{d+1}: y = E f, accumulated from the last feature as the C++ code.
    elevated = torch.empty(n, d + 1, device=dev)
    sm = torch.zeros(n, device=dev)
    for j in range(d, 0, -1):
        elevated[:, j] = sm - j * cf[:, j - 1]
        sm = sm + cf[:, j - 1]
    elevated[:, 0] = sm

    # The nearest remainder-0 lattice point rem0 = (d+1) v; rounding half to even, as SSE's cvtps under
    # the default rounding mode.
    down = torch.tensor(1.0 / (d + 1), dtype=torch.float32)
    v = torch.round(elevated * down)
    # rank[i]: how many coordinates of (elevated - rem0) are larger than coordinate i, ties ranking the
    # earlier coordinate larger (as the reference's pairwise loop): the position in a stable descending sort.
    order = torch.argsort(elevated - v * (d + 1), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d + 1, device=dev).expand(n, d + 1))
    # Bring the point back onto the plane when the rounded coordinates don't sum to zero.
    rank += v.sum(1).long()[:, None]  # integers: the exact sum
    wrap = (rank < 0).long() - (rank > d).long()
    rank += (d + 1) * wrap
    v += wrap

    # Barycentric coordinates of the point in its simplex.
    bary = torch.zeros(n, d + 2, device=dev)
    frac = (elevated - v * (d + 1)) * down
    for i in range(d + 1):
        bary.scatter_add_(1, d - rank[:, i:i + 1], frac[:, i:i + 1])
        bary.scatter_add_(1, d - rank[:, i:i + 1] + 1, -frac[:, i:i + 1])
    bary[:, 0] += 1 + bary[:, d + 1]

    # The simplex's vertices: vertex r adds r to rem0's coordinates, or r - (d+1) where rank > d - r. Every
    # coordinate of vertex r is ≡ r (mod d+1): it is (r, q) with key = r + (d+1) q, q = v - [rank > d - r].
    # Only the first d coordinates count (the last is minus their sum). (r, q) is packed into one int64,
    # injective on a box around q widened by 1 on each side (q is v or v - 1), so that the blur's
    # neighbours (q ± 1) pack without aliasing too.
    vi = v[:, :d].long()  # (N, d)
    lo = vi.amin(0) - 2
    span = vi.amax(0) - lo + 2
    if (d + 1) * math.prod(span.tolist()) >= MAX_KEY:
        raise ValueError("permutohedral lattice keys do not fit in 64 bits: the features span too many "
                         "kernel widths; use wider kernels")
    radix = torch.cumprod(torch.cat([span.new_ones(1), span[:-1]]), 0)  # (d,)
    r = torch.arange(d + 1, device=dev)
    keys = r + (d + 1) * ((vi - lo) * radix).sum(1, keepdim=True)  # (N, d+1)
    for i in range(d):
        keys -= (d + 1) * int(radix[i]) * (rank[:, i:i + 1] > d - r)
    return bary[:, :d + 1], keys, radix


def _blur(vertices: torch.Tensor, radix: torch.Tensor, j: int) -> torch.Tensor:
    """The blur along axis j as an (M, M) sparse matrix: v + (v[n1] + v[n2]) / 2 with n1 = key + (d+1) e_j - 1,
    n2 = key - (d+1) e_j + 1 (axis d changes only the implied last coordinate). In (r, q): n1 is
    (r-1, q + e_j), or (d, q + e_j - 1) when r = 0; n2 is (r+1, q - e_j), or (0, q - e_j + 1) when r = d.
    A neighbour that is no vertex is left out (the reference reads zeros there)."""
    d, m = len(radix), len(vertices)
    rem, box = vertices % (d + 1), torch.div(vertices, d + 1, rounding_mode="floor")
    every, e = int(radix.sum()), int(radix[j]) if j < d else 0
    n1 = torch.where(rem == 0, d + (d + 1) * (box + e - every), rem - 1 + (d + 1) * (box + e))
    n2 = torch.where(rem == d, (d + 1) * (box - e + every), rem + 1 + (d + 1) * (box - e))
    rows = torch.arange(m, device=vertices.device)
    found = [rows]
    for key in (n1, n2):
        idx = torch.searchsorted(vertices, key).clamp(max=m - 1)
        found.append(torch.where(vertices[idx] == key, idx, m))  # m: none
    cols, _ = torch.stack(found, 1).sort(1)  # (M, 3), "none" last
    keep = cols < m
    vals = torch.where(cols == rows[:, None], 1.0, 0.5)  # the vertex itself 1, its neighbours 1/2
    return _csr(torch.cat([rows.new_zeros(1), keep.sum(1).cumsum(0)]), cols[keep], vals[keep], (m, m))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix (columns ascending within each row); int32 indices where they fit (less memory,
    faster products)."""
    index = torch.int32 if max(len(col), *shape) < 2 ** 31 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(index), col.to(index), values.float(), shape, check_invariants=False)


class Exact:
    """The filter by its definition, Σ_j exp(-|f_i - f_j|² / 2) v_j, in float64 with the N×N kernel
    held in memory: the reference the lattice's error is measured against, for small inputs only."""

    def __init__(self, features: torch.Tensor):
        f = features.double()
        self.kernel = torch.exp(-0.5 * torch.cdist(f, f).square())  # (N, N)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        return (self.kernel @ values.double()).to(values.dtype)
