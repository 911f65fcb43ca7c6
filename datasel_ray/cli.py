"""``datasel`` command line: one entry point for every phase, the whole run, the demo and the service."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from datasel_ray import console
from datasel_ray.config import PHASES, ConfigError, RunConfig, load_config, merge_dicts
from datasel_ray.methods.registry import method_names


VERBOSE_HELP = "show everything: library warnings, progress bars, Ray and Ray Data/Train logs at INFO, tracebacks"


def _parse_set(items: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _config_from_args(args, extra: dict | None = None) -> RunConfig:
    overrides = _parse_set(getattr(args, "set", None))
    if getattr(args, "run_dir", None):
        overrides = merge_dicts(overrides, {"run_dir": args.run_dir})
    if extra:
        overrides = merge_dicts(overrides, extra)
    return load_config(getattr(args, "config", None), overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see cluster_configs/example_run.yaml)")
    p.add_argument("--run-dir", help="run directory (local path or filesystem URI); overrides run_dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. extract.batch_size=16")
    p.add_argument("--force", action="store_true", help="delete this phase's outputs (and later phases') and recompute")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def cmd_synth(args) -> int:
    from datasel_ray.synthetic import SynthConfig, generate_pool

    info = generate_pool(args.out, SynthConfig(num_samples=args.num_samples, seed=args.seed, format=args.format,
                                               duplicate_rate=args.duplicate_rate, noise_rate=args.noise_rate,
                                               bad_rate=args.bad_rate))
    print(json.dumps({"pool": str(info.pool_path), "image_root": str(info.image_root),
                      "ground_truth": str(info.ground_truth_path), "rows": info.num_rows, "bad_rows": info.num_bad}))
    return 0


def cmd_make_tiny_model(args) -> int:
    from datasel_ray.training.recipes.tiny import build_tiny_model, default_tiny_model_dir

    path = build_tiny_model(Path(args.out) if args.out else default_tiny_model_dir(), seed=args.seed)
    print(path)
    return 0


def cmd_make_model(args) -> int:
    from datasel_ray.models.loading import BUILT_MODELS, recipe

    if args.name not in BUILT_MODELS:
        raise ConfigError(f"make-model: unknown model {args.name!r}. Choose from: {', '.join(sorted(BUILT_MODELS))}")
    module = recipe(args.name)
    started = time.monotonic()
    path = module.build(Path(args.out) if args.out else module.default_dir(), seed=args.seed)
    print(json.dumps({"model": args.name, "path": str(path), "seconds": round(time.monotonic() - started, 1)}))
    return 0


def _phase_command(phase: str):
    def run(args) -> int:
        from datasel_ray.pipeline.runner import run_phases

        extra: dict = {}
        if phase == "ingest":
            pool = {k: v for k, v in {"path": args.pool, "image_root": args.image_root,
                                      "task_map": args.task_map, "format": args.format,
                                      "task_recipe": args.task_recipe, "schema": args.schema}.items() if v}
            extra = {"pool": pool} if pool else {}
        if phase == "select":
            sel = {}
            if args.method:
                sel["methods"] = [m for item in args.method for m in item.split(",") if m]
            if args.budget is not None:
                sel["budget"] = args.budget
            extra = {"select": sel} if sel else {}
        cfg = _config_from_args(args, extra)
        results = run_phases(cfg, [phase], force=phase if args.force else None, quiet=args.quiet)
        print(json.dumps(results[phase], indent=2, default=str))
        return 0
    return run


def cmd_run(args) -> int:
    from datasel_ray.pipeline.runner import run_phases

    cfg = _config_from_args(args)
    results = run_phases(cfg, force=args.force_phase, quiet=args.quiet)
    print(json.dumps(results, indent=2, default=str))
    return 0


def cmd_status(args) -> int:
    from datasel_ray.status import render_status

    print(render_status(args.run))
    return 0


def cmd_report(args) -> int:
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.report import write_report

    print(json.dumps(write_report(RunDir(args.run)), indent=2))
    return 0


def cmd_demo(args) -> int:
    from datasel_ray.demo import run_demo

    run_demo(Path(args.workdir), num_samples=args.num_samples, seed=args.seed, tive=not args.no_tive, model=args.model)
    return 0


def cmd_serve(args) -> int:
    from serve.app import serve_locally

    serve_locally(args.run, host=args.host, port=args.port, config_path=args.config,
                  direct_ingress=args.direct_ingress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from datasel_ray.io.tasks import TASK_RECIPES

    parser = argparse.ArgumentParser(prog="datasel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add_with_verbose(*args, **kwargs):  # -v also after the command: `datasel demo -v`
        p = add_parser(*args, **kwargs)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        return p

    sub.add_parser = add_with_verbose

    p = sub.add_parser("synth", help="generate a LLaVA-format pool with images and ground truth")
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["json", "jsonl", "parquet"], default="json")
    p.add_argument("--duplicate-rate", type=float, default=0.10)
    p.add_argument("--noise-rate", type=float, default=0.05)
    p.add_argument("--bad-rate", type=float, default=0.04)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("make-tiny-model", help="build the offline tiny LLaVA reference model")
    p.add_argument("--out", help="output directory (default: $DATASEL_HOME/tiny-llava-v1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("make-model", help="build (once) a reference model this project builds offline")
    p.add_argument("name", help="tiny or smol-llava")
    p.add_argument("--out", help="output directory (default: under $DATASEL_HOME)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_model)

    for phase in PHASES:
        if phase == "report":
            continue
        p = sub.add_parser(phase, help=f"run the {phase} phase")
        _add_common(p)
        if phase == "ingest":
            p.add_argument("--pool", help="pool file or directory (pool.path)")
            p.add_argument("--image-root", help="image root (pool.image_root)")
            p.add_argument("--task-map", help="YAML file of image-path prefix -> task")
            p.add_argument("--format", choices=["auto", "json", "jsonl", "parquet"])
            p.add_argument("--task-recipe", choices=TASK_RECIPES,
                           help="how tasks are inferred (pool.task_recipe; README, Tasks)")
            p.add_argument("--schema", choices=["auto", "llava", "texts", "messages"],
                           help="record shape (pool.schema; README, Pools); default: detected from the first records")
        if phase == "select":
            p.add_argument("--method", action="append", help=f"method name(s), repeatable or comma-separated: "
                           f"{', '.join(method_names())}")
            p.add_argument("--budget", type=float, help="fraction of the pool (< 1) or a row count (>= 1)")
        p.set_defaults(func=_phase_command(phase))

    p = sub.add_parser("run", help="run every phase the config enables")
    _add_common(p)
    p.add_argument("--force-phase", choices=PHASES, help="recompute this phase and the ones after it")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="synth → ingest → extract → aggregate → select on a local Ray, with a summary")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--num-samples", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tive", action="store_true", help="skip the TIVE warm-up and gradients")
    p.add_argument("--model", default="tiny", help="reference model: tiny (default), smol-llava or an HF checkpoint")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="progress and phase status of a run directory")
    p.add_argument("run")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="write the HTML report of a run directory")
    p.add_argument("run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve POST /score for a run directory on a local Ray Serve")
    p.add_argument("--run", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="serve options YAML")
    p.add_argument("--direct-ingress", action="store_true",
                   help="replicas also listen on ports of their own (printed), skipping the Serve proxy hop "
                        "(Ray Serve's experimental RAY_SERVE_ENABLE_DIRECT_INGRESS)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.set_verbose(args.verbose)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.install()
    started = time.monotonic()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a readable last line for known failure kinds; traceback with -v
        from datasel_ray.io.pool import PoolError
        from datasel_ray.io.rundir import ManifestMismatch
        from datasel_ray.io.storage import StorageError
        from datasel_ray.models.shared_copy import ModelCopyMismatch
        from datasel_ray.pipeline.failures import PhaseFailed

        if isinstance(err, (PoolError, ManifestMismatch, ValueError)) and not args.verbose:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, (PhaseFailed, StorageError, ModelCopyMismatch)) and not args.verbose:
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise
    finally:
        logging.getLogger(__name__).debug("datasel %s took %.1fs", args.command, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
