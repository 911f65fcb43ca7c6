"""The batched serving path without a server: a batch of request bodies is parsed per request, the valid
requests' samples are scored in passes of bounded size, and each request gets back its own answer."""

from __future__ import annotations

from datasel_ray.scoring import SampleError
from serve.app import parse_and_score_requests


class FakeScorer:
    """parse: a body {"samples": [ints]} becomes its ints, a negative int is a bad sample; score: x -> 10 x."""

    def __init__(self, name: str):
        self.name, self.passes = name, []

    def parse(self, payload):
        values = payload["samples"]
        for i, v in enumerate(values):
            if v < 0:
                raise SampleError("conversations", "bad", f"negative value {v}").within(f"samples[{i}]")
        return list(values)

    def score_samples(self, samples):
        self.passes.append(list(samples))
        return [{"scorer": self.name, "score": 10 * s} for s in samples]


def test_each_request_gets_its_own_results_and_parse_errors_stay_with_their_request():
    a, b = FakeScorer("a"), FakeScorer("b")
    requests = [(a, {"samples": [1, 2]}), (a, {"samples": [3, -1]}), (b, {"samples": [4]}), (a, {"samples": [5]})]
    out = parse_and_score_requests(requests, pass_size=2)
    assert out[0] == ([1, 2], [{"scorer": "a", "score": 10}, {"scorer": "a", "score": 20}])
    assert isinstance(out[1], SampleError) and out[1].field == "samples[1].conversations"
    assert out[2] == ([4], [{"scorer": "b", "score": 40}])
    assert out[3] == ([5], [{"scorer": "a", "score": 50}])
    # passes of at most pass_size samples over the valid requests, in request order; one scorer per pass group
    assert a.passes == [[1, 2], [5]] and b.passes == [[4]]


def test_a_batch_of_only_bad_requests_scores_nothing():
    a = FakeScorer("a")
    out = parse_and_score_requests([(a, {"samples": [-2]})], pass_size=16)
    assert isinstance(out[0], SampleError) and a.passes == []
