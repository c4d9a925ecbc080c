"""Another mlxgate inference service as a backend (``remote:<name>``)."""

from backends.remote.backend import HealthState, RemoteBackend

__all__ = ["HealthState", "RemoteBackend"]
