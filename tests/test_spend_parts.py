"""The parts of backends/spend on their own: periods in a time zone, the
ledger on a real SQLite file (batches, retention, reports), the sliding
minute of the rate limiter, prices, and the [[keys]] / [budget] configuration."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from backends.spend.budgets import Budgets, Periods
from backends.spend.ledger import Ledger, UsageRow
from backends.spend.limits import RateLimited, RateLimiter
from backends.spend.prices import PriceBook
from mlxgate.config import BudgetConfig, CloudProvider
from mlxgate.config_load import load_config
from mlxgate.keyring import KeyRing, NamedKey


def test_days_and_months_begin_in_the_configured_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    now = datetime(2025, 3, 30, 23, 30, tzinfo=berlin).timestamp()  # the day clocks went forward
    start, end = Periods("Europe/Berlin").day(now)
    assert datetime.fromtimestamp(start, berlin) == datetime(2025, 3, 30, tzinfo=berlin)
    assert datetime.fromtimestamp(end, berlin) == datetime(2025, 3, 31, tzinfo=berlin)
    assert end - start == 23 * 3600
    m0, m1 = Periods("UTC").month(datetime(2024, 12, 31, 23, 0, tzinfo=ZoneInfo("UTC")).timestamp())
    assert datetime.fromtimestamp(m1, ZoneInfo("UTC")) == datetime(2025, 1, 1, tzinfo=ZoneInfo("UTC"))


def test_a_budget_resets_with_its_period() -> None:
    t = [datetime(2025, 6, 1, 23, 0, tzinfo=ZoneInfo("UTC")).timestamp()]
    b = Budgets(BudgetConfig(cloud_usd_per_day=5, cloud_usd_per_month=100), clock=lambda: t[0])
    b.add("k", 6)
    reached = b.reached("k")
    assert reached is not None and reached.scope == "day" and "daily cloud budget of $5.00" in reached.message()
    t[0] += 3600  # the next day
    assert b.reached("k") is None and b.month_spent == 6
    b.add("k", 2)
    assert b.reached("k", key_limit=2) is not None and b.reached("other", key_limit=2) is None


def row(ts: float, key: str = "k", backend: str = "cloud:x", cost: float = 1.0) -> UsageRow:
    return UsageRow(ts, key, "openai", backend, "m", 10, 5, 2, cost, "stop")


def test_ledger_writes_in_batches_reports_and_keeps_only_the_retention(tmp_path: Path) -> None:
    now = 1_750_000_000.0
    ledger = Ledger(tmp_path / "usage.sqlite3", retention_days=1, clock=lambda: now)
    assert ledger.open()
    for i in range(500):
        ledger.record(row(now - i, key=f"k{i % 2}", backend="mlx" if i % 5 == 0 else "cloud:x"))
    ledger.record(row(now - 2 * 86400))  # older than the retention: gone at the next open
    ledger.close()
    assert ledger.written == 501 and ledger.flushed()
    by = ledger.report(None, None, ["key"])
    assert {g["key"]: g["requests"] for g in by} == {"k0": 250, "k1": 250, "k": 1}
    assert ledger.spent_since(now - 86400) == {"k0": 200.0, "k1": 200.0}  # cloud rows only
    again = Ledger(tmp_path / "usage.sqlite3", retention_days=1, clock=lambda: now)
    assert again.open()
    assert sum(g["requests"] for g in again.report(None, None, [])) == 500
    assert again.report(now - 10, now, ["backend"])[0]["backend"] in ("cloud:x", "mlx")
    again.close()


def test_rate_limiter_counts_a_sliding_minute() -> None:
    t = [1000.0]
    limiter = RateLimiter(clock=lambda: t[0])
    key = NamedKey("k", requests_per_minute=2, tokens_per_minute=100)
    assert limiter.admit(key)["x-ratelimit-remaining-requests"] == "1"
    limiter.admit(key)
    with pytest.raises(RateLimited) as e:
        limiter.admit(key)
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0" and 1 <= e.value.retry_after <= 60
    t[0] += 61
    limiter.admit(key)
    limiter.used(key, 150)
    with pytest.raises(RateLimited, match="100 tokens per minute"):
        limiter.admit(key)
    assert limiter.admit(NamedKey("free")) == {}


def test_prices_per_model_star_and_cached_input() -> None:
    book = PriceBook([CloudProvider(name="p", base_url="http://x/v1", prices={"big": [3.0, 15.0, 0.3],
                                                                              "*": [1.0, 2.0]})])
    assert book.cost("cloud:p", "big", 1_000_000, 1_000_000, 500_000) == pytest.approx(1.5 + 0.15 + 15)
    assert book.cost("cloud:p", "other", 1_000_000, 0, 1_000_000) == pytest.approx(1.0)  # cached at input price
    assert book.cost("mlx", "big", 10**9, 10**9, 0) == 0 and not book.paid("remote:x")
    with pytest.raises(ValueError, match="prices"):
        CloudProvider(name="p", base_url="http://x/v1", prices={"*": [1.0]})


def test_keys_config_names_plain_and_admin_keys_and_checks_entries(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[[keys]]\nname = "ci"\nkey_env = "CI_KEY"\ntokens_per_minute = 1000\nmodels = ["llama3.2"]\n'
                    '[budget]\ntimezone = "America/New_York"\n')
    cfg = load_config(toml, env={"CI_KEY": "sk-ci", "MLXGATE_API_KEYS": "a,b", "MLXGATE_ADMIN_KEYS": "adm",
                                 "MLXGATE_CLOUD_BUDGET_DAY_USD": "2.5"})
    assert cfg.budget.cloud_usd_per_day == 2.5 and "sk-ci" not in repr(cfg)
    ring = KeyRing.from_server(cfg.server)
    assert ring.names() == ["ci", "key-1", "key-2", "admin-1"]
    ci = ring.lookup("sk-ci")
    assert ci is not None and ci.tokens_per_minute == 1000 and ci.allows("llama3.2:latest") and not ci.allows("x")
    assert ring.lookup("adm").admin and ring.lookup("b").name == "key-2" and ring.lookup("nope") is None
    for bad, why in (('[[keys]]\nname = "key-3"\nkey = "x"\n', "reserved"),
                     ('[[keys]]\nname = "a b"\nkey = "x"\n', "name"),
                     ('[[keys]]\nname = "a"\nkey_env = "UNSET"\n', "not set"),
                     ('[[keys]]\nname = "a"\nkey = "x"\nrequests_per_minute = -1\n', "requests_per_minute"),
                     ('[budget]\ntimezone = "Mars/Olympus"\n', "time zone")):
        toml.write_text(bad)
        with pytest.raises(ValueError, match=why):
            load_config(toml, env={})
