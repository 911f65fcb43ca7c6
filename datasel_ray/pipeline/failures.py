"""When a phase stops instead of going on: the failure budget and the stall watch (``failures`` config section).

A row that fails for a reason of its own (an undecodable image, a conversation longer than the context) goes to
``quarantine/<phase>/`` and the phase goes on. Two things stop a phase instead, each with a :class:`PhaseFailed`
that says what happened and what to do:

- :class:`FailureBudget`: more than ``max_quarantine_fraction`` of the rows seen so far were quarantined (once
  ``min_rows`` rows have been seen), as Ray Data's ``max_errored_blocks`` or Spark's task failure limit. A pool
  whose images all fail to read has a problem no row can be blamed for; the error lists the top reasons with one
  message each.
- :class:`StallWatch`: no progress for ``stall_warning_s`` prints why (the resources pending work asks for, what
  the cluster has free, nodes alive and lost) to the console and to ``progress.json`` (``datasel status``); after
  ``stall_timeout_s`` with work still waiting for resources that no autoscaler can add, the phase stops with
  that message instead of waiting forever.

Errors that are not a row's fault (storage unreachable, permissions, a missing package, out of memory) are
raised where they happen (:class:`datasel_ray.io.storage.StorageError`, ...) and never quarantine a row. Nothing
here imports Ray: the cluster's state comes in through a ``diagnose`` callable (the Ray adapter's
:func:`~datasel_ray.pipeline.ray_adapter.cluster_diagnosis`).
"""

from __future__ import annotations

import _thread
import logging
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from datasel_ray import schema
from datasel_ray.config import FailureConfig
from datasel_ray.io.storage import Location
from datasel_ray.pipeline import progress as progress_mod

log = logging.getLogger(__name__)

TOP_REASONS = 5


class PhaseFailed(RuntimeError):
    """A phase stopped for a cause that is not one row's fault; ``kind`` names the cause for the manifest."""

    kind = "phase_failed"


class FailureBudgetExceeded(PhaseFailed):
    kind = "failure_budget"


class PhaseStalled(PhaseFailed):
    kind = "stalled"


# ------------------------------------------------------------------------------------------------ failure budget


def quarantine_reasons(quarantine_dir: Location, exclude: frozenset[str] = frozenset()) -> tuple[Counter, dict]:
    """(rows per reason, the first message of each reason) over ``quarantine_dir/*.parquet``."""
    counts: Counter = Counter()
    first: dict[str, str] = {}
    for f in quarantine_dir.list(".parquet"):
        table = f.read_parquet([schema.REASON, schema.MESSAGE])
        for reason, message in zip(table.column(schema.REASON).to_pylist(), table.column(schema.MESSAGE).to_pylist()):
            if reason in exclude:
                continue
            counts[reason] += 1
            first.setdefault(reason, message)
    return counts, first


class FailureBudget:
    """Counts the rows a phase has seen and quarantined; :meth:`update` raises :class:`FailureBudgetExceeded`
    once ``failed > max_quarantine_fraction * seen`` with ``seen >= min_rows``.

    ``quarantine_dir``: where the phase writes its quarantine shards (read only to build the error message, and
    at start to count the rows of shards that a resumed run already finished: pass their row count as ``seen``).
    ``exclude``: reasons that do not count (ingest's ``duplicate_id``).
    """

    def __init__(self, phase: str, cfg: FailureConfig, quarantine_dir: Location, seen: int = 0,
                 exclude: frozenset[str] = frozenset()):
        self.phase = phase
        self.cfg = cfg
        self.quarantine_dir = quarantine_dir
        self.exclude = exclude
        self.seen = seen
        self.failed = sum(quarantine_reasons(quarantine_dir, exclude)[0].values()) if seen else 0

    def update(self, rows: int, failed: int) -> None:
        """Add ``rows`` seen (failed ones included) of which ``failed`` were quarantined; raise when over."""
        self.seen += rows
        self.failed += failed
        self.check()

    def check(self) -> None:
        if self.seen >= self.cfg.min_rows and self.failed > self.cfg.max_quarantine_fraction * self.seen:
            raise FailureBudgetExceeded(self.message())

    def message(self) -> str:
        counts, first = quarantine_reasons(self.quarantine_dir, self.exclude)
        lines = [f"{self.phase}: {self.failed} of {self.seen} rows quarantined ({self.failed / self.seen:.1%}), more "
                 f"than failures.max_quarantine_fraction={self.cfg.max_quarantine_fraction:g}: stopped, since a "
                 f"share this large is rarely the rows' own fault. Top reasons in its quarantine files so far (shards "
                 f"still in flight included):"]
        for reason, n in counts.most_common(TOP_REASONS):
            lines.append(f"  {reason}: {n} rows, e.g. {first[reason]}")
        lines.append(f"Rows are in {self.quarantine_dir}. Fix the cause (storage access, pool paths, image_root, "
                     f"model.max_length) and re-run, or raise failures.max_quarantine_fraction if these rows are "
                     f"expected to fail.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ stall watch


def _interrupt_main_thread() -> None:
    """KeyboardInterrupt in the main thread, even while it blocks in a lock or a queue (Ray Data's result queue):
    a real SIGINT sent to that thread interrupts the wait; ``_thread.interrupt_main`` alone only flags it for the
    next bytecode, which a blocked wait never reaches."""
    if callable(signal.getsignal(signal.SIGINT)):  # a Python handler: the signal becomes KeyboardInterrupt
        try:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return
        except (AttributeError, OSError, ValueError):
            pass
    _thread.interrupt_main()


@dataclass
class ClusterDiagnosis:
    """What the cluster can say about waiting work. ``pending``: resource shapes asked for and not yet granted,
    with counts (``[({"CPU": 1.0}, 2)]``); ``free`` / ``total``: cluster resources; ``nodes_alive`` /
    ``nodes_lost``: counts (lost: dead since the run's driver connected); ``can_scale``: an autoscaler can add a
    node that fits the pending shapes."""

    pending: list[tuple[dict, int]] = field(default_factory=list)
    free: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    nodes_alive: int = 0
    nodes_lost: int = 0
    can_scale: bool = False

    def describe(self) -> str:
        def res(d: dict) -> str:
            keys = [k for k in ("CPU", "GPU") if k in d] + sorted(k for k in d if k not in ("CPU", "GPU", "memory",
                    "object_store_memory") and not k.startswith("node:"))
            return "{" + ", ".join(f"{k}: {d[k]:g}" for k in keys) + "}"

        pending = "; ".join(f"{n} x {res(b)}" for b, n in self.pending) or "nothing"
        scale = "an autoscaler can add nodes for it" if self.can_scale else "no autoscaler can add capacity"
        return (f"pending resource requests: {pending}; free: {res(self.free)} of {res(self.total)}; "
                f"nodes alive: {self.nodes_alive}, lost: {self.nodes_lost}; {scale}")


class StallWatch:
    """A daemon thread watching one phase's progress (``with StallWatch(...):`` around the phase).

    Every ``poll`` seconds it compares now with the last progress (:func:`progress.last_activity`). Past
    ``stall_warning_s`` it writes the diagnosis to ``stream`` and to ``progress.json`` (key ``stall``), again at
    every further ``stall_warning_s``. Past ``stall_timeout_s``, when the diagnosis shows pending requests that no
    autoscaler can satisfy, it interrupts the main thread; the ``with`` block then raises :class:`PhaseStalled`
    with the message. Work that runs without waiting for resources (a long task, a driver-side step) is never
    stopped: it is slow, not stalled.
    """

    def __init__(self, phase: str, cfg: FailureConfig, diagnose: Callable[[], ClusterDiagnosis],
                 progress_file: Location | None = None, stream=None, poll: float | None = None, quiet: bool = False):
        self.phase = phase
        self.cfg = cfg
        self.diagnose = diagnose
        self.progress_file = progress_file
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.poll = poll if poll is not None else max(0.5, min(5.0, cfg.stall_warning_s / 4))
        self.error: str | None = None
        self.warnings: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StallWatch":
        progress_mod.mark_activity()
        self._thread = threading.Thread(target=self._run, name=f"stall-watch-{self.phase}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll + 5)
        if self.error is not None and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            raise PhaseStalled(self.error) from None
        return False

    def _run(self) -> None:
        warned_at = 0.0
        while not self._stop.wait(self.poll):
            idle = time.monotonic() - progress_mod.last_activity()
            if idle < self.cfg.stall_warning_s:
                warned_at = 0.0
                continue
            timed_out = self.cfg.stall_timeout_s is not None and idle >= self.cfg.stall_timeout_s
            if not timed_out and idle - warned_at < self.cfg.stall_warning_s:
                continue
            try:
                diagnosis = self.diagnose()
            except Exception as err:  # the cluster's state is advisory: a failed query never stops the phase
                log.debug("stall diagnosis failed: %s", err)
                continue
            warned_at = idle
            message = f"[{self.phase}] no progress for {idle:.0f}s: {diagnosis.describe()}"
            if timed_out and diagnosis.pending and not diagnosis.can_scale:
                self.error = (f"{message}. Stopped after failures.stall_timeout_s={self.cfg.stall_timeout_s:g}s: "
                              f"the cluster cannot run the waiting work. Add nodes (or restart lost ones), lower "
                              f"the per-actor resources (extract.num_cpus_per_actor, num_gpus_per_actor), or "
                              f"re-run: finished shards are kept.")
                self._record(self.error)
                _interrupt_main_thread()
                return
            self._record(message)

    def _record(self, message: str) -> None:
        self.warnings.append(message)
        if self.quiet:
            log.warning("%s", message)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()
        if self.progress_file is not None:
            try:
                state = self.progress_file.read_json() if self.progress_file.exists() else {}
                state.setdefault(self.phase, {})["stall"] = {"message": message, "updated": time.time()}
                self.progress_file.write_json(state)
            except Exception as err:  # progress.json is advisory
                log.debug("could not record the stall in %s: %s", self.progress_file, err)
