"""What reaches the console: warnings and log records a user cannot act on are dropped; ``datasel -v`` keeps all.

Each filter names one message of one module (a warning by category and module, a log record by logger name), so
anything else those libraries say still shows. The same filters run in the driver (:func:`install`) and in every
Ray worker process of the job (``worker_process_setup_hook``, see :func:`ray_init_kwargs`), because Ray workers
are separate interpreters whose output Ray forwards to the driver's console.

Verbosity travels in the ``DATASEL_VERBOSE`` environment variable ("1" = show everything), set by the CLI's
``-v`` before Ray starts, so a local Ray's workers inherit it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "DATASEL_VERBOSE"
WORKER_SETUP_HOOK = "datasel_ray.console.install"

# (category, message regex matched at the start, module regex): the module is the one the warning is attributed to.
WARNING_FILTERS: tuple[tuple[type[Warning], str, str], ...] = (
    # peft reads PreTrainedModel.is_gradient_checkpointing, which transformers 5 deprecates
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils\Z"),
)

# (logger name, message prefix): records of exactly that logger starting with that text are dropped.
LOG_FILTERS: tuple[tuple[str, str], ...] = (
    # a local Ray started by this process generates its own token; the warning only repeats the docs
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"),
    # progress is reported per phase by datasel itself (pipeline/progress.py)
    ("ray.data._internal.progress", "Progress bars disabled"),
    # Ray Train's cleaner actor polls the state API while the controller starts; it retries on its own
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state"),
)

# Loggers lowered to WARNING: their INFO lines describe Ray's or a library's internals, not the run.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "faiss", "matplotlib")
# Ray modules whose logger is named by the file path (``logging.getLogger(__file__)``), relative to ray's package:
# Ray Train's worker context logs every reported result at INFO.
QUIET_RAY_FILE_LOGGERS = ("train/v2/_internal/execution/context.py",)

# huggingface_hub reads this when transformers is first imported: no per-file weight loading/saving bars.
_HF_PROGRESS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(verbose: bool) -> None:
    """Record the choice for this process and for Ray workers started after this call."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install() -> None:
    """Apply the filters in this process (no-op when verbose; idempotent). Also Ray's worker setup hook."""
    if is_verbose():
        return
    for category, message, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "ray" in sys.modules:
        ray_dir = os.path.dirname(sys.modules["ray"].__file__)
        for relative in QUIET_RAY_FILE_LOGGERS:
            logging.getLogger(os.path.join(ray_dir, relative)).setLevel(logging.WARNING)
        _pin_ray_address()
    os.environ.setdefault(_HF_PROGRESS_ENV, "1")
    if "transformers" in sys.modules:  # imported before this call: the environment variable came too late
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _pin_ray_address() -> None:
    """Inside a Ray worker: RAY_ADDRESS = this cluster's GCS. Ray Train's placement-group cleaner looks the cluster
    up by address and dies with "Found multiple active Ray instances" when another Ray runs on the same machine."""
    import ray

    if ray.is_initialized() and "RAY_ADDRESS" not in os.environ:
        context = ray.get_runtime_context()
        if context.worker.mode == ray.WORKER_MODE:
            os.environ["RAY_ADDRESS"] = context.gcs_address


def ray_init_kwargs() -> dict:
    """Extra ``ray.init`` arguments: Ray's own logging at WARNING and the filters in every worker; INFO and no
    filters when verbose."""
    if is_verbose():
        return {"logging_level": logging.INFO}
    return {"logging_level": logging.WARNING, "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK}}


def train_log_level() -> str:
    """Ray Train's ``LoggingConfig.log_level`` for the warm-up run."""
    return "INFO" if is_verbose() else "WARNING"
