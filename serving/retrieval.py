"""Retrieval of a request's candidates: exact dot products for small catalogs, an approximate index for large.

A catalog of a million ads makes the exact way (a (n, d) matrix-vector product and a partition of n
scores per request) cost milliseconds; `AdIndex` (faiss IVF-Flat, inner product) scans only the
`nprobe` clusters nearest the user, with the request's eligibility as faiss' own id filter, so a
capped or out-of-budget ad is skipped inside the search and the k returned are all eligible. Built with
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
    def __init__(self, matrix: np.ndarray, *, nprobe: int | None = None, seed: int = 0):
        """matrix: (n, d) float32 ad vectors in catalog row order (rows L2-normalised)."""
        faiss.omp_set_num_threads(1)  # one query per call: OpenMP's spinning workers would only take CPU
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        n, d = self.matrix.shape
        self.nlist = max(1, int(2 * math.sqrt(n)))  # ~2,000 clusters of ~500 ads for a million
        self.nprobe = nprobe or max(1, self.nlist // 10)  # ~10% of the catalog scanned: recall@200 ~0.97
        quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, 40 * self.nlist), replace=False)
        self.index.train(self.matrix[np.sort(sample)])
        self.index.add(self.matrix)
        self._quantizer = quantizer  # the IVF index holds it by pointer: keep it alive

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, vector: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        """Rows of (about) the k best-scoring ads where `mask` is True, unordered."""
        eligible = int(np.count_nonzero(mask))
        if eligible <= max(k, EXACT_BELOW):
            rows = np.flatnonzero(mask)
            if len(rows) > k:
                rows = rows[np.argpartition(-(self.matrix[rows] @ vector), k - 1)[:k]]
            return rows
        bitmap = np.packbits(mask, bitorder="little")  # faiss' IDSelectorBitmap: bit i of byte i // 8
        params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)),
                                           nprobe=self.nprobe)  # fmt: skip
        _, ids = self.index.search(np.ascontiguousarray(vector[None], dtype=np.float32), k, params=params)
        rows = ids[0][ids[0] >= 0]
        if len(rows) < k:  # the probed clusters held too few eligible ads: score the eligible exactly
            rows = np.flatnonzero(mask)
            rows = rows[np.argpartition(-(self.matrix[rows] @ vector), k - 1)[:k]]
        return rows


def top_k_indexed(index: AdIndex, vector: np.ndarray, masks, k: int) -> np.ndarray:
    """`serving.serving_state.top_k` through the index: the union over masks of each one's k best (sorted rows)."""
    picked = [index.search(vector, mask, k) for mask in masks]
    if len(picked) == 1:
        return np.sort(picked[0])
    return np.unique(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
