"""Console filters: each drops one message of one module and nothing else; verbose mode installs none."""

from __future__ import annotations

import logging
import warnings

import pytest

from datasel_ray import console
from datasel_ray.cli import build_parser


@pytest.fixture
def clean_console(monkeypatch):
    """Filters and logger state restored after the test."""
    loggers = [logging.getLogger(name) for name, _ in console.LOG_FILTERS]
    saved = [(lg, list(lg.filters)) for lg in loggers]
    levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
    for lg in loggers:  # the session's Ray start installed them in this process already
        lg.filters[:] = [f for f in lg.filters if not isinstance(f, console._DropPrefix)]
    with warnings.catch_warnings():
        warnings.resetwarnings()
        yield
    for lg, filters in saved:
        lg.filters[:] = filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _warn(message: str, category: type[Warning], module: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.install()  # its filters go in front of "always"
        warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1,
                               module=module)
    return [str(w.message) for w in caught]


def test_warning_filter_is_specific_to_category_message_and_module(clean_console, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert _warn(message, FutureWarning, "transformers.modeling_utils") == []
    assert _warn(message, FutureWarning, "mypackage.models") == [message]  # another module
    assert _warn(message, UserWarning, "transformers.modeling_utils") == [message]  # another category
    other = "`foo` is deprecated"
    assert _warn(other, FutureWarning, "transformers.modeling_utils") == [other]  # another message


def _emitted(logger_name: str, message: str) -> bool:
    logger = logging.getLogger(logger_name)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return bool(records)


def test_log_filters_drop_only_their_message(clean_console, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.install()
    console.install()  # idempotent: one filter per logger
    for name, prefix in console.LOG_FILTERS:
        assert not _emitted(name, prefix + " (details)"), name
        assert _emitted(name, "something else went wrong"), name
        assert sum(isinstance(f, console._DropPrefix) for f in logging.getLogger(name).filters) == 1
    assert logging.getLogger("ray.data").level == logging.WARNING
    assert _emitted("datasel_ray.pipeline.extract", "Progress bars disabled")  # same text, our own logger


def test_verbose_installs_nothing_and_keeps_ray_at_info(clean_console, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert _warn(message, FutureWarning, "transformers.modeling_utils") == [message]
    for name, prefix in console.LOG_FILTERS:
        assert _emitted(name, prefix), name
    assert console.ray_init_kwargs() == {"logging_level": logging.INFO}
    assert console.train_log_level() == "INFO"
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    quiet = console.ray_init_kwargs()
    assert quiet["logging_level"] == logging.WARNING
    assert quiet["runtime_env"] == {"worker_process_setup_hook": "datasel_ray.console.install"}
    assert console.train_log_level() == "WARNING"


def test_worker_setup_hook_is_importable():
    import importlib

    module, _, name = console.WORKER_SETUP_HOOK.rpartition(".")
    assert getattr(importlib.import_module(module), name) is console.install


@pytest.mark.parametrize("argv", [["-v", "status", "run"], ["status", "run", "-v"], ["status", "-v", "run"]])
def test_verbose_flag_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["status", "run"]).verbose is False
