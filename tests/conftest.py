"""Shared fixtures.  Each fixture family lives in its own module, listed here."""

pytest_plugins: list[str] = ["tests.mlx_fixtures", "tests.ports", "tests.stack"]
