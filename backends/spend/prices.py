"""What a request cost: USD per million tokens, by cloud provider and model.

``[[cloud.providers]] prices = { "MODEL" = [input, output], "*" = [...] }``,
with an optional third number for cached input (default: the input price).
Local backends (MLX, remote mlxgate services, an upstream Ollama) and cloud
models without a price cost 0; a provider with no prices at all is named in
one warning at start-up, since its spend cannot count against a budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from mlxgate.config import CloudProvider
from mlxgate.names import untagged

log = logging.getLogger(__name__)

PER = 1_000_000


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cached: float

    @classmethod
    def of(cls, numbers: list[float]) -> "Price":
        cached = numbers[2] if len(numbers) > 2 else numbers[0]
        return cls(float(numbers[0]), float(numbers[1]), float(cached))

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> float:
        cached = max(0, min(cached_tokens, prompt_tokens))
        fresh = max(0, prompt_tokens - cached)
        return (fresh * self.input + cached * self.cached + max(0, completion_tokens) * self.output) / PER


class PriceBook:
    """Prices by backend name (``cloud:<provider>``) and model at that backend."""

    def __init__(self, providers: Iterable[CloudProvider] = ()) -> None:
        self._tables: dict[str, dict[str, Price]] = {}
        for p in providers:
            self._tables[f"cloud:{p.name}"] = {m: Price.of(v) for m, v in p.prices.items()}
            if not p.prices:
                log.warning("cloud provider %r has no prices: its spend counts as 0 against budgets "
                            "(set prices = { \"*\" = [input, output] } in its [[cloud.providers]] entry)", p.name)

    def paid(self, backend: str) -> bool:
        """A cloud backend: what budgets limit (priced or not)."""
        return backend.startswith("cloud:")

    def price(self, backend: str, model: str) -> Optional[Price]:
        table = self._tables.get(backend)
        if not table:
            return None
        return table.get(model) or table.get(untagged(model)) or table.get("*")

    def cost(self, backend: str, model: str, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int) -> float:
        price = self.price(backend, model)
        return price.cost(prompt_tokens, completion_tokens, cached_tokens) if price is not None else 0.0
