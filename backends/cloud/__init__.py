"""Adapters to cloud APIs (HTTP clients only): OpenAI-compatible ones
(``CloudBackend``) and Anthropic's Messages API (``AnthropicBackend``)."""

from typing import Mapping

from backends.cloud.anthropic import AnthropicBackend
from backends.cloud.backend import CloudBackend
from mlxgate.config import CloudProvider

__all__ = ["AnthropicBackend", "CloudBackend", "cloud_backend"]


def cloud_backend(provider: CloudProvider, env: Mapping[str, str]) -> CloudBackend:
    """The adapter for the API the provider speaks (``provider.kind``)."""
    if provider.kind == "anthropic":
        return AnthropicBackend(provider, env)
    return CloudBackend(provider, env)
