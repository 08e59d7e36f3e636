"""The ad catalog: a CSV file of ads, held in memory as numpy columns for vectorised filtering.

File format (`serving/data/ads.csv`, the default catalog, ships in the package; UTF-8, one header row, one ad
per row):

| column              | meaning                                                                     |
| ------------------- | --------------------------------------------------------------------------- |
| `ad_id`             | unique id (the Feast `ad` entity)                                           |
| `campaign_id`       | campaign the ad belongs to (frequency caps and budgets roll up to it)       |
| `advertiser_id`     | advertiser                                                                  |
| `advertiser_domain` | advertiser's domain (OpenRTB `adomain`, matched against `badv`)             |
| `category`          | plain category name: fashion, sports, tech, travel, food, home, beauty, ... |
| `formats`           | `|`-separated slot formats the creative fits (see `KNOWN_FORMATS`)          |
| `pricing`           | `cpc` (charged per tracked click) or `cpm` (charged per impression); empty |
|                     | = `cpc`                                                                     |
| `bid`               | `cpc`: USD per click; `cpm`: USD per 1,000 impressions. The auction ranks |
|                     | by expected USD per impression (pCTR x bid, or bid / 1000) and quotes     |
|                     | eCPM = 1000 x that (OpenRTB prices are CPM)                               |
| `daily_budget`      | USD per UTC day for this ad; 0 = unlimited                                  |
| `campaign_daily_budget` | USD per UTC day shared by the campaign's ads; 0 = unlimited (the        |
|                     | smallest non-zero value over the campaign's rows applies); optional column  |
| `campaign_lifetime_budget` | USD over the campaign's life, shared likewise; 0 = unlimited; optional |
| `start_date`        | first day of the flight, `YYYY-MM-DD` (UTC, inclusive); empty = open        |
| `end_date`          | last day of the flight, inclusive; empty = open                            |
| `freq_cap_ad`       | max impressions of this ad per user per 24 h; 0 = no cap                    |
| `freq_cap_campaign` | max impressions of the campaign per user per 24 h; 0 = no cap (the        |
|                     | smallest non-zero value over the campaign's rows applies)                 |
| `deal_ids`          | `|`-separated OpenRTB PMP deal ids this ad may bid into; empty = open auction only |
| `title`, `image_url`, `landing_url` | the creative                                                |

Loading builds everything the request path needs (id maps, one boolean mask per format, category
and advertiser codes, deal index), so a request only indexes arrays.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

KNOWN_FORMATS = (
    "banner_300x250",
    "banner_728x90",
    "banner_320x50",
    "banner_300x600",
    "banner_160x600",
    "native",
)
CATEGORIES = ("fashion", "sports", "tech", "travel", "food", "home", "beauty", "auto", "finance", "games")
# IAB content taxonomy 1.0 codes of the plain categories (OpenRTB `cat`, `bcat`).
IAB_CATEGORY = {
    "fashion": "IAB18",
    "sports": "IAB17",
    "tech": "IAB19",
    "travel": "IAB20",
    "food": "IAB8",
    "home": "IAB10",
    "beauty": "IAB18-1",
    "auto": "IAB2",
    "finance": "IAB13",
    "games": "IAB9-30",
}
COLUMNS = (
    "ad_id",
    "campaign_id",
    "advertiser_id",
    "advertiser_domain",
    "category",
    "formats",
    "pricing",
    "bid",
    "daily_budget",
    "campaign_daily_budget",
    "campaign_lifetime_budget",
    "start_date",
    "end_date",
    "freq_cap_ad",
    "freq_cap_campaign",
    "deal_ids",
    "title",
    "image_url",
    "landing_url",
)
OPTIONAL_COLUMNS = ("pricing", "campaign_daily_budget", "campaign_lifetime_budget")  # older files lack them
PRICING = ("cpc", "cpm")
OPEN_START, OPEN_END = -(2**31), 2**31 - 1  # epoch days standing for an open flight


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the row and column."""


@dataclass(frozen=True, eq=False)
class Catalog:
    """Immutable columns of n ads (row i is the same ad in every array)."""

    version: str  # content hash, changes when the file changes
    ad_ids: np.ndarray  # (n,) object str
    campaign_code: np.ndarray  # (n,) int32 -> campaign_ids
    campaign_ids: list[str]
    advertiser_code: np.ndarray  # (n,) int32 -> advertiser_ids / advertiser_domains
    advertiser_ids: list[str]
    advertiser_domains: list[str]
    category_code: np.ndarray  # (n,) int32 -> categories
    categories: list[str]
    format_masks: dict[str, np.ndarray]  # format -> (n,) bool
    bid: np.ndarray  # (n,) float64, USD per click (cpc) or per 1,000 impressions (cpm)
    daily_budget: np.ndarray  # (n,) float64, USD per day, 0 = unlimited
    start_day: np.ndarray  # (n,) int64 epoch days, inclusive
    end_day: np.ndarray  # (n,) int64 epoch days, inclusive
    cap_ad: np.ndarray  # (n,) int32, 0 = no cap
    cap_campaign: np.ndarray  # (n_campaigns,) int32, 0 = no cap
    cpm: np.ndarray  # (n,) bool, charged per impression (else per click)
    campaign_daily: np.ndarray  # (n_campaigns,) float64, USD per day, 0 = unlimited
    campaign_lifetime: np.ndarray  # (n_campaigns,) float64, USD in all, 0 = unlimited
    deals: dict[str, np.ndarray]  # deal id -> row indices
    creatives: list[dict[str, str]]  # row -> {title, image_url, landing_url}
    formats: list[str]  # row -> formats (for listings)
    index: dict[str, int] = field(default_factory=dict)  # ad_id -> row
    campaign_index: dict[str, int] = field(default_factory=dict)  # campaign_id -> code

    def __len__(self) -> int:
        return len(self.ad_ids)

    def expected_value(self, rows: np.ndarray, pctr: np.ndarray) -> np.ndarray:
        """(c,) expected USD per impression of `rows` at click probabilities `pctr` (the auction's ranking)."""
        bid = self.bid[rows]
        return np.where(self.cpm[rows], bid / 1000.0, pctr * bid)

    def live_mask(self, day: int) -> np.ndarray:
        """(n,) bool: ads whose flight covers `day` (epoch days, UTC)."""
        return (self.start_day <= day) & (day <= self.end_day)

    def describe(self, row: int) -> dict:
        """One ad as JSON-ready data (listings, responses)."""
        return {
            "ad_id": self.ad_ids[row],
            "campaign_id": self.campaign_ids[self.campaign_code[row]],
            "advertiser_id": self.advertiser_ids[self.advertiser_code[row]],
            "advertiser_domain": self.advertiser_domains[self.advertiser_code[row]],
            "category": self.categories[self.category_code[row]],
            "formats": self.formats[row],
            "pricing": "cpm" if self.cpm[row] else "cpc",
            "bid": float(self.bid[row]),
            "daily_budget": float(self.daily_budget[row]),
            "campaign_daily_budget": float(self.campaign_daily[self.campaign_code[row]]),
            "campaign_lifetime_budget": float(self.campaign_lifetime[self.campaign_code[row]]),
            "start_day": _day_text(int(self.start_day[row]), OPEN_START),
            "end_day": _day_text(int(self.end_day[row]), OPEN_END),
            "freq_cap_ad": int(self.cap_ad[row]),
            "freq_cap_campaign": int(self.cap_campaign[self.campaign_code[row]]),
            "creative": self.creatives[row],
        }


def load_catalog(path: Path) -> Catalog:
    """Read and validate a catalog CSV; raises `CatalogError` naming the bad row and column."""
    raw = Path(path).read_bytes()
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    if not rows:
        raise CatalogError(f"{path}: no ads")
    missing = [c for c in COLUMNS if c not in rows[0] and c not in OPTIONAL_COLUMNS]
    if missing:
        raise CatalogError(f"{path}: missing columns {missing}")
    return build_catalog(rows, version=hashlib.blake2b(raw, digest_size=8).hexdigest())


def build_catalog(rows: list[dict[str, str]], *, version: str) -> Catalog:
    """Columns from parsed rows (all values as text, as `csv.DictReader` gives them)."""
    n = len(rows)
    ids = np.empty(n, dtype=object)
    index: dict[str, int] = {}
    campaigns: dict[str, int] = {}
    advertisers: dict[str, int] = {}
    domains: list[str] = []
    cats: dict[str, int] = {}
    codes = np.zeros((3, n), dtype=np.int32)
    nums = np.zeros((2, n), dtype=np.float64)
    days = np.zeros((2, n), dtype=np.int64)
    cap_ad = np.zeros(n, dtype=np.int32)
    campaign_caps: dict[int, int] = {}
    campaign_budgets: tuple[dict[int, float], dict[int, float]] = ({}, {})  # daily, lifetime
    cpm = np.zeros(n, dtype=bool)
    masks = {f: np.zeros(n, dtype=bool) for f in KNOWN_FORMATS}
    deals: dict[str, list[int]] = {}
    creatives, formats = [], []
    for i, row in enumerate(rows):
        where = f"row {i + 2}"  # 1-based, after the header
        ad_id = _text(row, "ad_id", where)
        if ad_id in index:
            raise CatalogError(f"{where}: ad_id {ad_id!r} repeats row {index[ad_id] + 2}")
        ids[i], index[ad_id] = ad_id, i
        codes[0, i] = campaigns.setdefault(_text(row, "campaign_id", where), len(campaigns))
        advertiser = _text(row, "advertiser_id", where)
        if advertiser not in advertisers:
            advertisers[advertiser] = len(advertisers)
            domains.append(row.get("advertiser_domain", "").strip().lower())
        codes[1, i] = advertisers[advertiser]
        codes[2, i] = cats.setdefault(_text(row, "category", where).lower(), len(cats))
        fmts = [f.strip() for f in row["formats"].split("|") if f.strip()]
        unknown = [f for f in fmts if f not in masks]
        if unknown or not fmts:
            raise CatalogError(f"{where}: formats {row['formats']!r}: unknown {unknown}; known: {KNOWN_FORMATS}")
        for f in fmts:
            masks[f][i] = True
        formats.append(fmts)
        pricing = (row.get("pricing") or "cpc").strip().lower()
        if pricing not in PRICING:
            raise CatalogError(f"{where}: pricing {row['pricing']!r} is not one of {PRICING}")
        cpm[i] = pricing == "cpm"
        nums[0, i] = _number(row, "bid", where, float, positive=True)
        for budgets, column in zip(
            campaign_budgets, ("campaign_daily_budget", "campaign_lifetime_budget"), strict=True
        ):
            _smallest(budgets, int(codes[0, i]), _number(row, column, where, float))
        nums[1, i] = _number(row, "daily_budget", where, float)
        days[0, i] = _day(row, "start_date", where, OPEN_START)
        days[1, i] = _day(row, "end_date", where, OPEN_END)
        cap_ad[i] = _number(row, "freq_cap_ad", where, int)
        _smallest(campaign_caps, int(codes[0, i]), _number(row, "freq_cap_campaign", where, int))
        for deal in filter(None, (d.strip() for d in row.get("deal_ids", "").split("|"))):
            deals.setdefault(deal, []).append(i)
        creatives.append({k: row.get(k, "").strip() for k in ("title", "image_url", "landing_url")})
    cap_campaign = np.zeros(len(campaigns), dtype=np.int32)
    for code, cap in campaign_caps.items():
        cap_campaign[code] = cap
    campaign_daily, campaign_lifetime = np.zeros((2, len(campaigns)))
    for values, budgets in zip((campaign_daily, campaign_lifetime), campaign_budgets, strict=True):
        for code, budget in budgets.items():
            values[code] = budget
    return Catalog(
        version=version,
        ad_ids=ids,
        campaign_code=codes[0],
        campaign_ids=list(campaigns),
        advertiser_code=codes[1],
        advertiser_ids=list(advertisers),
        advertiser_domains=domains,
        category_code=codes[2],
        categories=list(cats),
        format_masks=masks,
        bid=nums[0],
        daily_budget=nums[1],
        start_day=days[0],
        end_day=days[1],
        cap_ad=cap_ad,
        cap_campaign=cap_campaign,
        cpm=cpm,
        campaign_daily=campaign_daily,
        campaign_lifetime=campaign_lifetime,
        deals={d: np.asarray(rows_, dtype=np.int64) for d, rows_ in deals.items()},
        creatives=creatives,
        formats=formats,
        index=index,
        campaign_index=campaigns,
    )


def generate_catalog(
    n_ads: int,
    *,
    seed: int = 7,
    n_deals: int = 3,
    categories: Sequence[str] = CATEGORIES,
    formats: Sequence[str] | None = None,
    plain: bool = False,
    cpm_share: float = 0.0,
) -> list[dict[str, str]]:
    """A synthetic catalog of `n_ads` rows (deterministic for a seed): ~8 ads per campaign, ~3 campaigns
    per advertiser, one category per campaign, CPC bids log-normal around $0.50. By default each ad has
    1-3 random formats and the catalog has a few expired / future flights, deal ads, budgets and caps;
    `formats` gives every ad those formats, and `plain` leaves out flights, deals, budgets and caps
    (the demo, where only the users' preferences should decide what is served); `cpm_share` of the
    campaigns buy impressions (CPM bid = 50 x a CPC bid: the same expected price at a 5% CTR)."""
    rng = random.Random(seed)
    rows = []
    n_campaigns = max(1, n_ads // 8)
    for i in range(n_ads):
        campaign = rng.randrange(n_campaigns)
        advertiser = campaign // 3
        category = categories[campaign % len(categories)]
        fmts = list(formats) if formats else rng.sample(KNOWN_FORMATS, rng.randint(1, 3))
        flight = 1.0 if plain else rng.random()
        start, end = ("2025-01-01", "2030-12-31")
        if flight < 0.03:
            end = "2025-06-30"  # expired
        elif flight < 0.05:
            start = "2031-01-01"  # not started
        deal = f"deal-{rng.randrange(n_deals)}" if not plain and rng.random() < 0.05 else ""
        pricing = "cpm" if (campaign * 0.618034) % 1 < cpm_share else "cpc"  # a campaign buys one way
        scale = 50 if pricing == "cpm" else 1
        rows.append(
            {
                "ad_id": f"ad-{i:05d}",
                "campaign_id": f"cmp-{campaign:04d}",
                "advertiser_id": f"adv-{advertiser:04d}",
                "advertiser_domain": f"advertiser{advertiser}.example.com",
                "category": category,
                "formats": "|".join(sorted(fmts)),
                "pricing": pricing,
                "bid": f"{min(5.0, rng.lognormvariate(-0.7, 0.3 if plain else 0.5)) * scale:.3f}",
                "daily_budget": "0" if plain else str(rng.choice([0, 50, 200, 1000])),
                "campaign_daily_budget": "0" if plain else str([0, 500, 2000][campaign % 3]),
                "campaign_lifetime_budget": "0" if plain else str([0, 0, 20_000][campaign % 3]),
                "start_date": start,
                "end_date": end,
                "freq_cap_ad": "0" if plain else str(rng.choice([0, 3, 5, 10])),
                "freq_cap_campaign": "0" if plain else str([0, 10, 20][campaign % 3]),
                "deal_ids": deal,
                "title": f"{category.title()} offer {i}",
                "image_url": f"https://cdn.example.com/creatives/{i:05d}.jpg",
                "landing_url": f"https://advertiser{advertiser}.example.com/landing/{i}",
            }
        )
    return rows


def write_catalog(rows: list[dict[str, str]], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def epoch_day(value: date) -> int:
    return (value - date(1970, 1, 1)).days


# --- helpers ------------------------------------------------------------------------------


def _text(row: dict[str, str], column: str, where: str) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise CatalogError(f"{where}: {column} is empty")
    return value


def _number(row: dict[str, str], column: str, where: str, kind: type, *, positive: bool = False):
    text = (row.get(column) or "").strip() or "0"
    try:
        value = kind(text)
    except ValueError as error:
        raise CatalogError(f"{where}: {column} {text!r} is not a {kind.__name__}") from error
    if value < 0 or (positive and value <= 0):
        raise CatalogError(f"{where}: {column} {text!r} must be {'> 0' if positive else '>= 0'}")
    return value


def _smallest(values: dict[int, float], key: int, value: float) -> None:
    """Keep the smallest non-zero value per key (0 = none): a campaign's rows may disagree, the tightest wins."""
    if value:
        old = values.get(key, 0)
        values[key] = min(old, value) if old else value


def _day(row: dict[str, str], column: str, where: str, default: int) -> int:
    text = (row.get(column) or "").strip()
    if not text:
        return default
    try:
        return epoch_day(date.fromisoformat(text))
    except ValueError as error:
        raise CatalogError(f"{where}: {column} {text!r} is not YYYY-MM-DD") from error


def _day_text(day: int, open_value: int) -> str | None:
    if day == open_value:
        return None
    return date.fromordinal(date(1970, 1, 1).toordinal() + day).isoformat()
