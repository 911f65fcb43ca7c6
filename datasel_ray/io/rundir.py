"""The run directory and its ``manifest.json``.

Layout: ``manifest.json``, ``progress.json``, ``samples/``, ``quarantine/``, ``lora/``, ``features/``, ``stats/``,
``selections/<method>/``, ``report/``. The manifest records the configuration, package versions, model id,
feature schema version, seed and the status of each phase. Before a phase reuses outputs it compares the
config fields that determine them with those recorded; on a mismatch it refuses and names the field and
both values (trak ``savers.py`` practice), unless the caller forces a recompute.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import uuid
from typing import Any

from datasel_ray import __version__, schema
from datasel_ray.config import PHASES, RunConfig
from datasel_ray.io.storage import Location
from datasel_ray.models.identity import model_identity

PHASE_DIRS = {
    "ingest": ("samples", "quarantine/ingest"),
    "warmup": ("lora",),
    "extract": ("features", "quarantine/extract"),
    "dedup": ("dedup",),
    "aggregate": ("stats",),
    "select": ("selections",),
    "report": ("report",),
}
_VERSIONED_PACKAGES = ("ray", "torch", "transformers", "peft", "faiss-cpu", "numpy", "pyarrow", "pydantic")


class ManifestMismatch(RuntimeError):
    """The run directory was produced with a different configuration.

    ``phase``, ``key`` (dotted config field), ``recorded`` and ``current`` (its two values) say which.
    """

    def __init__(self, run_dir: str, phase: str, key: str, recorded: Any, current: Any):
        self.phase, self.key, self.recorded, self.current = phase, key, recorded, current
        super().__init__(
            f"Run directory {run_dir} has '{phase}' outputs made with {key}={recorded!r}, but the config now says "
            f"{key}={current!r}. Use a new run directory, restore the value, or pass --force to recompute "
            f"'{phase}' and the phases after it.")


def phase_fingerprint(cfg: RunConfig, phase: str) -> dict[str, Any]:
    """The config values that determine a phase's outputs, as a flat ``{dotted.field: value}`` dict."""
    parts: dict[str, Any] = {"seed": cfg.seed}
    if phase == "ingest":
        parts["pool"] = cfg.pool.model_dump(exclude={"records_per_block", "executor", "io_threads"})
    elif phase == "warmup":
        parts["model"] = _model_parts(cfg)
        parts["tive"] = cfg.tive.model_dump(include={"warmup_fraction", "lora", "learning_rate", "epochs",
                                                     "warmup_batch_size"})
    elif phase == "extract":
        parts["model"] = _model_parts(cfg)
        parts["extract"] = cfg.extract.model_dump(include={"batch_size", "shard_rows"})
        parts["tive"] = cfg.tive.model_dump(include={"enabled", "proj_dim", "projection", "gradient_type"})
        parts["feature_schema_version"] = schema.FEATURE_SCHEMA_VERSION
    elif phase == "aggregate":
        from datasel_ray.methods.registry import fitted_methods, registry

        parts["methods"] = fitted_methods(cfg.select.methods, cfg.tive.enabled)
        for method in registry().values():  # every registered method's switches, fitted or not
            if method.config_section:
                fields = set(method.fit_fields) if method.fit_fields is not None else None
                parts[method.config_section] = getattr(cfg, method.config_section).model_dump(include=fields)
        if cfg.select.dedup:  # the methods are fitted on the rows dedup kept
            parts["select_dedup"] = True
            parts["dedup"] = cfg.dedup.model_dump()
    elif phase == "dedup":
        parts["dedup"] = cfg.dedup.model_dump()
        parts["select_dedup"] = cfg.select.dedup  # dedup/kept/ is written for it
    return _flatten(parts)


def _model_parts(cfg: RunConfig) -> dict[str, Any]:
    """The model config plus the identity of the weights it names (see :mod:`datasel_ray.models.identity`)."""
    return {**cfg.model.model_dump(exclude={"store", "shared"}),
            "weights": model_identity(cfg.model.name_or_path, cfg.model.revision)}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def package_versions() -> dict[str, str]:
    versions = {"datasel-ray": __version__}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = _md.version(name)
        except _md.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """A run directory on any filesystem, with manifest bookkeeping."""

    def __init__(self, path: str):
        self.root = Location.parse(path)

    def __str__(self) -> str:
        return str(self.root)

    def __truediv__(self, name: str) -> Location:
        return self.root / name

    @property
    def manifest_path(self) -> Location:
        return self.root / "manifest.json"

    def load_manifest(self) -> dict:
        return self.manifest_path.read_json() if self.manifest_path.exists() else {}

    def save_manifest(self, manifest: dict) -> None:
        self.manifest_path.write_json(manifest)

    def init(self, cfg: RunConfig) -> dict:
        """Create the directory and manifest if needed; refresh config and versions."""
        self.root.mkdir()
        manifest = self.load_manifest()  # may hold only the model copy, recorded before init (shared_copy)
        manifest.setdefault("run_id", uuid.uuid4().hex[:12])
        manifest.setdefault("created", _now())
        manifest.setdefault("phases", {})
        manifest.update({
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "model_id": cfg.model.name_or_path,
            "model_revision": cfg.model.revision,
            "feature_schema_version": schema.FEATURE_SCHEMA_VERSION,
            "versions": package_versions(),
        })
        self.save_manifest(manifest)
        return manifest

    def check_phase(self, cfg: RunConfig, phase: str) -> None:
        """Raise ManifestMismatch when recorded outputs of ``phase`` came from a different config."""
        recorded = self.load_manifest().get("phases", {}).get(phase)
        if not recorded or "fingerprint" not in recorded:
            return
        current = phase_fingerprint(cfg, phase)
        old = recorded["fingerprint"]
        for key in sorted(set(current) | set(old)):
            if current.get(key) != old.get(key):
                raise ManifestMismatch(str(self.root), phase, key, old.get(key), current.get(key))

    def phase_status(self, phase: str) -> str:
        return self.load_manifest().get("phases", {}).get(phase, {}).get("status", "pending")

    def start_phase(self, cfg: RunConfig, phase: str) -> None:
        manifest = self.load_manifest()
        entry = manifest.setdefault("phases", {}).setdefault(phase, {})
        entry.update({"status": "running", "fingerprint": phase_fingerprint(cfg, phase), "started": _now()})
        entry.setdefault("first_started", entry["started"])
        self.save_manifest(manifest)

    def finish_phase(self, phase: str, seconds: float, **details: Any) -> None:
        manifest = self.load_manifest()
        entry = manifest.setdefault("phases", {}).setdefault(phase, {})
        entry.pop("error", None)
        entry.update({"status": "done", "finished": _now(), "seconds": round(seconds, 3), **details})
        self.save_manifest(manifest)

    def fail_phase(self, phase: str, seconds: float, error: BaseException) -> None:
        """Record that ``phase`` stopped with ``error`` (``datasel status`` shows it; a re-run resumes it)."""
        manifest = self.load_manifest()
        entry = manifest.setdefault("phases", {}).setdefault(phase, {})
        kind = getattr(error, "kind", None) or ("interrupted" if isinstance(error, KeyboardInterrupt)
                                                else type(error).__name__)
        entry.update({"status": "failed", "failed": _now(), "seconds": round(seconds, 3),
                      "error": {"kind": kind, "message": str(error)}})
        self.save_manifest(manifest)

    def reset_phase(self, phase: str) -> None:
        """Delete the outputs of ``phase`` and every later phase, and forget their status."""
        manifest = self.load_manifest()
        for later in PHASES[PHASES.index(phase):]:
            for sub in PHASE_DIRS[later]:
                (self.root / sub).delete()
            manifest.get("phases", {}).pop(later, None)
        self.save_manifest(manifest)
