"""Blockwise projectors: reference materialisation, cross-process determinism, dtypes, JL property."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from datasel_ray.features.projector import (
    RademacherProjector,
    SparseJLProjector,
    block_seed,
    make_projector,
)
from numeric import assert_projection_close


def _child_matrix(args):
    kind, grad_dim, proj_dim, seed, block_rows = args
    torch.set_num_threads(1)
    proj = make_projector(kind, grad_dim, proj_dim, seed=seed, block_rows=block_rows)
    return proj.materialize().numpy()


@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_blockwise_equals_materialised_reference(kind):
    torch.manual_seed(0)
    proj = make_projector(kind, grad_dim=1000, proj_dim=64, seed=3, block_rows=128)
    assert proj.num_blocks == 8  # last block is partial (1000 = 7 * 128 + 104)
    x = torch.randn(5, 1000)
    y = proj.project(x)
    assert y.dtype == torch.float32 and y.shape == (5, 64)
    assert_projection_close(y, x, proj.materialize())


def test_rademacher_entries_are_signs_without_scaling():
    R = RademacherProjector(300, 40, seed=0, block_rows=64).materialize()
    assert set(R.unique().tolist()) == {-1.0, 1.0}
    assert abs(R.mean().item()) < 0.05


def test_block_layout_changes_matrix_and_fingerprint():
    a = RademacherProjector(256, 16, seed=0, block_rows=64)
    b = RademacherProjector(256, 16, seed=0, block_rows=128)
    c = RademacherProjector(256, 16, seed=0, model_id=1, block_rows=64)
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() != c.fingerprint()
    assert not torch.equal(a.materialize(), c.materialize())
    assert a.fingerprint()["generator"] == "torch-cpu"
    assert a.fingerprint() == RademacherProjector(256, 16, seed=0, block_rows=64).fingerprint()


# each case spawns a Python process (torch imported again); the second kind runs with the integration tests
@pytest.mark.parametrize("kind", ["rademacher", pytest.param("sparse", marks=pytest.mark.integration)])
def test_same_matrix_in_a_fresh_instance_and_another_process(kind):
    args = (kind, 700, 32, 5, 100)
    here = make_projector(kind, 700, 32, seed=5, block_rows=100).materialize().numpy()
    again = make_projector(kind, 700, 32, seed=5, block_rows=100).materialize().numpy()
    np.testing.assert_array_equal(here, again)
    with mp.get_context("spawn").Pool(1) as pool:
        there = pool.map(_child_matrix, [args])[0]
    np.testing.assert_array_equal(here, there)
    other_seed = make_projector(kind, 700, 32, seed=6, block_rows=100).materialize().numpy()
    assert not np.array_equal(here, other_seed)


def test_block_seed_is_stable():
    assert block_seed(0, 0, 0) == block_seed(0, 0, 0)
    assert len({block_seed(0, 0, b) for b in range(100)}) == 100
    assert block_seed(0, 1, 0) != block_seed(1, 0, 0)
    assert 0 <= block_seed(2**40, 7, 10**6) < 2**63


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    proj = RademacherProjector(512, 32, seed=1, block_rows=100)
    x = torch.randn(3, 512).to(dtype)
    y = proj.project(x)
    assert y.dtype == torch.float32
    assert_projection_close(y, x.float(), proj.materialize())


def test_pieces_equal_flat_input():
    proj = SparseJLProjector(450, 24, seed=2, nnz_per_col=3, block_rows=64)
    x = torch.randn(4, 450)
    pieces = [x[:, :10], x[:, 10:200], x[:, 200:201], x[:, 201:]]
    assert_projection_close(proj.project(pieces), x, proj.materialize())
    dense = RademacherProjector(450, 24, seed=2, block_rows=64)
    assert_projection_close(dense.project(pieces), x, dense.materialize())


def test_sparse_structure_and_jl_norms():
    s, k = 4, 256
    proj = SparseJLProjector(5000, k, seed=0, nnz_per_col=s, block_rows=1024)
    R = proj.materialize()
    nnz = (R != 0).sum(dim=1)
    assert torch.all(nnz == s)  # distinct buckets: one per segment
    assert torch.allclose(R[R != 0].abs(), torch.full_like(R[R != 0], 1 / np.sqrt(s)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5000, generator=gen)
    ratio = proj.project(x).norm(dim=1) / x.norm(dim=1)
    assert abs(ratio.mean().item() - 1.0) < 0.05
    assert (ratio - 1).abs().max().item() < 0.35  # eps ~ O(1/sqrt(k)) for k = 256


def test_rademacher_preserves_norms_up_to_sqrt_k():
    k = 256
    proj = RademacherProjector(3000, k, seed=0)
    x = torch.randn(32, 3000, generator=torch.Generator().manual_seed(1))
    ratio = proj.project(x).norm(dim=1) / (np.sqrt(k) * x.norm(dim=1))
    assert abs(ratio.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_partial_block_ranges_add_up(kind):
    proj = make_projector(kind, 900, 16, seed=4, block_rows=100)
    x = torch.randn(3, 900)
    parts = proj.project(x, blocks=range(0, 4)) + proj.project(x, blocks=range(4, 9))
    assert_projection_close(parts, x, proj.materialize())


def test_bad_input_is_rejected():
    proj = RademacherProjector(100, 8)
    with pytest.raises(ValueError, match="grad_dim = 100"):
        proj.project(torch.randn(2, 99))
    with pytest.raises(ValueError, match="floating-point"):
        proj.project(torch.ones(2, 100, dtype=torch.int64))
    with pytest.raises(ValueError, match="rademacher, sparse"):
        make_projector("gaussian", 10, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_cuda_projector_uses_the_cuda_generator_and_matches_its_matrix(kind):
    proj = make_projector(kind, grad_dim=5000, proj_dim=128, seed=3, block_rows=1024, device="cuda")
    assert proj.fingerprint()["generator"] == "torch-cuda"
    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0))
    y = proj.project(x.half())  # cast to fp32 block by block on the GPU
    assert y.device.type == "cuda" and y.dtype == torch.float32 and y.shape == (4, 128)
    matrix = proj.materialize()
    assert matrix.device.type == "cuda"
    assert_projection_close(y.cpu(), x.half().float(), matrix.cpu())
    again = make_projector(kind, grad_dim=5000, proj_dim=128, seed=3, block_rows=1024, device="cuda")
    assert torch.equal(again.materialize(), matrix)  # same seed and layout: the same matrix
    cpu = make_projector(kind, grad_dim=5000, proj_dim=128, seed=3, block_rows=1024)
    assert cpu.fingerprint() != proj.fingerprint()  # Philox vs mt19937: a run must not mix them
    assert not torch.equal(cpu.materialize(), matrix.cpu())
