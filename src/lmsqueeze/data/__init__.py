"""Offline data: corpora, calibration batches, long-context task generators."""
