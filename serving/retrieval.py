"""Retrieval of a request's candidates: exact dot products for small catalogs, an approximate index for large.

A catalog of a million ads makes the exact way (a (n, d) matrix-vector product and a partition of n
scores per request) cost milliseconds; `AdIndex` (faiss IVF-Flat, inner product, one index per ad
format) scans only the `nprobe` clusters nearest the user among the ads of the slot's format, with the
request's eligibility as faiss' own id filter, so a capped or out-of-budget ad is skipped inside the
search and the k returned are all eligible. One index over every format would spend most of its scan
on ads the slot's format filters out. Built with
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


class AdIndex:
    """One IVF-Flat index per group of rows (per ad format: a slot asks for one format, so its search scans
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
        self.parts = [_Part(rows, self.matrix[rows], seed) for rows in groups]

    def __len__(self) -> int:
        return len(self.matrix)

    def search(self, vector: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        """Rows of (about) the k best-scoring ads where `mask` is True, unordered."""
        eligible = int(np.count_nonzero(mask))
        if eligible <= max(k, EXACT_BELOW):
            return self._exact(vector, np.flatnonzero(mask), k)
        bits = int(self.member[int(np.argmax(mask))])  # the groups of the first eligible row
        for g in (g for g in range(len(self.parts)) if bits >> g & 1):
            local = mask[self.parts[g].rows]
            if int(np.count_nonzero(local)) == eligible:  # the whole mask lies in this group: one search
                rows = self.parts[g].search(vector, local, k)
                return rows if len(rows) >= k else self._exact(vector, np.flatnonzero(mask), k)
        # a mask over several groups (formats): each group it touches searched, the best k of their union
        found = [part.search(vector, mask[part.rows], k) for part in self.parts]
        union = np.unique(np.concatenate(found))
        return self._exact(vector, union if len(union) >= k else np.flatnonzero(mask), k)

    def _exact(self, vector: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
        if len(rows) > k:
            rows = rows[np.argpartition(-(self.matrix[rows] @ vector), k - 1)[:k]]
        return rows


class _Part:
    """An IVF-Flat index over some catalog rows (inner product), searched with a mask over those rows."""

    def __init__(self, rows: np.ndarray, matrix: np.ndarray, seed: int):
        n, d = matrix.shape
        self.rows = rows
        self.nlist = max(1, int(2 * math.sqrt(n)))  # ~1,100 lists of ~280 ads for 316,000 ads of one format
        self.nprobe = max(1, self.nlist // 4)  # a quarter of the lists: recall@200 >= 0.95 on the bench model
        self._quantizer = faiss.IndexFlatIP(d)  # the IVF index holds it by pointer: keep it alive
        self.index = faiss.IndexIVFFlat(self._quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, 40 * self.nlist), replace=False)
        self.index.train(matrix[np.sort(sample)])
        self.index.add(matrix)

    def search(self, vector: np.ndarray, local: np.ndarray, k: int) -> np.ndarray:
        """Catalog rows of (about) the k best where `local` (a mask over this part's rows) is True."""
        if not local.any():
            return np.empty(0, dtype=np.int64)
        bitmap = np.packbits(local, bitorder="little")  # faiss' IDSelectorBitmap: bit i of byte i // 8
        params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBitmap(len(local), faiss.swig_ptr(bitmap)),
                                           nprobe=self.nprobe)  # fmt: skip
        _, ids = self.index.search(np.ascontiguousarray(vector[None], dtype=np.float32), k, params=params)
        return self.rows[ids[0][ids[0] >= 0]]


def top_k_indexed(index: AdIndex, vector: np.ndarray, masks, k: int) -> np.ndarray:
    """`serving.serving_state.top_k` through the index: the union over masks of each one's k best (sorted rows)."""
    picked = [index.search(vector, mask, k) for mask in masks]
    if len(picked) == 1:
        return np.sort(picked[0])
    return np.unique(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
