"""The shared road from adapters to storage.

Records, envelopes, the group-commit pipeline, code tables and the MQTT vitals adapter.
"""
