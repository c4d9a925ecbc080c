"""The client verbs' pure parts: where the server is (OLLAMA_HOST /
MLXGATE_HOST / MLXGATE_PORT, read as ``mlxgate serve`` reads them) and
Ollama's formats for sizes, times and tables (format/bytes.go,
format/time.go, cmd.go)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mlxgate_cli.client.display import human_bytes, human_time, models_table, running_table
from mlxgate_cli.client.host import HostError, parse_host, settings_from_env


@pytest.mark.parametrize("value,expected", [
    ("", ("http", "127.0.0.1", 11434, "")),
    ("localhost", ("http", "localhost", 11434, "")),
    ("example.com:8080", ("http", "example.com", 8080, "")),
    (":9000", ("http", "127.0.0.1", 9000, "")),
    ("http://10.0.0.2:1234", ("http", "10.0.0.2", 1234, "")),
    ("http://10.0.0.2", ("http", "10.0.0.2", 11434, "")),  # the server's port, as serve reads it
    ("https://gw.example.com", ("https", "gw.example.com", 443, "")),
    ("https://gw.example.com:8443/ollama/", ("https", "gw.example.com", 8443, "/ollama")),
    ("0.0.0.0", ("http", "127.0.0.1", 11434, "")),  # a bind-all address: this machine
    ("[::]:5000", ("http", "::1", 5000, "")),
    ("[::1]", ("http", "::1", 11434, "")),
])
def test_host_forms(value: str, expected: tuple) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize("value", ["ftp://host", "host:port", "host:70000"])
def test_bad_hosts_are_errors(value: str) -> None:
    with pytest.raises(ValueError):
        parse_host(value)


def test_mlxgate_variables_win_and_the_key_is_read() -> None:
    s = settings_from_env({"OLLAMA_HOST": "a:1", "MLXGATE_HOST": "b", "MLXGATE_API_KEY": " k "})
    assert (s.url, s.api_key) == ("http://b:1", "k")  # MLXGATE_HOST's host, OLLAMA_HOST's port, as serve binds
    assert settings_from_env({"OLLAMA_HOST": ":9000", "MLXGATE_PORT": "8000"}).url == "http://127.0.0.1:8000"
    assert settings_from_env({"MLXGATE_HOST": "c:5", "MLXGATE_PORT": "7"}).url == "http://c:5"
    assert settings_from_env({"MLXGATE_HOST": "[::1]:5"}).url == "http://[::1]:5"
    default = settings_from_env({})
    assert (default.url, default.api_key) == ("http://127.0.0.1:11434", None)
    with pytest.raises(HostError, match="MLXGATE_HOST"):
        settings_from_env({"MLXGATE_HOST": "gopher://x"})
    with pytest.raises(HostError, match="MLXGATE_PORT"):
        settings_from_env({"MLXGATE_PORT": "http"})


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (999, "999 B"), (1000, "1 KB"), (693587, "693 KB"), (1_500_000, "1.5 MB"),
    (4_700_000_000, "4.7 GB"), (12_000_000_000, "12 GB"), (2_000_000_000_000, "2 TB"),
])
def test_sizes_as_ollama_prints_them(n: int, text: str) -> None:
    assert human_bytes(n) == text


NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("delta,text", [
    (timedelta(seconds=0.5), "Less than a second ago"),
    (timedelta(seconds=30), "30 seconds ago"),
    (timedelta(seconds=90), "About a minute ago"),
    (timedelta(minutes=4), "4 minutes ago"),
    (timedelta(hours=1), "About an hour ago"),
    (timedelta(hours=5), "5 hours ago"),
    (timedelta(days=3), "3 days ago"),
    (timedelta(days=20), "2 weeks ago"),
    (timedelta(days=100), "3 months ago"),
    (timedelta(days=800), "2 years ago"),
    (-timedelta(minutes=4, seconds=30), "4 minutes from now"),
])
def test_times_as_ollama_prints_them(delta: timedelta, text: str) -> None:
    t = (NOW - delta).isoformat().replace("+00:00", "Z")
    assert human_time(t, "Never", NOW) == text


def test_go_times_with_nanoseconds_and_zero_times() -> None:
    assert human_time("2026-12-06T10:00:00.123456789Z", "Never", NOW) == "2 hours ago"
    assert human_time("2026-12-06T06:00:00.5-05:00", "Never", NOW) == "59 minutes ago"  # 11:00:00.5 UTC
    assert human_time("0001-01-01T00:00:00Z", "Never", NOW) == "Never"
    assert human_time(None, "Never", NOW) == "Never"


def test_tables_as_ollama_prints_them() -> None:
    models = [
        {"name": "tiny-llama:latest", "digest": "8f6b0f2c7a6a591ee4a6", "size": 693587,
         "modified_at": (NOW - timedelta(minutes=4)).isoformat()},
        {"name": "other:1b", "digest": "", "size": 1_300_000_000, "modified_at": ""},
    ]
    table = models_table(models)
    assert table.splitlines()[0] == "NAME                 ID              SIZE      MODIFIED"
    assert table.splitlines()[1].startswith("tiny-llama:latest    8f6b0f2c7a6a    693 KB    ")
    assert table.splitlines()[2] == "other:1b                             1.3 GB    Never"
    assert models_table(models, "TINY").count("\n") == 2  # header and the one match, case-insensitively
    running = [{"name": "a:latest", "digest": "0123456789abcdef", "size": 1000, "size_vram": 250,
                "context_length": 4096, "expires_at": (NOW + timedelta(minutes=5)).isoformat()},
               {"name": "b:latest", "size": 10, "size_vram": 0, "expires_at": (NOW - timedelta(seconds=1)).isoformat()}]
    lines = running_table(running, now=NOW).splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert "75%/25% CPU/GPU" in lines[1] and "4096" in lines[1] and lines[1].endswith("5 minutes from now")
    assert "100% CPU" in lines[2] and lines[2].endswith("Stopping...")
