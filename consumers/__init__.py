"""Consumers: the agent crew that turns unlabeled items into QC-passed samples, and sample exports."""
