"""The scoring app on a real local Ray Serve (127.0.0.1, a free port): served == batch scores, 4xx for bad
input naming the field, bearer token, /healthz, /info, reconfigure to another run without dropping requests."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading

import httpx
import pytest
from PIL import Image

TOKEN = "test-token-123"
LIMITS = {"max_samples": 8, "max_image_bytes": 200_000, "max_image_pixels": 256 * 256, "max_body_bytes": 1_000_000}
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# A real Ray Serve (HTTP proxy and replica processes); the scorer these requests reach is tested in process by
# tests/scoring/test_scorer.py and the batching by tests/serve/test_batching.py.
pytestmark = pytest.mark.integration


def png_base64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def runs(demo_run, tmp_path_factory):
    """(first run dir, second run dir): the second is a copy with its own run id."""
    cfg, _ = demo_run
    second = tmp_path_factory.mktemp("second") / "run"
    shutil.copytree(cfg.run_dir, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["run_id"] = "second-run"
    (second / "manifest.json").write_text(json.dumps(manifest))
    return cfg.run_dir, str(second)


@pytest.fixture(scope="module")
def options(runs):
    return {"run_dir": runs[0], "auth_token": TOKEN, "max_batch_size": 8, "num_cpus": 1, **LIMITS}


@pytest.fixture(scope="module")
def server(ray_local, options):
    from ray import serve

    from serve.app import build_app, start_http

    port = start_http("127.0.0.1")
    serve.run(build_app(options), name="datasel-test", route_prefix="/", blocking=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    yield client
    client.close()
    serve.shutdown()


def test_healthz_needs_no_token(server):
    r = server.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_info(server, runs):
    r = server.get("/info", headers=AUTH)
    assert r.status_code == 200
    info = r.json()
    assert info["run_dir"] == runs[0] and info["model"] == "tiny"
    assert set(info["methods"]) == {"coincide", "datatailor"}
    assert info["budgets"]["coincide"] > 0 and "ray" in info["versions"]["run"]
    assert info["serving"]["auth"] is True and info["serving"]["max_batch_size"] == 8


@pytest.mark.parametrize("route", ["/info", "/score"])
def test_token_required(server, route, records):
    call = server.get if route == "/info" else (lambda path, **kw: server.post(path, json=records[0], **kw))
    missing = call(route)
    wrong = call(route, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["field"] == "authorization"
    assert call(route, headers=AUTH).status_code == 200


def test_served_scores_equal_batch_scores(server, records, options):
    from datasel_ray.scoring import Scorer, ScoringLimits

    limits = ScoringLimits(**{k: v for k, v in LIMITS.items() if k != "max_body_bytes"})
    direct = Scorer(options["run_dir"], limits=limits).score_records(records)
    r = server.post("/score", json={"samples": records}, headers=AUTH)
    assert r.status_code == 200, r.text
    served = r.json()["results"]
    assert len(served) == len(records)
    for a, b in zip(served, direct):
        assert a["task"] == b["task"] and a["id"] == b["id"]
        assert a["coincide"]["cluster"] == b["coincide"]["cluster"]
        assert a["datatailor"]["cluster"] == b["datatailor"]["cluster"]
        for method in ("coincide", "datatailor"):
            for key, value in b[method].items():
                if isinstance(value, float):
                    assert a[method][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (method, key)
                elif key == "centrality_rank":  # a rank among near-equal distances may move by one
                    assert abs(a[method][key] - value) <= 1, (method, key)
                else:
                    assert a[method][key] == value, (method, key)


def test_single_sample_body(server, records):
    r = server.post("/score", json=records[0], headers=AUTH)
    assert r.status_code == 200
    result = r.json()["results"][0]
    assert result["task"] and "would_select" in result["coincide"] and "score_percentile" in result["datatailor"]


def test_base64_image_with_task(server, records):
    image_record = next(r for r in records if r.get("image"))
    sample = {"id": "b64", "task": "caption", "image_base64": png_base64((32, 32)),
              "conversations": image_record["conversations"]}
    r = server.post("/score", json={"samples": [sample]}, headers=AUTH)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["task"] == "caption" and result["task_source"] == "given"
    assert result["features"]["n_image_tokens"] > 0


def test_messages_row_gets_the_same_answer_as_its_llava_form(server, records):
    record = next((r for r in records if r.get("image")), records[0])
    chat = {"id": record.get("id"), "images": [record["image"]] if record.get("image") else [],
            "messages": [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                         for t in record["conversations"]]}
    r = server.post("/score", json={"samples": [record, chat]}, headers=AUTH)
    assert r.status_code == 200, r.text
    llava, messages = r.json()["results"]
    assert messages["task"] == llava["task"]
    assert messages["features"] == llava["features"]
    assert messages["coincide"]["cluster"] == llava["coincide"]["cluster"]
    assert messages["datatailor"]["score"] == pytest.approx(llava["datatailor"]["score"], rel=1e-4, abs=1e-4)


def _bad_requests(records):
    convs = records[0]["conversations"]
    return [
        # (name, body bytes or json, status, field named in the message)
        ("malformed_json", b'{"samples": [', 400, "body"),
        ("body_not_object", [1, 2], 422, "body"),
        ("samples_not_list", {"samples": "x"}, 422, "samples"),
        ("missing_conversations", {"samples": [{"id": "a"}]}, 422, "samples[0].conversations"),
        ("conversations_wrong_type", {"samples": [{"conversations": "hi"}]}, 422, "samples[0].conversations"),
        ("no_assistant_turn", {"samples": [{"conversations": [{"from": "human", "value": "hi"}]}]}, 422,
         "samples[0].conversations"),
        ("empty_turn", {"samples": [{"conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "gpt", "value": "  "}]}]}, 422,
         "samples[0].conversations[1].value"),
        ("unknown_role", {"samples": [{"conversations": [{"from": "robot", "value": "hi"}] + convs}]}, 422,
         "samples[0].conversations[0].from"),
        ("task_wrong_type", {"samples": [{"task": 3, "conversations": convs}]}, 422, "samples[0].task"),
        ("unknown_task", {"samples": [{"task": "no-such-task", "conversations": convs}]}, 422, "samples[0].task"),
        ("undecodable_base64", {"samples": [{"task": "caption", "image_base64": "%%%not-base64%%%",
                                             "conversations": convs}]}, 422, "samples[0].image_base64"),
        ("not_an_image", {"samples": [{"task": "caption", "image_base64": base64.b64encode(b"hello").decode(),
                                       "conversations": convs}]}, 422, "samples[0].image_base64"),
        ("oversized_image", {"samples": [{"task": "caption", "image_base64": png_base64((300, 300)),
                                          "conversations": convs}]}, 413, "samples[0].image_base64"),
        ("base64_without_task", {"samples": [{"image_base64": png_base64((8, 8)), "conversations": convs}]}, 422,
         "samples[0].task"),
        ("path_outside_roots", {"samples": [{"image": "../../../etc/passwd", "conversations": convs}]}, 403,
         "samples[0].image"),
        ("absolute_path_outside_roots", {"samples": [{"image": "/etc/hostname", "conversations": convs}]}, 403,
         "samples[0].image"),
        ("missing_image_file", {"samples": [{"image": "coco/does-not-exist.png", "conversations": convs}]}, 422,
         "samples[0].image"),
        ("too_many_samples", {"samples": [records[0]] * 9}, 413, "samples"),
        ("oversized_body", {"samples": [{"conversations": convs, "pad": "x" * 1_100_000}]}, 413, "body"),
        ("second_sample_bad", {"samples": [records[0], {"conversations": [{"from": "gpt"}]}]}, 422,
         "samples[1].conversations[0].value"),
        ("placeholder_mismatch", {"samples": [{"image": ["coco/a.png", "coco/b.png"], "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]}, 422, "samples[0].conversations"),
        ("video", {"samples": [{"video": "clip.mp4", "conversations": convs}]}, 422, "samples[0].video"),
        ("messages_bad_part", {"samples": [{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}]}, 422,
         "samples[0].messages[0].content[0]"),
    ]


def test_bad_requests_get_4xx_naming_the_field(server, records):
    cases = _bad_requests(records)
    assert len(cases) >= 10
    for name, body, status, field in cases:
        if isinstance(body, bytes):
            r = server.post("/score", content=body, headers={**AUTH, "Content-Type": "application/json"})
        else:
            r = server.post("/score", json=body, headers=AUTH)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["field"] == field, (name, error)
        assert error["message"].startswith(field), (name, error)
    assert server.get("/healthz").status_code == 200  # the replica survived all of it


def test_reconfigure_swaps_run_without_dropping_requests(server, runs, options, records):
    from ray import serve

    from serve.app import ScoringService, ServeOptions, deployment_options

    opts = ServeOptions.model_validate(options)
    statuses: list[int] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            statuses.append(server.post("/score", json={"samples": records[:2]}, headers=AUTH).status_code)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        app = ScoringService.options(**{**deployment_options(opts), "user_config": {"run_dir": runs[1]}}).bind(
            opts.model_dump())
        serve.run(app, name="datasel-test", route_prefix="/", blocking=False)
        info = server.get("/info", headers=AUTH).json()
    finally:
        stop.set()
        worker.join()
    assert info["run_id"] == "second-run" and info["run_dir"] == runs[1]
    assert info["serving"]["reconfigure_error"] is None
    assert statuses and set(statuses) == {200}
    r = server.post("/score", json={"samples": records[:1]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["run_id"] == "second-run"


def test_unbatched_replica_scores_and_refuses_like_the_batched_one(server, runs, options, records):
    """max_batch_size=1 takes the one-hop path (parse + score in one thread): same scores, same 4xx."""
    from ray import serve

    from datasel_ray.scoring import Scorer, ScoringLimits
    from serve.app import build_app

    serve.run(build_app({**options, "max_batch_size": 1}), name="datasel-test", route_prefix="/", blocking=False)
    assert server.get("/info", headers=AUTH).json()["serving"]["max_batch_size"] == 1
    limits = ScoringLimits(**{k: v for k, v in LIMITS.items() if k != "max_body_bytes"})
    direct = Scorer(options["run_dir"], limits=limits).score_records(records[:3])
    r = server.post("/score", json={"samples": records[:3]}, headers=AUTH)
    assert r.status_code == 200, r.text
    for a, b in zip(r.json()["results"], direct):
        assert a["id"] == b["id"] and a["coincide"]["cluster"] == b["coincide"]["cluster"]
        assert a["datatailor"]["score"] == pytest.approx(b["datatailor"]["score"], rel=1e-4, abs=1e-4)
    for name, body, status, field in _bad_requests(records):
        if name in ("second_sample_bad", "unknown_task", "path_outside_roots"):
            bad = server.post("/score", json=body, headers=AUTH)
            assert bad.status_code == status and bad.json()["error"]["field"] == field, (name, bad.text)
