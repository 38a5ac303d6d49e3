"""The shared road from adapters to storage: records, envelopes, the group-commit pipeline, code tables and the MQTT vitals adapter."""
