"""Producers: services that put new events on the bus (ingest of unlabeled images, diagnosis)."""
