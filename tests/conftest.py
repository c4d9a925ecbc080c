"""Shared fixtures.  Each fixture family lives in its own module, listed here."""

import mlxgate_cli  # noqa: F401 - first: turns gRPC's fork handlers off before grpc loads (see its docstring)

pytest_plugins: list[str] = ["tests.mlx_fixtures", "tests.ports", "tests.stack"]
