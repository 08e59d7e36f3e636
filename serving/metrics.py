"""Prometheus metrics of the serving process (module constants, registered once in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)

REQUEST_SECONDS = Histogram("adloop_request_seconds", "Handler time per route.", ["route"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram(
    "adloop_stage_seconds", "Time per selection stage.", ["stage"], buckets=LATENCY_BUCKETS
)  # features, eligibility, rank, choose, total_select
FALLBACKS = Counter("adloop_fallback_total", "Requests answered with a fallback, by reason.", ["reason"])
ERRORS = Counter("adloop_errors_total", "Errors caught while answering, by route and kind.", ["route", "kind"])
ARMS = Counter("adloop_arm_total", "Selection requests by arm.", ["arm"])
NO_FILL = Counter("adloop_no_fill_total", "Slots (or OpenRTB imps) left without an ad.", ["route"])
IMPRESSIONS = Counter(
    "adloop_impressions_total", "Impression events by outcome.", ["outcome"]
)  # enqueued, sent, dropped_buffer_full, failed
IMPRESSIONS_BUFFERED = Gauge("adloop_impressions_buffered", "Impressions waiting for Kafka in the bounded buffer.")
KAFKA_CONNECTED = Gauge("adloop_kafka_connected", "1 while the impression producer is connected.")
MODEL_INFO = Info("adloop_model", "The model version serving (or the fallback).")
CATALOG_ADS = Gauge("adloop_catalog_ads", "Ads in the loaded catalog.")
RELOADS = Counter("adloop_reloads_total", "Catalog / model reloads, by outcome.", ["outcome"])
