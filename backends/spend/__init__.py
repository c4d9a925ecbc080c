"""What cloud fallback costs: prices, the usage ledger, budgets and per-key limits.

``Spend`` (``backends/spend/spend.py``) is the one object the service, the
router and the metrics talk to; the parts each have a module of their own:
``prices`` (USD per million tokens per cloud model), ``ledger`` (an SQLite
row per request, written off the request path), ``budgets`` (cloud spend per
day and month, globally and per key) and ``limits`` (requests and tokens
per minute per key).
"""

from backends.spend.spend import Spend, SpendLimit

__all__ = ["Spend", "SpendLimit"]
