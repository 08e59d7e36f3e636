"""Kafka side: the event contract, producers, the feature consumer and dead letters."""
