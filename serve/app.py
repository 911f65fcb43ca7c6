"""Ray Serve app: ``POST /score``, ``GET /info``, ``GET /healthz`` over a :class:`datasel_ray.scoring.Scorer`.

This module only speaks HTTP: it reads and bounds the body, checks the bearer token and hands the JSON body to a
``@serve.batch`` method: one batch of requests is parsed (``Scorer.parse``: validation + tokenisation, per request)
and its valid samples scored in model passes of up to ``max_batch_size`` samples (``Scorer.score_samples``), in one
hop to the replica's worker thread. Requests join the batch queue as soon as their body is read, so a batch fills
while the previous one is on the model (parsing each request first, on the same thread, let batches leave with a
few requests). With ``max_batch_size: 1`` a request is parsed and scored in one hop. Every scoring rule lives in
the scorer, shared with the batch path (:func:`datasel_ray.scoring.score_pool_samples`).

Entry points:

* ``build_app(args)`` — the import path ``serve.app:build_app`` for ``serve build`` / ``serve deploy`` /
  KubeRay RayService; ``args`` are the fields of :class:`ServeOptions` (``run_dir`` required).
* ``serve_locally(run_dir, host, port, config_path, direct_ingress)`` — ``datasel serve``: a local Ray Serve until
  Ctrl-C.

Direct ingress (Ray Serve's ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, experimental in the pinned Ray): every replica
also listens for HTTP on a port of its own, so a request skips the proxy hop and the replica's actor call back to
the proxy for the body. The variable must be in the environment of the process that starts Ray (the controller
reads it at start); :func:`replica_urls` lists the replicas' addresses, to put behind a load balancer or a
Kubernetes Service. The head-node proxy keeps serving the usual port as well.

Changing the Serve ``user_config`` to ``{"run_dir": ...}`` loads that run's statistics in the background and
swaps the scorer atomically: requests already admitted finish on the scorer they started with.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` type through Serve's ingress.
import asyncio
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from datasel_ray.scoring import SampleError, Scorer, ScoringLimits, ValidatedSample

log = logging.getLogger("datasel.serve")

APP_NAME = "datasel"
DEPLOYMENT_NAME = "ScoringService"
DEFAULT_TOKEN_ENV = "DATASEL_SERVE_TOKEN"
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


class ServeOptions(BaseModel):
    """Options of the scoring app (``build_app`` args, ``datasel serve --config`` YAML)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(..., description="Run directory whose stats/ and selections/ the replicas load.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (the reference model runs there).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count when autoscaling_config is not set.")
    autoscaling_config: dict | None = Field(
        None, description="Ray Serve autoscaling, e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica admits at a time.")
    max_batch_size: int = Field(16, ge=1, description="Samples per @serve.batch model pass.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a partial batch waits for more.")
    auth_token: str | None = Field(None, description="Bearer token guarding every route but /healthz.")
    auth_token_env: str | None = Field(
        DEFAULT_TOKEN_ENV, description="Environment variable holding the token (read on the replica).")
    image_roots: list[str] | None = Field(None, description="Folders image paths may name; default: the pool's.")
    max_samples: int = Field(64, ge=1, description="Samples per request.")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)

    def limits(self) -> ScoringLimits:
        return ScoringLimits(max_samples=self.max_samples, max_image_bytes=self.max_image_bytes,
                             max_image_pixels=self.max_image_pixels)

    def token(self) -> str | None:
        """The configured token, else the value of ``auth_token_env`` in this process's environment."""
        if self.auth_token:
            return self.auth_token
        return os.environ.get(self.auth_token_env) or None if self.auth_token_env else None


def error_response(err: SampleError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"error": err.to_dict()})


def score_in_groups(items: list[tuple[Scorer, ValidatedSample]]) -> list:
    """Run each scorer's samples as one pass (a reconfigure may leave two scorers in one batch); input order."""
    results: list[dict | SampleError | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (scorer, _) in enumerate(items):
        groups.setdefault(id(scorer), []).append(i)
    for positions in groups.values():
        scorer = items[positions[0]][0]
        for pos, result in zip(positions, scorer.score_samples([items[p][1] for p in positions])):
            results[pos] = result
    return results


def parse_and_score(scorer: Scorer, payload: Any) -> tuple[list[ValidatedSample], list]:
    """Unbatched path: validate the request body, then one model pass over its samples."""
    samples = scorer.parse(payload)
    return samples, scorer.score_samples(samples)


def parse_and_score_requests(requests: list[tuple[Scorer, Any]], pass_size: int) -> list:
    """Batched path: per request ``(scorer, JSON body)``, its ``(samples, results)`` or the SampleError its body
    raised. The valid requests' samples are scored together (:func:`score_in_groups`) in passes of at most
    ``pass_size`` samples, so a request's answer does not depend on which requests shared its batch."""
    parsed: list[list[ValidatedSample] | SampleError] = []
    for scorer, payload in requests:
        try:
            parsed.append(scorer.parse(payload))
        except SampleError as err:
            parsed.append(err)
    flat = [(scorer, sample) for (scorer, _), samples in zip(requests, parsed) if not isinstance(samples, SampleError)
            for sample in samples]
    scored = [r for lo in range(0, len(flat), pass_size) for r in score_in_groups(flat[lo:lo + pass_size])]
    out, at = [], 0
    for samples in parsed:
        if isinstance(samples, SampleError):
            out.append(samples)
            continue
        out.append((samples, scored[at:at + len(samples)]))
        at += len(samples)
    return out


api = FastAPI(title="datasel-ray scoring", description="Scores visual-instruction samples against a finished run.")


@api.exception_handler(SampleError)
async def _sample_error(_request: Request, err: SampleError) -> JSONResponse:
    return error_response(err)


@api.exception_handler(Exception)
async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error while serving a request")
    return JSONResponse(status_code=500, content={"error": {"status": 500, "field": "", "reason": "internal",
                                                            "message": f"{type(err).__name__}: {err}"}})


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class ScoringService:
    """One replica: a scorer (model + stats loaded once) behind FastAPI, with dynamic batching."""

    def __init__(self, options: dict):
        self.options = ServeOptions.model_validate(options)
        self.scorer = self._load(self.options.run_dir, reuse=None)
        self.reconfigure_error: str | None = None
        # One thread runs all parsing and scoring: a 1-CPU replica gains nothing from several Python threads, and
        # threads competing with the model thread for the GIL delay each torch op's re-acquire.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self.score_batch.set_max_batch_size(self.options.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)

    def _load(self, run_dir: str, reuse: Scorer | None) -> Scorer:
        started = time.monotonic()
        scorer = Scorer(run_dir, image_roots=self.options.image_roots, limits=self.options.limits(), reuse=reuse)
        log.info("loaded run %s from %s in %.1fs", scorer.stats.run_id, run_dir, time.monotonic() - started)
        return scorer

    async def reconfigure(self, user_config: dict) -> None:
        """Serve ``user_config`` ``{"run_dir": ...}``: load that run, then swap the scorer in one assignment.

        A run that fails to load leaves the current scorer serving; the error shows in ``GET /info``.
        """
        run_dir = (user_config or {}).get("run_dir")
        if not run_dir or run_dir == self.scorer.run_dir:
            return
        try:
            new = await asyncio.to_thread(self._load, str(run_dir), self.scorer)
        except Exception as err:  # keep serving the previous run rather than failing the replica
            self.reconfigure_error = f"{run_dir}: {type(err).__name__}: {err}"
            log.exception("reconfigure to %s failed; still serving %s", run_dir, self.scorer.run_dir)
            return
        self.scorer = new
        self.reconfigure_error = None

    # ---- routes
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "run_id": self.scorer.stats.run_id}

    @api.get("/info")
    async def info(self, request: Request) -> dict:
        self._authorize(request)
        return {**self.scorer.info(), "serving": {
            "max_batch_size": self.options.max_batch_size, "batch_wait_timeout_s": self.options.batch_wait_timeout_s,
            "max_body_bytes": self.options.max_body_bytes, "auth": self.options.token() is not None,
            "reconfigure_error": self.reconfigure_error}}

    @api.post("/score")
    async def score(self, request: Request) -> JSONResponse:
        self._authorize(request)
        payload = await self._read_json(request)
        scorer = self.scorer  # one scorer per request, even if a reconfigure swaps it meanwhile
        if self.options.max_batch_size == 1:  # no batching: parse and score in one worker-thread hop
            samples, results = await self._in_worker(parse_and_score, scorer, payload)
        else:
            answer = await self.score_batch((scorer, payload))
            if isinstance(answer, SampleError):
                raise answer
            samples, results = answer
        prefix_list = isinstance(payload, dict) and "samples" in payload
        for sample, result in zip(samples, results):
            if isinstance(result, SampleError):
                raise result.within(f"samples[{sample.index}]" if prefix_list else "")
        # results hold only JSON types: skip FastAPI's jsonable_encoder walk of the nested dicts
        return JSONResponse({"run_id": scorer.stats.run_id, "results": results})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[tuple[Scorer, Any]]) -> list:
        """Dynamic batch across requests (:func:`parse_and_score_requests`); the event loop keeps admitting
        requests meanwhile."""
        return await self._in_worker(parse_and_score_requests, requests, self.options.max_batch_size)

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ---- request plumbing
    def _authorize(self, request: Request) -> None:
        token = self.options.token()
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise SampleError("authorization", "unauthorized",
                              "missing or wrong bearer token (send 'Authorization: Bearer <token>')", status=401)

    async def _read_json(self, request: Request) -> Any:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise SampleError("body", "body_too_large", f"{declared} bytes, more than the limit of {limit}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise SampleError("body", "body_too_large", f"more than the limit of {limit} bytes", 413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise SampleError("body", "invalid_json", f"not UTF-8: {err}", 400) from None
        except json.JSONDecodeError as err:
            raise SampleError("body", "invalid_json", f"malformed JSON: {err}", 400) from None


def build_app(args: dict) -> serve.Application:
    """The scoring app for ``serve run|build|deploy serve.app:build_app run_dir=...`` and KubeRay RayService.

    ``args``: :class:`ServeOptions` fields (``run_dir``, ``num_gpus``, ``max_batch_size``,
    ``batch_wait_timeout_s``, ``autoscaling_config``, ``auth_token_env``, ...). Replicas get ``num_gpus`` and
    ``num_cpus`` as actor resources and ``{"run_dir": run_dir}`` as ``user_config`` (change it to reload).
    """
    options = ServeOptions.model_validate(_coerce_cli_args(args))
    return ScoringService.options(**deployment_options(options)).bind(options.model_dump())


def deployment_options(options: ServeOptions) -> dict[str, Any]:
    """Serve deployment options of the scoring app: replica resources, replicas or autoscaling, user_config."""
    deployment: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": options.num_gpus, "num_cpus": options.num_cpus},
        "max_ongoing_requests": options.max_ongoing_requests,
        "user_config": {"run_dir": options.run_dir},
    }
    if options.autoscaling_config:
        deployment["autoscaling_config"] = options.autoscaling_config
    else:
        deployment["num_replicas"] = options.num_replicas
    return deployment


def _coerce_cli_args(args: dict) -> dict:
    """``serve run serve.app:build_app key=value`` passes strings: parse JSON-looking values (numbers, dicts)."""
    out = {}
    for key, value in dict(args).items():
        if isinstance(value, str) and key not in ("run_dir", "auth_token", "auth_token_env"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def load_options(run_dir: str, config_path: str | None) -> dict:
    """Options for ``datasel serve``: a YAML of ServeOptions fields, or a Serve config file (the args of its
    ``serve.app:build_app`` application); ``run_dir`` from the command line wins."""
    import yaml

    options: dict = {}
    if config_path:
        with open(config_path) as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a mapping of serve options")
        apps = [a for a in loaded.get("applications", []) if a.get("import_path") == "serve.app:build_app"]
        options = dict(apps[0].get("args") or {}) if apps else loaded
    options["run_dir"] = str(run_dir)
    return options


def start_http(host: str = "127.0.0.1", port: int | None = None, attempts: int = 5) -> int:
    """Start Ray Serve's HTTP proxy on ``host:port`` and return the port.

    ``port=None`` picks a free port and retries with another one if the proxy loses the race for it; a given
    port is tried once and a bind failure is raised as ``RuntimeError`` naming the address.
    """
    from datasel_ray.ports import pick_unbound_ports

    for attempt in range(1 if port is not None else attempts):
        chosen = port if port is not None else pick_unbound_ports(1, host)[0]
        try:
            serve.start(http_options={"host": host, "port": chosen})
            return chosen
        except Exception as exc:  # noqa: BLE001 - the proxy's bind error arrives wrapped in a RayTaskError
            serve.shutdown()
            if port is not None or attempt == attempts - 1:
                raise RuntimeError(f"Ray Serve could not listen on {host}:{chosen}: {exc}") from exc
            log.warning("Serve proxy could not bind %s:%d; trying another port", host, chosen)
    raise AssertionError("unreachable")


def enable_direct_ingress() -> None:
    """Turn on Serve's direct ingress for the Ray this process is about to start (see the module docstring).

    Raises ``RuntimeError`` when this process is already connected to Ray: the controller of a running cluster
    read the variable when it started, so setting it now would silently change nothing."""
    import ray

    if ray.is_initialized():
        raise RuntimeError(f"direct ingress must be enabled before Ray starts: set {DIRECT_INGRESS_ENV}=1 in the "
                           f"environment that starts the cluster (ray start, the RayService pods)")
    os.environ[DIRECT_INGRESS_ENV] = "1"


def replica_urls(app_name: str = APP_NAME, details: dict | None = None) -> list[str]:
    """``http://ip:port`` of every running replica of ``app_name`` that listens directly (direct ingress), from
    the controller's instance details (``target_groups``: ``[{"protocol", "app_name", "targets": [{"ip",
    "port"}]}]``); ``details`` is read from the running Serve when not given. Empty without direct ingress."""
    if details is None:
        import ray
        from ray.serve.context import _get_global_client

        details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    # replicas bind the address Serve's http_options name: a specific one (127.0.0.1) is the only one they answer
    # on, whatever node IP the target lists; with all interfaces (0.0.0.0) the node IP is the address to use
    host = (details.get("http_options") or {}).get("host")
    urls = []
    for group in details.get("target_groups") or []:
        if group.get("app_name") != app_name or str(group.get("protocol", "")).upper().split(".")[-1] != "HTTP":
            continue
        urls += [f"http://{t['ip'] if host in (None, '', '0.0.0.0', '::') else host}:{t['port']}"
                 for t in group.get("targets") or []]
    return urls


def wait_for_replica_urls(app_name: str = APP_NAME, timeout_s: float = 60.0) -> list[str]:
    """:func:`replica_urls` once every replica of ``app_name`` has its port; ``RuntimeError`` after
    ``timeout_s`` (direct ingress not enabled where Ray started, or replicas not running)."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = replica_urls(app_name)
        running = serve.status().applications.get(app_name)
        wanted = sum(d.replica_states.get("RUNNING", 0) for d in running.deployments.values()) if running else 0
        if urls and len(urls) >= wanted:
            return urls
        if time.monotonic() > deadline:
            raise RuntimeError(f"no replica of {app_name!r} listens directly after {timeout_s:.0f}s: was "
                               f"{DIRECT_INGRESS_ENV}=1 set where Ray started?")
        time.sleep(0.5)


def serve_locally(run_dir: str, host: str = "127.0.0.1", port: int = 8000, config_path: str | None = None,
                  direct_ingress: bool = False) -> None:
    """Start Ray Serve on ``host:port`` with the scoring app for ``run_dir`` and block until Ctrl-C.

    ``direct_ingress``: replicas also listen on ports of their own (printed), skipping the proxy hop; needs a
    Ray started by this command (not one already running)."""
    from datasel_ray.pipeline import ray_adapter

    app = build_app(load_options(run_dir, config_path))
    if direct_ingress:
        enable_direct_ingress()
    ray_adapter.ensure_ray()
    start_http(host, port)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    print(f"datasel serve: POST http://{host}:{port}/score  (run {run_dir}); Ctrl-C to stop", flush=True)
    if direct_ingress:
        for url in wait_for_replica_urls():
            print(f"datasel serve: replica listening directly: POST {url}/score", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
