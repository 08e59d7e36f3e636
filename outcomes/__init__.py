"""Observe: outcomes landed from Kafka, their store, lift and off-policy estimators, the report and its charts."""
