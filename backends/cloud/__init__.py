"""Adapter to OpenAI-compatible cloud APIs (HTTP client only)."""

from backends.cloud.backend import CloudBackend

__all__ = ["CloudBackend"]
