"""Prometheus metrics, dashboards and alert rules of dpe-stream."""
