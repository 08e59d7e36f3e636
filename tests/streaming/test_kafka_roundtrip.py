"""A message produced to the real broker comes back from a consumer, key and value intact."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer

from adloop.settings import Settings

pytestmark = pytest.mark.integration


def test_produce_and_consume(local_stack: Settings, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=local_stack.kafka_bootstrap_servers, acks="all")
    sent = {f"user-{i}".encode(): f'{{"n": {i}}}'.encode() for i in range(20)}
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=10)
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=local_stack.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
    )
    received = {}
    for message in consumer:
        received[message.key] = message.value
        if len(received) == len(sent):
            break
    consumer.close()
    assert received == sent
