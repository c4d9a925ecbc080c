"""Adapter to an upstream Ollama server (HTTP client only)."""

from backends.ollama.backend import OllamaBackend

__all__ = ["OllamaBackend"]
