"""A message produced to the real broker comes back from a consumer, key and value intact."""

from __future__ import annotations

import pytest
from kafka import KafkaProducer

from adloop.settings import Settings
from tests.support.stack import read_back

pytestmark = pytest.mark.integration


def test_produce_and_consume(local_stack: Settings, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=local_stack.kafka_bootstrap_servers, acks="all")
    sent = {f"user-{i}".encode(): f'{{"n": {i}}}'.encode() for i in range(20)}
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=10)
    producer.close()

    received = {m.key: m.value for m in read_back(local_stack, topic, len(sent))}
    assert received == sent
