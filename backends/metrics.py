"""Prometheus metrics of the inference service: generation latency, tokens,
fallbacks, memory, and model pulls.

Everything is registered on the ``CollectorRegistry`` passed in (a fresh one
per test), never on the global default.  Labels are bounded: the model label is
the model that actually answered (a name some backend listed) or "none" when
the request failed before any backend answered; never a request id or text.

Series a dashboard panel reads start at 0 rather than appearing with the first
event (Grafana shows "No data" until then): fallbacks and answers for the
configured backends (``init_backends``, at start-up), and per model, as it
loads in the MLX engine or first answers at any backend, its cancellations and
its requests by finish reason.  Still bounded: configured backends, models that
exist.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from backends.mlx.memory_snapshot import MemorySnapshot
from backends.types import FINISH_REASONS, Done, GenerateRequest
from mlxgate.memory import resident_memory_bytes
from mlxgate.prom import Children

PREFIX = "mlxgate"

# LLM work spans milliseconds (a token) to minutes (a long answer on a cold model).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


class MemoryCollector(Collector):
    """Reads memory at scrape time, so the numbers are never stale."""

    def __init__(
        self,
        process: str,
        snapshot: Optional[Callable[[], Optional[MemorySnapshot]]],
        others: Optional[Callable[[], Mapping[str, int]]] = None,
    ) -> None:
        """``others``: the resident memory of other processes of this server
        by their ``process`` label (``serve --workers``: the HTTP workers, as
        they last reported it)."""
        self.process = process
        self.snapshot = snapshot
        self.others = others

    def collect(self) -> Iterable[GaugeMetricFamily]:
        rss = GaugeMetricFamily(
            f"{PREFIX}_process_resident_memory_bytes", "Resident memory of the process.", labels=["process"]
        )
        rss.add_metric([self.process], resident_memory_bytes())
        for process, nbytes in (self.others() if self.others else {}).items():
            rss.add_metric([process], nbytes)
        yield rss
        snap = self.snapshot() if self.snapshot else None
        if snap is None:
            return
        for name, value, doc in (
            ("mlx_active_memory_bytes", snap.active_bytes, "MLX memory in live arrays."),
            ("mlx_peak_memory_bytes", snap.peak_bytes, "Peak MLX memory since start."),
            ("mlx_cache_memory_bytes", snap.cache_bytes, "MLX allocator cache, freeable."),
            ("kv_cache_memory_bytes", snap.kv_cache_bytes,
             "Bytes held by KV caches of in-flight sequences (quantized: packed values, scales and biases)."),
            ("prompt_cache_memory_bytes", snap.prompt_cache_bytes, "Bytes held by reusable prompt caches."),
            ("engine_active_sequences", snap.active_sequences, "Sequences queued, prefilling or decoding."),
            ("models_loaded", len(snap.model_bytes), "Models resident in the MLX engine."),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        per_model = GaugeMetricFamily(
            f"{PREFIX}_model_memory_bytes", "Resident weight bytes per loaded model.", labels=["model"]
        )
        for model, nbytes in snap.model_bytes.items():
            per_model.add_metric([model], nbytes)
        yield per_model
        expiry = GaugeMetricFamily(
            f"{PREFIX}_model_expiry_timestamp_seconds",
            "Unix time a loaded model unloads; +Inf when kept loaded.",
            labels=["model"],
        )
        for model, at in snap.model_expiry.items():
            expiry.add_metric([model], float("inf") if at is None else at)
        yield expiry


class BackendCollector(Collector):
    """Per backend, read at scrape time from the router's callbacks: the
    requests it has in flight there (placement's load, ``in_flight``), and,
    for backends that watch their health (remote services), whether they
    take new requests (``serving``)."""

    def __init__(self, in_flight: Callable[[], Mapping[str, int]], serving: Callable[[], Mapping[str, bool]]) -> None:
        self.in_flight = in_flight
        self.serving = serving

    def collect(self) -> Iterable[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_backend_in_flight",
            "Requests this router has running at each backend (what placement balances).",
            labels=["backend"],
        )
        for name, n in self.in_flight().items():
            in_flight.add_metric([name], n)
        yield in_flight
        serving = GaugeMetricFamily(
            f"{PREFIX}_backend_serving",
            "1 while a remote service takes new requests (health SERVING), 0 while it drains or cannot be reached.",
            labels=["backend"],
        )
        for name, ok in self.serving().items():
            serving.add_metric([name], 1 if ok else 0)
        yield serving


class ServiceMetrics:
    """Counters and histograms the inference service and router update."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["model", "backend"]
        self.requests = Counter(
            f"{PREFIX}_generate_requests",
            "Generate calls finished, by model, backend that answered and finish reason.",
            labels + ["finish_reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_generate_in_flight", "Generate calls in progress.", registry=registry
        )
        self.duration = Histogram(
            f"{PREFIX}_generate_duration_seconds",
            "Generate call duration, first byte in to last byte out.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request to the first chunk of the answer.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive tokens of one answer.",
            labels,
            buckets=TOKEN_GAP_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a request waited in the MLX engine's queue before its prefill started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", labels, registry=registry
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated.", labels, registry=registry
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_prompt_tokens", "Prompt tokens served from a prompt cache.", labels, registry=registry
        )
        self.cancellations = Counter(
            f"{PREFIX}_cancellations", "Generate calls the client cancelled.", labels, registry=registry
        )
        self.errors = Counter(
            f"{PREFIX}_generate_errors", "Generate calls that ended in an error, by gRPC code.", ["code"],
            registry=registry,
        )
        self.fallbacks = Counter(
            f"{PREFIX}_fallbacks",
            "Requests moved from one backend to the next before the first token.",
            ["from_backend", "to_backend", "reason"],
            registry=registry,
        )
        self.answers = Counter(
            f"{PREFIX}_backend_answers",
            "Requests answered, by backend.",
            ["backend"],
            registry=registry,
        )

        self.truncations = Counter(
            f"{PREFIX}_truncated_prompts",
            "Prompts cut to fit the context (Ollama's truncation), by model.",
            ["model"],
            registry=registry,
        )
        self.truncated_messages = Counter(
            f"{PREFIX}_truncated_messages",
            "Chat messages dropped to fit the context, by model.",
            ["model"],
            registry=registry,
        )
        self.images = Histogram(
            f"{PREFIX}_request_images",
            "Images per MLX request that carried images, by model.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=registry,
        )
        self.image_seconds = Histogram(
            f"{PREFIX}_image_preprocess_seconds",
            "Time to decode and preprocess one request's images (the processor, before the vision tower), by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # The labelled children, looked up once per label values (mlxgate.prom).
        self.c_requests = Children(self.requests)
        self.c_duration = Children(self.duration)
        self.c_ttft = Children(self.ttft)
        self.c_inter_token = Children(self.inter_token)
        self.c_prompt_tokens = Children(self.prompt_tokens)
        self.c_completion_tokens = Children(self.completion_tokens)
        self.c_cached_tokens = Children(self.cached_tokens)
        self.c_cancellations = Children(self.cancellations)
        self.c_errors = Children(self.errors)
        self.c_fallbacks = Children(self.fallbacks)
        self.c_answers = Children(self.answers)
        self.c_queue_wait = Children(self.queue_wait)
        #: (backend, model) pairs whose series were zeroed (``init_model``).
        self._models: set[tuple[str, str]] = set()

    # -- series at 0 before the first event
    def init_backends(
        self, backends: Sequence[str], orders: Iterable[Sequence[str]] = (), *, reasons: Sequence[str]
    ) -> None:
        """Zero every fallback the router can report between ``backends``
        (priority order) and along each of ``orders`` (the backends of an
        alias's targets, in its order), for each of ``reasons`` (the
        router's); and each backend's answers."""
        pairs: dict[tuple[str, str], None] = {}
        for order in (list(backends), *map(list, orders)):
            for i, src in enumerate(order):
                for dst in order[i + 1:]:
                    if src != dst:
                        pairs[(src, dst)] = None
        for src, dst in pairs:
            for reason in reasons:
                self.fallbacks.labels(src, dst, reason)
        for backend in backends:
            self.answers.labels(backend)

    def init_model(self, backend: str, model: str) -> None:
        """Zero a model's cancellations and requests (by finish reason), once."""
        if (backend, model) in self._models:
            return
        self._models.add((backend, model))
        self.c_cancellations(model, backend)
        for reason in FINISH_REASONS:
            self.c_requests(model, backend, reason)

    # -- router observer (``backends.routing.RouterObserver``)
    def fallback(self, from_backend: str, to_backend: str, reason: str) -> None:
        self.c_fallbacks(from_backend, to_backend, reason).inc()

    def answered(self, backend: str, model: str) -> None:
        self.c_answers(backend).inc()
        self.init_model(backend, model)

    # -- engine hooks
    def model_loaded(self, backend: str, model: str) -> None:
        self.init_model(backend, model)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self.c_queue_wait(model).observe(seconds)

    def observe_images(self, model: str, images: int, seconds: float) -> None:
        self.images.labels(model).observe(images)
        self.image_seconds.labels(model).observe(seconds)

    def observe_truncation(self, model: str, messages: int, tokens: int) -> None:
        self.truncations.labels(model).inc()
        if messages:
            self.truncated_messages.labels(model).inc(messages)

    # -- service observer
    def start(self, req: GenerateRequest) -> "GenerateTracker":
        self.in_flight.inc()
        return GenerateTracker(self)


#: How a pull ended (``backends.models.pull.PullObserver``).
PULL_OUTCOMES = ("success", "error", "cancelled")
# A pull takes seconds (already present) to hours (tens of GB).
PULL_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400)


class PullMetrics:
    """Model pulls (``backends.models.pull.Puller``'s observer): by outcome,
    their duration, and the bytes received from the hub."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pulls = Counter(f"{PREFIX}_model_pulls", "Model pulls finished, by outcome.", ["outcome"],
                             registry=registry)
        self.duration = Histogram(f"{PREFIX}_model_pull_duration_seconds", "Model pull duration, by outcome.",
                                  ["outcome"], buckets=PULL_BUCKETS, registry=registry)
        self.received = Counter(f"{PREFIX}_model_pull_received_bytes",
                                "Bytes of model files downloaded from the hub.", registry=registry)
        for outcome in PULL_OUTCOMES:
            self.pulls.labels(outcome)

    def pull_finished(self, outcome: str, seconds: float) -> None:
        self.pulls.labels(outcome).inc()
        self.duration.labels(outcome).observe(seconds)

    def pull_received(self, n_bytes: int) -> None:
        self.received.inc(n_bytes)


class GenerateTracker:
    """Follows one Generate call: first token, gaps between tokens, the end."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.m = metrics
        self.started = time.monotonic()
        self.last: Optional[float] = None
        self.first: Optional[float] = None
        self.gaps: list[float] = []
        #: Who is answering, from the first chunk: labels a stream that ends
        #: without a Done (cancelled, failed mid-way).
        self.backend = "none"
        self.model = "none"
        self.tokens = 0

    def answering(self, backend: str, model: str) -> None:
        self.backend, self.model = backend, model or "none"

    def chunk(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif self.last is not None and n_tokens > 0:
            # A chunk may carry several tokens; spread the gap over them.
            self.gaps.extend([(now - self.last) / n_tokens] * n_tokens)
        self.last = now

    def finish(self, done: Optional[Done], error_code: Optional[str], cancelled: bool) -> None:
        m = self.m
        m.in_flight.dec()
        model = (done.model if done else "") or self.model
        backend = (done.backend if done else "") or self.backend
        if done is not None:
            reason = done.finish_reason
        else:
            reason = "cancelled" if cancelled else "error"
        m.c_requests(model, backend, reason).inc()
        m.c_duration(model, backend).observe(time.monotonic() - self.started)
        if self.first is not None:
            m.c_ttft(model, backend).observe(self.first - self.started)
        if self.gaps:
            hist = m.c_inter_token(model, backend)
            for g in self.gaps:
                hist.observe(g)
        if done is not None:
            m.c_prompt_tokens(model, backend).inc(done.prompt_tokens)
            m.c_completion_tokens(model, backend).inc(done.completion_tokens)
            m.c_cached_tokens(model, backend).inc(done.cached_prompt_tokens)
        else:
            # Generated before the stream was cut: work done all the same.
            m.c_completion_tokens(model, backend).inc(self.tokens)
        if cancelled:
            m.c_cancellations(model, backend).inc()
        if error_code:
            m.c_errors(error_code).inc()


class DistributedCollector(Collector):
    """The ranks of a distributed MLX engine, read at scrape time (rank 0's
    figures and the others' latest heartbeats: ``backends/mlx/distributed/``)."""

    def __init__(self, status: Callable[[], list]) -> None:
        self.status = status

    def collect(self) -> Iterable[GaugeMetricFamily]:
        ranks = self.status()
        for key, name, doc in (
            ("up", "distributed_rank_up", "1 while the rank answers its heartbeats."),
            ("sequences", "distributed_rank_sequences", "Sequences in the rank's batch."),
            ("max_batch", "distributed_rank_max_batch", "Most sequences the rank decoded in one step."),
            ("steps", "distributed_rank_decode_steps", "Decode steps the rank ran."),
            ("parameter_bytes", "distributed_rank_parameter_bytes", "Bytes of the rank's shard of the weights."),
        ):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["rank"])
            for r in ranks:
                g.add_metric([str(r["rank"])], float(r.get(key) or 0))
            yield g

