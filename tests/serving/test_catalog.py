"""The catalog file format: the committed sample loads, the generator is deterministic, bad rows are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adloop.settings import PROJECT_ROOT
from serving.catalog import CATEGORIES, CatalogError, build_catalog, generate_catalog, load_catalog, write_catalog


def test_committed_sample_loads_with_shared_categories() -> None:
    catalog = load_catalog(PROJECT_ROOT / "serving" / "data" / "ads.csv")
    assert 200 <= len(catalog) <= 1000
    assert set(catalog.categories) == set(CATEGORIES)
    assert all(mask.any() for mask in catalog.format_masks.values())
    assert catalog.bid.min() > 0


def test_generator_is_deterministic_and_scales(tmp_path: Path) -> None:
    assert generate_catalog(50, seed=3) == generate_catalog(50, seed=3)
    rows = generate_catalog(10_000, seed=7)
    write_catalog(rows, tmp_path / "big.csv")
    catalog = load_catalog(tmp_path / "big.csv")
    assert len(catalog) == 10_000 and len(set(catalog.ad_ids)) == 10_000
    day = 20_500  # 2026-02-16: inside the generator's open flights
    assert 0.9 < catalog.live_mask(day).mean() < 1.0  # a few expired / future flights


def test_campaign_cap_is_the_smallest_nonzero(catalog_rows) -> None:
    rows = [dict(r) for r in catalog_rows[:2]]
    rows[1]["campaign_id"] = rows[0]["campaign_id"]
    rows[0]["freq_cap_campaign"], rows[1]["freq_cap_campaign"] = "0", "4"
    catalog = build_catalog(rows, version="t")
    assert catalog.cap_campaign[catalog.campaign_code[0]] == 4


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("formats", "banner_1x1", "row 3: formats"),
        ("bid", "-1", "row 3: bid"),
        ("start_date", "31/12/2026", "row 3: start_date"),
        ("ad_id", "", "row 3: ad_id is empty"),
    ],
)
def test_bad_rows_are_named(catalog_rows, column: str, value: str, message: str) -> None:
    rows = [dict(r) for r in catalog_rows[:3]]
    rows[1][column] = value
    with pytest.raises(CatalogError, match=message):
        build_catalog(rows, version="t")


def test_duplicate_ad_id_is_rejected(catalog_rows) -> None:
    rows = [dict(r) for r in catalog_rows[:3]]
    rows[2]["ad_id"] = rows[0]["ad_id"]
    with pytest.raises(CatalogError, match="repeats row 2"):
        build_catalog(rows, version="t")
    assert np.all(build_catalog(catalog_rows[:3], version="t").cap_ad >= 0)
