"""Neighbor Diffusion: subject-driven text-to-image generation by in-context learning."""

__version__ = "0.1.0"
