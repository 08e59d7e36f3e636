"""adloop's settings: one pydantic-settings class, read from ADLOOP_* variables and an optional .env."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADLOOP_", env_file=".env", extra="ignore")

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"  # comma-separated host:port list
    kafka_controller_port: int = 9093  # the local broker's KRaft controller listener
    events_topic: str = "adloop.events"  # the clickstream: key = user id, one JSON event per message
    dlq_topic: str = "adloop.events.dlq"  # dead letters: the original bytes, the reason in headers
    event_partitions: int = 12  # user-keyed: one consumer owns all of a user's events; up to 12 consumer processes
    kafka_heap: str = "-Xms256m -Xmx512m"  # JVM heap of the local broker (`adloop stack up`)
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL, for every client
    kafka_sasl_mechanism: str | None = None  # e.g. PLAIN or SCRAM-SHA-512
    kafka_sasl_username: str | None = None  # SASL user of every Kafka client
    kafka_sasl_password: SecretStr | None = None  # SASL password (never logged)
    kafka_ssl_cafile: Path | None = None  # CA bundle that signed the brokers' certificates

    # Feature consumer
    consumer_batch_size: int = 2000  # max events per micro-batch
    consumer_batch_ms: int = 200  # max wait for a micro-batch to fill
    max_event_bytes: int = 16 * 1024  # larger payloads are dead-lettered as oversized
    max_future_skew_s: int = 300  # events further ahead of the wall clock are dead-lettered
    consumer_metrics_port: int = 9108  # Prometheus /metrics of `adloop consume`

    # Redis (Feast's online store and the consumer's offsets)
    redis_url: str = "redis://127.0.0.1:6379/0"  # Feast's online store and the consumer's state (rediss:// for TLS)
    redis_cluster_nodes: str | None = None  # host:port,... of a Redis Cluster (`adloop stack up --redis-cluster`)
    eval_redis_db: int = 14  # database `adloop evaluate --pipeline` owns (emptied before and after)

    # Paths
    stack_dir: Path = PROJECT_ROOT / ".stack"  # broker data, logs, pid files of `adloop stack`
    feast_repo_path: Path = PROJECT_ROOT / "features" / "repo"  # feature_store.yaml and the Feast definitions
    feast_data_dir: Path = PROJECT_ROOT / ".stack" / "feast"  # registry and offline store files
    model_registry_path: Path = PROJECT_ROOT / ".stack" / "models"  # model versions and the promoted pointer
    outcomes_path: Path = PROJECT_ROOT / ".stack" / "outcomes.duckdb"  # ad outcomes landed from Kafka (DuckDB)
    report_dir: Path = PROJECT_ROOT / ".stack" / "report"  # PNG charts of `adloop report`

    # API
    api_host: str = "127.0.0.1"  # bind address of `adloop serve`
    api_port: int = 8000  # port of `adloop serve`
    public_url: str = "http://127.0.0.1:8000"  # base of the OpenRTB billing notice URL (burl)
    url_signing_secret: SecretStr | None = None  # HMAC key of billing/click/conversion URLs (shared by replicas)
    admin_token: SecretStr | None = None  # bearer token of the admin routes (reload, erasure); unset = disabled
    users_token: SecretStr | None = None  # bearer token of GET /v1/users/{id}/features (unset: the admin token)
    max_body_bytes: int = 256 * 1024  # larger request bodies get 413 before they are read

    # Serving (ad selection)
    catalog_path: Path = PROJECT_ROOT / "serving" / "data" / "ads.csv"  # the ads (CSV, the default in the package)
    model_pointer_redis: bool = True  # mirror the promoted pointer in Redis (replicas without the registry folder)
    model_poll_s: float = 2.0  # how often each serving process reads the registry's promoted pointer (0: never)
    catalog_poll_s: float = 5.0  # reload the catalog when its file changes; 0 = only on admin reload
    serve_top_k: int = 200  # candidates per requested format that reach the ranker
    serve_epsilon: float = 0.05  # epsilon-greedy exploration per pick
    serve_epsilon_no_model: float | None = None  # exploration while no model is promoted (None: serve_epsilon)
    control_share: float = 0.1  # share of users (stable hash) served without targeting
    control_salt: str = "adloop-arm-v1"  # changing it re-draws the arms
    serve_batch_window_ms: float = Field(0.0, ge=0.0, le=1.0)  # under load, hold a batch this long for company
    serve_batch_max: int = Field(64, ge=1)  # requests scored together at most
    serve_index_min_ads: int = 200_000  # from this many ads retrieval goes through an approximate index (CPU)
    request_budget_ms: float = 20.0  # user-feature read budget (Redis socket timeout); over it -> fallback
    redis_retry_after_s: float = 1.0  # after a Redis connection failure, skip Redis this long
    pacing_slack: float = 0.05  # share of a daily budget spendable ahead of the smooth pace
    pacing_sync_s: float = 0.5  # how often each serving process shares its spend through Redis (0: never);
    # a campaign out of budget on one replica stops on the others within two of these
    attribution_window_s: float = 7 * 86_400  # a conversion is attributed to a touch at most this much older
    attribution_model: Literal["click", "impression"] = "click"  # the user's last click, or last impression
    currency: str = "USD"  # of bids, budgets and conversion values (other currencies are refused)
    ad_stats_refresh_s: float = 1.0  # how often serving re-reads the ads whose online rows changed (freshness)
    ad_stats_full_refresh_s: float = 30.0  # how often it re-reads every ad's row (a safety net)
    impression_buffer: int = 10_000  # impressions held while Kafka is down (drop-oldest beyond)
    impression_delivery_timeout_ms: int = 30_000  # an impression unacknowledged this long goes back to the buffer
    gil_switch_interval_ms: float = 0.5  # longest wait of a request behind a background thread (Python: 5)
    max_slots: int = 10  # per request
    max_count_per_slot: int = 10  # ads per slot
    max_candidate_ids: int = 1000  # length limit of candidate_ad_ids / exclude_ad_ids
    openrtb_tmax_margin_ms: float = 5.0  # network allowance subtracted from OpenRTB tmax

    # Retraining service (`adloop learn`)
    learn_every_impressions: int = 5000  # train when this many impressions were logged since the last training
    learn_every_minutes: float = 60.0  # or train after this many minutes with at least one new impression
    learn_check_s: float = 30.0  # how often it counts the impressions on the events topic
    learn_click_window_s: float = 1800.0  # a click within this many seconds of its impression labels it 1
    learn_metrics_port: int = 9109  # Prometheus /metrics of `adloop learn`

    stack_start_timeout: float = 60.0  # seconds `adloop stack up` waits for Kafka and Redis


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings(...)` or clear this cache."""
    return Settings()


def settings_table() -> str:
    """The settings as a Markdown table (variable, default, meaning), from `Settings` itself: names and
    defaults from its fields, meanings from the comment beside each field in this file."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(Settings).splitlines():
        match = re.match(r"\s+(\w+):[^#]*?(?:#\s*(.*))?$", line)
        if match and match.group(2):
            comments[match.group(1)] = match.group(2).strip()
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, Path):
            default = default.relative_to(PROJECT_ROOT) if default.is_relative_to(PROJECT_ROOT) else default
        shown = "(unset)" if default is None else f"`{default}`"
        meaning = comments.get(name, "").replace("|", "\\|")
        rows.append(f"| `ADLOOP_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"
