"""Kafka clients built from the settings: the one place that knows the brokers and the credentials.

Every producer, consumer and admin client of the project comes from here, so a deployment's
SASL/TLS settings reach all of them. Callers pass only what their role needs on top (acks,
batching, group ids).
"""

from __future__ import annotations

from typing import Any

from adloop.settings import Settings

# kafka-python 3.x waits 30 s to bootstrap by default, even with a small max_block_ms: fail fast instead.
BOOTSTRAP_TIMEOUT_MS = 5000


def connection(settings: Settings) -> dict[str, Any]:
    """Where the brokers are and how to authenticate to them (kafka-python's option names)."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        config["sasl_plain_password"] = password.get_secret_value() if password else None
    if settings.kafka_ssl_cafile:
        config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    return config


def producer(settings: Settings, **options: Any) -> Any:
    """A `KafkaProducer` (acks=all unless `options` say otherwise)."""
    from kafka import KafkaProducer

    return KafkaProducer(
        **{"acks": "all", "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS, **options}, **connection(settings)
    )


def consumer(settings: Settings, *topics: str, **options: Any) -> Any:
    """A `KafkaConsumer` of `topics` (none: assign partitions yourself); offsets are committed by the caller."""
    from kafka import KafkaConsumer

    defaults = {"enable_auto_commit": False, "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}
    return KafkaConsumer(*topics, **{**defaults, **options}, **connection(settings))


def admin(settings: Settings, **options: Any) -> Any:
    """A `KafkaAdminClient` (topics)."""
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(**{"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS, **options}, **connection(settings))
