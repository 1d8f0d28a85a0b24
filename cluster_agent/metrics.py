"""The agent's Prometheus metrics, in a registry of its own (no process-global state), and its liveness view.

Collaborators record into one `Metrics` object passed to them; GPU gauges are read from the telemetry at scrape
time by a custom collector.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 12 * 3600)
FAST_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        self.jobs = Counter("radix_agent_jobs", "Jobs finished, by final status, failure reason and failure class "
                            "(job or infrastructure; empty for successes and cancels).",
                            ["status", "failure_reason", "failure_class"], registry=r)
        self.job_duration = Histogram("radix_agent_job_duration_seconds", "Container run time of finished jobs.",
                                      buckets=DURATION_BUCKETS, registry=r)
        self.poll_latency = Histogram("radix_agent_poll_seconds", "Time a poll took, long-poll hold included.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.completion_latency = Histogram("radix_agent_completion_seconds",
                                            "Time the complete request took, retries included, until the "
                                            "result was accepted.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.result_after_exit = Histogram("radix_agent_result_after_exit_seconds",
                                           "Time from a job's container exit (the engine's clock) to its first "
                                           "complete request sent: the agent's dead time after a job.",
                                           buckets=FAST_BUCKETS, registry=r)
        self.container_start = Histogram("radix_agent_container_start_seconds",
                                         "The engine's create+start of a job's container.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.dispatch_overhead = Histogram("radix_agent_dispatch_overhead_seconds",
                                           "The agent's own time from a poll answer to a running container "
                                           "(image check, job directory, GPU choice; the engine's create+start "
                                           "excluded).", buckets=FAST_BUCKETS, registry=r)
        self.control_plane_errors = Counter("radix_agent_control_plane_errors",
                                            "Failed control-plane requests, by kind.", ["endpoint", "kind"], registry=r)
        self.running_jobs = Gauge("radix_agent_running_jobs", "Jobs whose container runs (or is about to).", registry=r)
        self.free_slots = Gauge("radix_agent_free_slots", "Job slots free for new work.", registry=r)
        self.quarantined = Gauge("radix_agent_quarantined", "1 while the node is quarantined (takes no jobs).",
                                 registry=r)
        self.disk_low = Gauge("radix_agent_disk_low", "1 while the jobs directory or the engine's root is under "
                              "--min-free-disk-gb (the agent takes no jobs).", registry=r)
        self.results_pending = Gauge("radix_agent_results_pending", "Results being delivered (retried until the "
                                     "control plane takes them).", registry=r)
        self._last_heartbeat: float | None = None
        self._last_exchange: float | None = None
        self._lock = threading.Lock()
        Gauge("radix_agent_heartbeat_age_seconds", "Seconds since the last heartbeat the control plane accepted.",
              registry=r).set_function(lambda: self.age(self._last_heartbeat))

    def age(self, when: float | None) -> float:
        return float("inf") if when is None else self._clock() - when

    def heartbeat_sent(self) -> None:
        with self._lock:
            self._last_heartbeat = self._clock()

    def exchanged(self) -> None:
        """Any answer from the control plane that the agent could use."""
        with self._lock:
            self._last_exchange = self._clock()

    def last_exchange_age(self) -> float:
        with self._lock:
            return self.age(self._last_exchange)

    def add_gpu_source(self, latest: Callable[[], dict[str, dict[str, Any]]],
                       units: Callable[[], dict[str, dict[str, Any]]] | None = None) -> None:
        """`latest`: telemetry per physical GPU; `units`: health and job per unit handed out (a MIG instance is
        one), default the physical GPUs themselves."""
        self.registry.register(_GpuCollector(latest, units or latest))


class _GpuCollector(Collector):
    FIELDS = {
        "temperature_c": ("radix_agent_gpu_temperature_celsius", "GPU temperature."),
        "utilization_gpu_pct": ("radix_agent_gpu_utilization_percent", "GPU utilization."),
        "memory_used_mb": ("radix_agent_gpu_memory_used_mebibytes", "GPU memory used."),
        "power_w": ("radix_agent_gpu_power_watts", "GPU power draw."),
    }

    def __init__(self, latest: Callable[[], dict[str, dict[str, Any]]],
                 units: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._latest = latest
        self._units = units

    def collect(self) -> Iterable[GaugeMetricFamily]:
        samples = self._latest()
        families = {key: GaugeMetricFamily(name, doc, labels=["uuid"]) for key, (name, doc) in self.FIELDS.items()}
        healthy = GaugeMetricFamily("radix_agent_gpu_healthy", "1 when the GPU (or MIG instance) may take new jobs.",
                                    labels=["uuid"])
        busy = GaugeMetricFamily("radix_agent_gpu_in_use", "1 when a job holds the GPU (or MIG instance).",
                                 labels=["uuid"])
        for uuid, sample in samples.items():
            for key, family in families.items():
                if sample.get(key) is not None:
                    family.add_metric([uuid], float(sample[key]))
        for uuid, unit in self._units().items():
            healthy.add_metric([uuid], 1.0 if unit.get("health", {}).get("healthy") else 0.0)
            busy.add_metric([uuid], 1.0 if unit.get("job_id") else 0.0)
        yield from families.values()
        yield healthy
        yield busy
