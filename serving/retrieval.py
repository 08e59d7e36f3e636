"""Retrieval of a request's candidates: exact dot products for small catalogs, an approximate index for large.

A catalog of a million ads makes the exact way (a (n, d) matrix-vector product and a partition of n
scores per request) cost milliseconds; `AdIndex` (faiss IVF with 4-bit fast-scan codes, inner product,
one index per ad format) scans only the `nprobe` clusters nearest the user among the ads of the slot's
format, with the request's eligibility as faiss' own id filter, so a capped or out-of-budget ad is skipped
inside the search, and scores exactly the few rows the codes rank best: the k returned are all eligible.
One index over every format would spend most of its scan on ads the slot's format filters out. Built with
the `ServingState` (at load and on every catalog or model reload, in the thread that reloads, never
on the request path) and replaced with it whole. Recall@200 against exact search is measured by
`python -m bench.select_path --ads 1000000` and tested on clustered vectors (tests/serving/test_retrieval.py).

Where the filter leaves few ads (a request's own candidate list, a niche format) an IVF probe may
find fewer than k of them; then the eligible rows are scored exactly, which is cheap for few rows.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

EXACT_BELOW = 20_000  # eligible rows under which exact scoring is as cheap as a probe (and exact)
RERANK = 4  # rows per wanted one that a part's approximate scores choose for exact scoring


class AdIndex:
    """One IVF index per group of rows (per ad format: a slot asks for one format, so its search scans
    only vectors it may return instead of filtering most of them out). Groups may overlap (an ad fitting
    several formats is in each of their indexes)."""

    def __init__(self, matrix: np.ndarray, groups: list[np.ndarray] | None = None, *, seed: int = 0):
        """matrix: (n, d) float32 ad vectors in catalog row order (rows L2-normalised); groups: row arrays
        (default: one group of every row); rows in no group form one more."""
        faiss.omp_set_num_threads(1)  # one query per call: OpenMP's spinning workers would only take CPU
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        n = len(self.matrix)
        groups = [np.arange(n)] if groups is None else [np.asarray(g, dtype=np.int64) for g in groups if len(g)]
        covered = np.zeros(n, dtype=bool)
        for rows in groups:
            covered[rows] = True
        if not covered.all():
            groups.append(np.flatnonzero(~covered))
        assert len(groups) <= 64, "one bit per group in `member`"
        self.member = np.zeros(n, dtype=np.uint64)  # bit g: the row is in group g
        for g, rows in enumerate(groups):
            self.member[rows] |= np.uint64(1 << g)
        self.parts = [_Part(rows, self.matrix[rows], n, seed) for rows in groups]

    def __len__(self) -> int:
        return len(self.matrix)

    def search(self, vector: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        """Rows of (about) the k best-scoring ads where `mask` is True, unordered."""
        eligible = int(np.count_nonzero(mask))
        if eligible <= max(k, EXACT_BELOW):
            return self._exact(vector, np.flatnonzero(mask), k)
        bitmap = np.packbits(mask, bitorder="little")  # faiss' IDSelectorBitmap: bit i of byte i // 8
        bits = int(self.member[int(np.argmax(mask))])  # the groups of the first eligible row
        for g in (g for g in range(len(self.parts)) if bits >> g & 1):
            part = self.parts[g]
            if not (bitmap & part.outside).any():  # the whole mask in this group: one search (packed: 8x fewer bytes)
                rows = part.search(vector, bitmap, RERANK * k)
                return self._exact(vector, rows if len(rows) >= k else np.flatnonzero(mask), k)
        # a mask over several groups (formats): each group it touches searched, the best k of their union
        found = [part.search(vector, bitmap, RERANK * k) for part in self.parts if (mask & part.inside).any()]
        union = np.unique(np.concatenate(found))
        return self._exact(vector, union if len(union) >= k else np.flatnonzero(mask), k)

    def _exact(self, vector: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
        if len(rows) > k:
            rows = rows[np.argpartition(-(self.matrix[rows] @ vector), k - 1)[:k]]
        return rows


class _Part:
    """An IVF index over some catalog rows (inner product) whose ids are the catalog rows themselves, so a
    request's mask over the whole catalog is its filter as it is (no gather of the part's rows per request).

    The lists hold 4-bit product-quantized codes, one sub-quantizer per dimension, scanned with faiss' SIMD
    fast-scan: a probed list costs a fraction of a float scan, so more lists are probed for the same time, and
    the approximate scores only choose `RERANK` x k rows that `AdIndex` scores exactly. An odd dimension
    (fast-scan wants an even number of sub-quantizers) keeps float lists."""

    def __init__(self, rows: np.ndarray, matrix: np.ndarray, n_catalog: int, seed: int):
        n, d = matrix.shape
        self.inside = np.zeros(n_catalog, dtype=bool)
        self.inside[rows] = True
        self.outside = np.packbits(~self.inside, bitorder="little")  # as the request's bitmap is packed
        self.nlist = max(1, int(2 * math.sqrt(n)))  # ~1,150 lists of ~290 ads for 333,000 ads of one format
        self.nprobe = max(1, self.nlist // 3)  # a third of the lists: recall@200 >= 0.95 on the bench model
        codes = f"PQ{d}x4fs" if d % 2 == 0 else "Flat"
        self.index = faiss.index_factory(d, f"IVF{self.nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, 40 * self.nlist), replace=False)
        self.index.train(matrix[np.sort(sample)])
        self.index.add_with_ids(matrix, rows.astype(np.int64))

    def search(self, vector: np.ndarray, bitmap: np.ndarray, k: int) -> np.ndarray:
        """Catalog rows of (about) the `k` best by the approximate score among this part's ads whose bit is set
        in `bitmap` (the request's mask over the catalog, packed little-endian)."""
        selector = faiss.IDSelectorBitmap(len(self.inside), faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        _, ids = self.index.search(np.ascontiguousarray(vector[None], dtype=np.float32), k, params=params)
        return ids[0][ids[0] >= 0]


def top_k_indexed(index: AdIndex, vector: np.ndarray, masks, k: int) -> np.ndarray:
    """`serving.serving_state.top_k` through the index: the union over masks of each one's k best (sorted rows)."""
    picked = [index.search(vector, mask, k) for mask in masks]
    if len(picked) == 1:
        return np.sort(picked[0])
    return np.unique(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
