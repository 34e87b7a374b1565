"""Evaluation: metrics with ground truth, the subject-world benchmark and baselines (issue #6)."""
