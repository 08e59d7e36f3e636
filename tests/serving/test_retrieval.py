"""Approximate retrieval (faiss IVF, the request's eligibility as its filter) against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from models.testing import ProjectionBundle
from serving.catalog import build_catalog, generate_catalog
from serving.retrieval import EXACT_BELOW, AdIndex, top_k_indexed
from serving.serving_state import ServingState, top_k


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    """Ad vectors in a few hundred clusters, as trained towers place ads of a kind together."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((300, d)).astype(np.float32)
    m = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def index_and_matrix():
    matrix = clustered(60_000)
    return AdIndex(matrix), matrix


def test_recall_at_200_against_exact_is_at_least_095(index_and_matrix) -> None:
    index, matrix = index_and_matrix
    rng = np.random.default_rng(1)
    recalls = []
    for _ in range(40):
        u = matrix[rng.integers(len(matrix))] + 0.3 * rng.standard_normal(matrix.shape[1]).astype(np.float32)
        u /= np.linalg.norm(u)
        mask = rng.random(len(matrix)) < 0.7  # eligibility: flights, budgets, caps...
        got = index.search(u, mask, 200)
        assert len(got) == 200 and mask[got].all()  # only eligible ads come back
        exact = top_k(matrix @ u, [mask], 200)
        recalls.append(len(np.intersect1d(got, exact)) / 200)
    assert np.mean(recalls) >= 0.95, recalls


def test_few_eligible_ads_are_scored_exactly(index_and_matrix) -> None:
    index, matrix = index_and_matrix
    rng = np.random.default_rng(2)
    u = matrix[7]
    mask = np.zeros(len(matrix), dtype=bool)
    mask[rng.choice(len(matrix), 500, replace=False)] = True  # a request's own candidate list, say
    np.testing.assert_array_equal(np.sort(index.search(u, mask, 200)), top_k(matrix @ u, [mask], 200))
    assert EXACT_BELOW > 500
    two = [mask, ~mask]
    got = top_k_indexed(index, u, two, 50)
    assert len(got) == len(np.unique(got)) and mask[got].sum() == 50  # the union over the slots' masks


def test_large_catalog_state_builds_an_index_and_selects_through_it() -> None:
    rows = generate_catalog(3000, seed=3)
    catalog = build_catalog(rows, version="t")
    model = ProjectionBundle(rows)
    assert ServingState(catalog, model).index is None  # small catalogs stay exact
    state = ServingState(catalog, model, index_min_ads=1000)
    assert state.index is not None and len(state.index) == len(catalog)
    u = model.user_vector({"top_categories": ["tech", "food"], "top_category_scores": [2.0, 1.0]})
    mask = catalog.format_masks["native"]
    got = top_k_indexed(state.index, u, [mask], 100)
    exact = top_k(state.ad_matrix @ u, [mask], 100)
    assert len(np.intersect1d(got, exact)) >= 95


def test_an_index_per_format_searches_the_slot_format_and_masks_over_several() -> None:
    matrix = clustered(90_000, seed=4)
    rng = np.random.default_rng(3)
    fmt = rng.integers(0, 3, len(matrix))
    also = rng.random(len(matrix)) < 0.3  # ads that fit format 0 as well: the groups overlap
    index = AdIndex(matrix, [np.flatnonzero((fmt == 0) | also), np.flatnonzero(fmt == 1), np.flatnonzero(fmt == 2)])
    assert len(index.parts) == 3
    fmt_mask = [(fmt == 0) | also, fmt == 1, fmt == 2]
    recalls = []
    for i in range(30):
        u = matrix[rng.integers(len(matrix))]
        mask = (rng.random(len(matrix)) < 0.8) & fmt_mask[i % 3]  # a slot of one format
        got = index.search(u, mask, 200)
        assert len(got) == 200 and mask[got].all()
        recalls.append(len(np.intersect1d(got, top_k(matrix @ u, [mask], 200))) / 200)
    assert np.mean(recalls) >= 0.95, recalls
    both = (fmt != 2) & (rng.random(len(matrix)) < 0.8)  # a mask over two formats: each part searched
    got = index.search(matrix[5], both, 200)
    assert len(got) == 200 and both[got].all()
    assert len(np.intersect1d(got, top_k(matrix @ matrix[5], [both], 200))) >= 190
