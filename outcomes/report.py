"""`adloop report`: what targeting achieved, from the outcomes store, as rich tables and PNG charts.

`collect(store)` gathers the numbers (plain data, tested); `render(console, report)` prints them;
`write_charts(report, folder)` draws CTR over time by arm and impressions / clicks per campaign
with matplotlib (Agg backend: no display needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from models.estimators import Lift, wilson
from outcomes.store import Filters, OutcomeStore


@dataclass
class Report:
    total: dict[str, Any]
    arms: list[dict[str, Any]]
    lift: Lift
    campaigns: list[dict[str, Any]]
    models: list[dict[str, Any]]
    over_time: list[dict[str, Any]]  # arm x minute
    bucket: str  # minute or hour
    money: dict[str, Any]  # conversion_rate: Lift, revenue_per_impression: dict or None (OutcomeStore.money_lift)
    unattributed: dict[str, Any]  # conversions and revenue no touch was credited with
    segments: list[dict[str, Any]]  # per segment x arm
    ledger: list[dict[str, Any]]  # charges and spend per campaign, UTC day and arm (OutcomeStore.spend)


def collect(store: OutcomeStore, filters: Filters | None = None) -> Report:
    arms = [_ci(r) for r in store.outcomes(["arm"], filters)]
    over_time = store.outcomes(["arm", "minute"], filters)
    bucket = "minute"
    if len({r["minute"] for r in over_time}) > 180:  # a long run: hourly points read better
        over_time, bucket = store.outcomes(["arm", "hour"], filters), "hour"
    return Report(
        total=_ci(store.outcomes([], filters)[0]),
        arms=arms,
        lift=store.lift(filters),
        campaigns=sorted((_ci(r) for r in store.outcomes(["campaign"], filters)), key=lambda r: -r["impressions"]),
        models=[_ci(r) for r in store.outcomes(["model_version", "arm"], filters)],
        over_time=over_time,
        bucket=bucket,
        money=store.money_lift(filters),
        unattributed=store.unattributed(filters.start if filters else None, filters.end if filters else None),
        segments=store.outcomes(["segment", "arm"], filters),
        ledger=store.spend(filters),
    )


def render(console: Console, report: Report, *, top_campaigns: int = 15) -> None:
    total = report.total
    console.print(
        f"[bold]{total['impressions']:,}[/bold] impressions, [bold]{total['clicks']:,}[/bold] clicks, "
        f"{total['conversions']:,} conversions, CTR {_pct(total['ctr'])}"
    )
    arms = Table("arm", "impressions", "clicks", "CTR", "95% CI (Wilson)", title="Click rate per arm")
    for r in report.arms:
        arms.add_row(r["arm"], f"{r['impressions']:,}", f"{r['clicks']:,}", _pct(r["ctr"]), _range(r))
    console.print(arms)
    lift_table = Table("measure", "value", "95% CI", "method", title="Lift of targeted over control")
    d, rel = report.lift.difference, report.lift.relative
    lift_table.add_row("CTR difference", _pp(d.value), f"[{_pp(d.low)}, {_pp(d.high)}]", "Newcombe hybrid score")
    if rel is not None:
        lift_table.add_row(
            "relative lift", f"{rel.value:+.1%}", f"[{rel.low:+.1%}, {rel.high:+.1%}]", "delta method, log ratio"
        )
    else:
        lift_table.add_row("relative lift", "-", "-", "needs clicks in both arms")
    by_user = report.lift.by_user
    if by_user is not None:  # the arm is drawn per user: users, not impressions, are the independent units
        units = f"{by_user.users_targeted:,} + {by_user.users_control:,} users as units"
        d = by_user.difference
        lift_table.add_row("CTR difference", _pp(d.value), f"[{_pp(d.low)}, {_pp(d.high)}]", units)
        if by_user.relative is not None:
            rel = by_user.relative
            lift_table.add_row("relative lift", f"{rel.value:+.1%}", f"[{rel.low:+.1%}, {rel.high:+.1%}]", units)
    console.print(lift_table)
    render_money(console, report, top_campaigns=top_campaigns)
    campaigns = Table("campaign", "impressions", "clicks", "CTR", "95% CI", "conversions", "spend", "ROAS",
                      title=f"Top {top_campaigns} campaigns")  # fmt: skip
    for r in report.campaigns[:top_campaigns]:
        campaigns.add_row(r["campaign"], f"{r['impressions']:,}", f"{r['clicks']:,}", _pct(r["ctr"]), _range(r),
                          f"{r['conversions']:,}", _usd(r["spend"]), _roas(r["roas"]))  # fmt: skip
    console.print(campaigns)
    models = Table("model version", "arm", "impressions", "clicks", "CTR", "95% CI", title="Model versions")
    for r in report.models:
        models.add_row(
            r["model_version"], r["arm"], f"{r['impressions']:,}", f"{r['clicks']:,}", _pct(r["ctr"]), _range(r)
        )
    console.print(models)


def render_money(console: Console, report: Report, *, top_campaigns: int = 15) -> None:
    """Conversions, conversion rate, revenue, spend, CPA and ROAS per arm, model version, campaign and segment;
    their lift; the spend ledger per UTC day and arm."""
    columns = ("impressions", "conversions", "conv. rate", "revenue", "spend", "CPA", "ROAS")
    arms = Table("arm", *columns, title="What it earned, per arm (USD)")
    for r in report.arms:
        arms.add_row(r["arm"], *_money(r))
    console.print(arms)
    models = Table("model version", "arm", *columns, title="Per model version")
    for r in report.models:
        models.add_row(r["model_version"], r["arm"], *_money(r))
    console.print(models)
    campaigns = Table("campaign", *columns, title=f"Per campaign (top {top_campaigns} by spend)")
    for r in sorted(report.campaigns, key=lambda r: (-r["spend"], -r["impressions"]))[:top_campaigns]:
        campaigns.add_row(r["campaign"], *_money(r))
    console.print(campaigns)
    segments = Table("segment", "arm", *columns, title="Per segment (activity / device / country)")
    for r in sorted(report.segments, key=lambda r: -r["impressions"])[:12]:
        segments.add_row(r["segment"], r["arm"], *_money(r))
    console.print(segments)
    lift_table = Table("measure", "value", "95% CI", "method", title="Lift of targeted over control: money")
    conversion = report.money["conversion_rate"]
    d = conversion.difference
    lift_table.add_row("conversion rate difference", _pp(d.value), f"[{_pp(d.low)}, {_pp(d.high)}]", "Newcombe")
    if conversion.by_user is not None:
        d = conversion.by_user.difference
        lift_table.add_row(
            "conversion rate difference", _pp(d.value), f"[{_pp(d.low)}, {_pp(d.high)}]", "users as units"
        )
    per_impression = report.money["revenue_per_impression"]
    if per_impression is not None:
        d = per_impression["difference"]
        lift_table.add_row("revenue per impression difference", f"${d['value']:+.4f}",
                           f"[${d['low']:+.4f}, ${d['high']:+.4f}]", "users as units")  # fmt: skip
    else:
        lift_table.add_row("revenue per impression difference", "-", "-", "needs two users per arm")
    console.print(lift_table)
    u = report.unattributed
    console.print(f"unattributed conversions (no click within the window): {u['conversions']:,}, {_usd(u['revenue'])}")
    days: dict[tuple[str, str], list[float]] = {}
    for r in report.ledger:  # per campaign, day and arm -> per day and arm
        charged = days.setdefault((r["day"], r["arm"]), [0, 0.0])
        charged[0] += r["charges"]
        charged[1] += r["spend"]
    ledger = Table("UTC day", "arm", "charges", "spend", title="Spend ledger per day and arm (every charge landed)")
    for (day, arm), (charges, spend) in sorted(days.items()):
        ledger.add_row(day, arm, f"{charges:,}", _usd(spend))
    console.print(ledger)


def write_charts(report: Report, folder: Path) -> list[Path]:
    """Two PNGs under `folder`: ctr_over_time.png, campaigns.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for arm, colour in (("targeted", "#2f6fdd"), ("control", "#e0792b")):
        rows = [r for r in report.over_time if r["arm"] == arm]
        if rows:
            times = [datetime.fromisoformat(r[report.bucket].replace("Z", "+00:00")) for r in rows]
            ax.plot(times, [100 * r["ctr"] for r in rows], "o-", color=colour, label=arm)
    ax.set(title=f"Click rate per {report.bucket} by arm", ylabel="CTR (%)", xlabel=f"{report.bucket} (UTC)")
    locator = mdates.AutoDateLocator(minticks=3, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, folder / "ctr_over_time.png"))
    plt.close(fig)

    top = report.campaigns[:15]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    xs = range(len(top))
    ax.bar([x - 0.2 for x in xs], [r["impressions"] for r in top], width=0.4, label="impressions", color="#9bb7e8")
    ax2 = ax.twinx()
    ax2.bar([x + 0.2 for x in xs], [r["clicks"] for r in top], width=0.4, label="clicks", color="#2f6fdd")
    ax.set_xticks(list(xs), [r["campaign"] for r in top], rotation=45, fontsize=7)
    ax.set(title="Impressions and clicks per campaign (top 15)", ylabel="impressions")
    ax2.set_ylabel("clicks")
    fig.legend(loc="upper center", bbox_to_anchor=(0.6, 0.9))
    fig.tight_layout()
    paths.append(_save(fig, folder / "campaigns.png"))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path)
    return path


def _ci(row: dict[str, Any]) -> dict[str, Any]:
    interval = wilson(row["clicks"], row["impressions"])
    return {**row, "ctr_low": interval.low, "ctr_high": interval.high}


def _money(row: dict[str, Any]) -> list[str]:
    return [f"{row['impressions']:,}", f"{row['conversions']:,}", _pct(row["conversion_rate"]), _usd(row["revenue"]),
            _usd(row["spend"]), _usd(row["cpa"]), _roas(row["roas"])]  # fmt: skip


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def _roas(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _pp(value: float) -> str:
    return "-" if value != value else f"{100 * value:+.2f} pp"


def _range(row: dict[str, Any]) -> str:
    return f"[{row['ctr_low']:.2%}, {row['ctr_high']:.2%}]" if row["impressions"] else "-"
