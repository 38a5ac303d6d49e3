"""Metric definitions, health and readiness, alert rules and dashboards."""
