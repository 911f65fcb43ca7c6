"""The failure budget and the stall watch (pipeline/failures.py), with their values; no Ray."""

from __future__ import annotations

import io
import threading
import time

import pyarrow as pa
import pytest

from datasel_ray import schema
from datasel_ray.config import FailureConfig
from datasel_ray.io.storage import Location
from datasel_ray.pipeline import progress as progress_mod
from datasel_ray.pipeline.failures import (ClusterDiagnosis, FailureBudget, FailureBudgetExceeded, PhaseStalled,
                                           StallWatch)
from datasel_ray.pipeline.ingest import QUARANTINE_SCHEMA


def _write_quarantine(folder: Location, name: str, reasons: list[tuple[str, str]]) -> None:
    rows = [{schema.ROW_ID: i, schema.SOURCE_FILE: "pool.json", schema.SOURCE_INDEX: i, schema.PHASE: "extract",
             schema.REASON: r, schema.MESSAGE: m, schema.RAW: "{}"} for i, (r, m) in enumerate(reasons)]
    (folder / name).write_parquet(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))


def test_budget_waits_for_min_rows_then_stops_with_top_reasons(tmp_path):
    q = Location.parse(tmp_path / "quarantine")
    cfg = FailureConfig(max_quarantine_fraction=0.05, min_rows=100)
    budget = FailureBudget("extract", cfg, q)
    _write_quarantine(q, "a.parquet", [("image_corrupt", "cannot decode s3://p/1.png: broken")] * 30)
    budget.update(50, 30)  # 60% failed, but fewer than min_rows seen: goes on
    _write_quarantine(q, "b.parquet", [("too_long", "1 turn of 9000 tokens")] * 2)
    with pytest.raises(FailureBudgetExceeded) as err:
        budget.update(50, 2)  # 32 of 100 > 5%
    text = str(err.value)
    assert "32 of 100 rows quarantined (32.0%)" in text
    assert "image_corrupt: 30 rows, e.g. cannot decode s3://p/1.png: broken" in text
    assert "too_long: 2 rows" in text
    assert text.index("image_corrupt") < text.index("too_long")  # most frequent first


def test_budget_boundary_and_excluded_reasons(tmp_path):
    q = Location.parse(tmp_path / "quarantine")
    cfg = FailureConfig(max_quarantine_fraction=0.05, min_rows=100)
    budget = FailureBudget("ingest", cfg, q, exclude=frozenset({schema.Reason.DUPLICATE_ID}))
    budget.update(200, 10)  # exactly 5%: not more than the share
    assert budget.failed == 10
    with pytest.raises(FailureBudgetExceeded):
        budget.update(0, 1)
    # a resumed phase counts the quarantine rows it already wrote, without the excluded reasons
    _write_quarantine(q, "a.parquet", [("duplicate_id", "dup")] * 40 + [("image_missing", "gone")] * 3)
    resumed = FailureBudget("ingest", cfg, q, seen=100, exclude=frozenset({schema.Reason.DUPLICATE_ID}))
    assert (resumed.seen, resumed.failed) == (100, 3)


class _Clock:
    """Drives progress.last_activity() from the test."""

    def __init__(self, monkeypatch):
        self.idle = 0.0
        monkeypatch.setattr(progress_mod, "last_activity", lambda: time.monotonic() - self.idle)


def _watch(cfg, diagnosis, stream):
    return StallWatch("extract", cfg, lambda: diagnosis, stream=stream, poll=0.02)


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.01)


def test_stall_warns_then_stops_when_nothing_can_add_capacity(monkeypatch, tmp_path):
    clock = _Clock(monkeypatch)
    cfg = FailureConfig(stall_warning_s=10, stall_timeout_s=20)
    diagnosis = ClusterDiagnosis(pending=[({"CPU": 1.0}, 2)], free={"CPU": 0.0}, total={"CPU": 1.0},
                                 nodes_alive=2, nodes_lost=1)
    stream = io.StringIO()
    with pytest.raises(PhaseStalled) as err:
        with _watch(cfg, diagnosis, stream) as watch:
            clock.idle = 12
            _wait_for(lambda: watch.warnings)
            assert "no progress for 12s" in stream.getvalue()
            assert watch.error is None
            clock.idle = 25
            started = time.monotonic()
            threading.Event().wait(60)  # a blocked wait, as the driver's in Ray Data's result queue
    assert time.monotonic() - started < 10, "the watch did not interrupt the blocked main thread"
    text = str(err.value)
    assert "pending resource requests: 2 x {CPU: 1}" in text
    assert "free: {CPU: 0} of {CPU: 1}" in text
    assert "nodes alive: 2, lost: 1" in text
    assert "failures.stall_timeout_s=20s" in text


@pytest.mark.parametrize("diagnosis", [
    ClusterDiagnosis(pending=[({"CPU": 1.0}, 1)], can_scale=True),  # an autoscaler will add a node
    ClusterDiagnosis(pending=[]),  # nothing waits for resources: slow, not stalled
])
def test_stall_never_stops_work_that_can_still_run(monkeypatch, diagnosis):
    clock = _Clock(monkeypatch)
    cfg = FailureConfig(stall_warning_s=1, stall_timeout_s=2)
    stream = io.StringIO()
    with _watch(cfg, diagnosis, stream) as watch:
        clock.idle = 30
        _wait_for(lambda: watch.warnings)
        time.sleep(0.2)
    assert watch.error is None
    assert "no progress for 30s" in stream.getvalue()


def test_stall_timeout_null_waits_forever(monkeypatch):
    clock = _Clock(monkeypatch)
    cfg = FailureConfig(stall_warning_s=1, stall_timeout_s=None)
    with _watch(cfg, ClusterDiagnosis(pending=[({"CPU": 1.0}, 1)]), io.StringIO()) as watch:
        clock.idle = 10_000
        _wait_for(lambda: watch.warnings)
        time.sleep(0.2)
    assert watch.error is None


def test_stall_config_refuses_timeout_below_warning():
    with pytest.raises(ValueError, match="stall_timeout_s"):
        FailureConfig(stall_warning_s=60, stall_timeout_s=10)
