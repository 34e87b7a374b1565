"""Distributed training: Ray Train workers running a DeepSpeed engine around the model."""
