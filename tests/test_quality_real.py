"""The protocol check of benchmarks/quality_real.py: which metric it reads per pool, and how seeds aggregate."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality_real import _aggregate, resolve_metric

NAN = math.nan


def _seed(full_loss: float, random_loss: float, random_acc: float) -> dict:
    full = {"acc": NAN, "loss": full_loss, "rows": 100, "acc_by_task": {"a": NAN}, "loss_by_task": {"a": full_loss}}
    random = {"rows": 15, "dup": 0.1, "noise": 0.0, "coverage": 1.0, "acc": random_acc, "loss": random_loss,
              "rel_acc": NAN, "rel_loss": full_loss / random_loss * 100,
              "acc_by_task": {"a": random_acc}, "loss_by_task": {"a": random_loss}}
    return {"full": full, "random@0.15": random}


def test_auto_metric_is_accuracy_on_label_answers_and_loss_on_free_form_answers():
    assert resolve_metric("easyvqa", "auto") == "acc"
    assert resolve_metric("synthetic", "auto") == "loss"
    assert resolve_metric("synthetic", "acc") == "acc"


def test_loss_protocol_reads_rel_loss_and_leaves_unmeasured_accuracy_out():
    metrics = _aggregate([_seed(2.0, 2.5, NAN), _seed(2.0, 2.0, NAN)], [0.15], "loss")
    # Rel(loss) per seed: 80 and 100 -> mean 90 -> full minus random = 10 points
    assert metrics["random@0.15"]["rel_loss"] == {"mean": 90.0, "std": 10.0}
    assert metrics["protocol"] == {"metric": "loss", "full_minus_random_rel": 10.0, "discriminates": True}
    assert "acc" not in metrics["full"] and "rel_acc" not in metrics["random@0.15"]
    assert metrics["full"]["acc_by_task"] == {} and metrics["random@0.15"]["loss_by_task"] == {"a": 2.25}


def test_accuracy_protocol_without_a_measured_rel_does_not_discriminate():
    metrics = _aggregate([_seed(2.0, 2.5, NAN)], [0.15], "acc")
    assert metrics["protocol"] == {"metric": "acc", "full_minus_random_rel": None, "discriminates": False}
    assert metrics["random@0.15"]["rel_loss"]["mean"] == pytest.approx(80.0)
