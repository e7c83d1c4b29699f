"""Helpers for tests, fixture scripts and benchmarks that compare against timm (PyTorch)."""
