"""Random projections of flattened gradients, generated blockwise from a seed (JL sketches).

Used to compress per-sample LoRA gradients (grad_dim up to 134,217,728 for a 7B r128 q/k/v/o LoRA) to
``proj_dim`` (TIVE/LESS default 8192) before storage. TIVE and LESS call TRAK's ``CudaProjector`` (or
``BasicProjector``) with a Rademacher matrix, ``seed=0``, ``model_id=0`` and no ``1/sqrt(k)`` scaling.

Both projectors here never hold the full matrix. The input dimension is cut into blocks of ``block_rows``
rows; block ``b`` of the matrix is regenerated on the fly from ``(seed, model_id, b)`` with a fresh
``torch.Generator`` on the projector's device. So:

- memory is ``O(block_rows * proj_dim)`` (TRAK's ``BasicProjector`` holds ``grad_dim x 128`` column blocks,
  68 GB at grad_dim 2^27 in fp32, which is why LESS users run out of memory without ``fast_jl``);
- every actor/process that builds a projector with the same arguments on the same device kind gets the same
  matrix, with no state to ship;
- ``model_id`` (e.g. a checkpoint id) is folded into the seed, TRAK-style. LESS uses the same matrix for every
  checkpoint (``model_id=0``); keep it 0 unless the sides of a comparison are projected separately anyway.

⚠ The CPU (mt19937) and CUDA (Philox) generators produce *different* matrices for the same seed, as TRAK's
Basic and Cuda projectors do; :meth:`fingerprint` records the device kind and the block layout so that a
feature store refuses to mix vectors from different matrices. Matrices are also not TRAK's own: a datastore
built by TRAK is not comparable with one built here.

Variants:

- :class:`RademacherProjector` (default, reference): dense ``R ∈ {-1, +1}^{grad_dim x proj_dim}``,
  ``y = x @ R`` with no scaling, so ``E||y||^2 = proj_dim ||x||^2`` (TRAK convention). Cosines and rankings,
  the only things TIVE/LESS use, are scale free. Cost ``O(grad_dim * proj_dim)`` per batch, dominated by
  generating R: a GPU path. Measured on 2 CPUs (``benchmarks/bench_gradients.py``): 0.155 s per 4096 x 8192
  block, i.e. ~84 min to project a batch of 2 gradients of 2^27 entries, at 160 MB peak working memory.
- :class:`SparseJLProjector` (switch ``projection="sparse"``): a block sparse JL transform (Kane-Nelson
  SJLT): the output is cut into ``s`` contiguous segments and input coordinate ``i`` goes to one random bucket
  in each segment with a random sign and weight ``1/sqrt(s)``, so ``E||y||^2 = ||x||^2``. Cost
  ``O(grad_dim * s)`` per sample via ``index_add_``; 19 s for the same batch (s = 4, ~260x faster, 96 MB
  peak). Not comparable with Rademacher vectors.

Inputs may be fp32/fp16/bf16 (any device); each block is cast to fp32 on the projector's device, so no fp32
copy of a whole fp16 gradient is made. Outputs are fp32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

ProjectionKind = Literal["rademacher", "sparse"]

# Entries per generated dense block (2^25 fp32 = 128 MiB); with the uint8 bit buffer and the input slice the
# projector's working set stays well under 2 GB at proj_dim 8192.
_DENSE_BLOCK_ENTRIES = 1 << 25
# Largest matrix that materialize() builds (reference/tests only).
_MAX_MATERIALIZE_ENTRIES = 1 << 28

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def block_seed(seed: int, model_id: int, block: int) -> int:
    """63-bit torch seed of matrix block ``block``, hashed from (seed, model_id, block).

    Uses ``numpy.random.SeedSequence`` so it is the same in every process and on every platform.
    """
    state = np.random.SeedSequence([int(seed), int(model_id), int(block)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class _BlockProjector(ABC):
    """Common block layout: rows ``[b * block_rows, min((b + 1) * block_rows, grad_dim))`` form block ``b``."""

    kind: str = ""

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int = 0,
        model_id: int = 0,
        block_rows: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if grad_dim < 1 or proj_dim < 1:
            raise ValueError(f"grad_dim and proj_dim must be >= 1, got {grad_dim}, {proj_dim}")
        self.grad_dim = int(grad_dim)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.model_id = int(model_id)
        self.device = torch.device(device)
        self.block_rows = int(block_rows or self._default_block_rows())
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        self.num_blocks = math.ceil(self.grad_dim / self.block_rows)

    @abstractmethod
    def _default_block_rows(self) -> int:
        """Block height used when ``block_rows`` is not given."""

    # -- matrix blocks -------------------------------------------------------------------------------------
    def block_bounds(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.grad_dim)

    def _generator(self, block: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(block_seed(self.seed, self.model_id, block))
        return gen

    @abstractmethod
    def block_matrix(self, block: int) -> torch.Tensor:
        """Dense fp32 ``[rows_b, proj_dim]`` block ``b`` of the projection matrix, on ``self.device``."""

    def materialize(self) -> torch.Tensor:
        """The full fp32 ``[grad_dim, proj_dim]`` matrix from the same block generator (small sizes only)."""
        if self.grad_dim * self.proj_dim > _MAX_MATERIALIZE_ENTRIES:
            raise ValueError(f"refusing to materialise a {self.grad_dim} x {self.proj_dim} matrix")
        return torch.cat([self.block_matrix(b) for b in range(self.num_blocks)], dim=0)

    # -- projection ----------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor | Sequence[torch.Tensor], blocks: range | None = None) -> torch.Tensor:
        """Project ``x`` ([B, grad_dim], fp32/fp16/bf16) to fp32 ``[B, proj_dim]`` on ``self.device``.

        ``x`` may also be a sequence of ``[B, n_p]`` pieces (e.g. one per parameter, in flattening order) whose
        concatenation along dim 1 is the gradient; the flat gradient is then never built.
        ``blocks`` restricts the sum to those matrix blocks (a partial projection: partial results over
        disjoint block ranges add up to the full one, so workers can split a projection; benchmarks time a
        slice). Default: all blocks.
        """
        pieces = [x] if isinstance(x, torch.Tensor) else list(x)
        if not pieces or any(p.ndim != 2 for p in pieces):
            raise ValueError("project() expects a [B, grad_dim] tensor or a sequence of [B, n] tensors")
        batch = pieces[0].shape[0]
        if any(p.shape[0] != batch for p in pieces):
            raise ValueError("all pieces must have the same batch size")
        width = sum(p.shape[1] for p in pieces)
        if width != self.grad_dim:
            raise ValueError(f"input has {width} columns, the projector expects grad_dim = {self.grad_dim}")
        for p in pieces:
            if not p.is_floating_point():
                raise ValueError(f"project() expects a floating-point input, got {p.dtype}")
        out = torch.zeros(batch, self.proj_dim, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            wanted = range(self.num_blocks) if blocks is None else blocks
            for block, chunk in enumerate(_column_blocks(pieces, self.block_rows)):
                if block >= wanted.stop:
                    break
                if block in wanted:
                    self._accumulate(out, chunk.to(device=self.device, dtype=torch.float32), block)
        return out

    __call__ = project

    def _accumulate(self, out: torch.Tensor, chunk: torch.Tensor, block: int) -> None:
        out.add_(chunk @ self.block_matrix(block))

    def fingerprint(self) -> dict:
        """Everything that determines the matrix; equal fingerprints <=> equal matrices."""
        return {
            "kind": self.kind,
            "grad_dim": self.grad_dim,
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "model_id": self.model_id,
            "block_rows": self.block_rows,
            "generator": f"torch-{self.device.type}",
            "torch": torch.__version__.split("+")[0],
            **self._extra_fingerprint(),
        }

    def _extra_fingerprint(self) -> dict:
        return {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.fingerprint().items())
        return f"{type(self).__name__}({fields})"


class RademacherProjector(_BlockProjector):
    """Dense Rademacher projection ``y = x @ R``, ``R ∈ {-1, +1}^{grad_dim x proj_dim}``, no scaling (TRAK).

    Args:
        grad_dim: input dimension D.
        proj_dim: output dimension k.
        seed: matrix seed (TIVE/LESS: 0).
        model_id: folded into the seed (checkpoint id; TIVE/LESS: 0).
        block_rows: rows of R generated at a time; default ``2^25 // proj_dim`` (128 MiB of fp32).
        device: where R is generated and the product computed; a CUDA device uses a CUDA generator.
    """

    kind = "rademacher"

    def _default_block_rows(self) -> int:
        return max(1, _DENSE_BLOCK_ENTRIES // self.proj_dim)

    def block_matrix(self, block: int) -> torch.Tensor:
        start, stop = self.block_bounds(block)
        rows, cols = stop - start, self.proj_dim
        # one random byte gives 8 signs: ~1.6x faster than one draw per entry on CPU
        n_bytes = rows * math.ceil(cols / 8)
        raw = torch.randint(0, 256, (n_bytes,), generator=self._generator(block), dtype=torch.uint8,
                            device=self.device)
        bits = (raw.unsqueeze(-1) >> _BIT_SHIFTS.to(self.device)) & 1
        signs = bits.reshape(rows, -1)[:, :cols].to(torch.float32)
        return signs.mul_(2.0).sub_(1.0)


class SparseJLProjector(_BlockProjector):
    """Block sparse JL transform (SJLT): ``s`` non-zeros ``±1/sqrt(s)`` per input coordinate.

    The k outputs are split into ``s`` contiguous segments (sizes differ by at most 1); coordinate ``i`` is
    hashed to one bucket per segment, so its ``s`` buckets are distinct. ``E||y||^2 = ||x||^2``.

    Args:
        grad_dim, proj_dim, seed, model_id, device: as :class:`RademacherProjector`.
        nnz_per_col: s, non-zeros per input coordinate (a column of Rᵀ); 1 <= s <= proj_dim. Default 4.
        block_rows: input coordinates hashed at a time; default ``2^22 // s``.
    """

    kind = "sparse"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, model_id: int = 0, nnz_per_col: int = 4,
                 block_rows: int | None = None, device: str | torch.device = "cpu") -> None:
        if not 1 <= nnz_per_col <= proj_dim:
            raise ValueError(f"nnz_per_col must be in [1, proj_dim={proj_dim}], got {nnz_per_col}")
        self.nnz_per_col = int(nnz_per_col)
        super().__init__(grad_dim, proj_dim, seed=seed, model_id=model_id, block_rows=block_rows, device=device)
        bounds = np.linspace(0, self.proj_dim, self.nnz_per_col + 1).round().astype(np.int64)
        self._seg_start = torch.tensor(bounds[:-1], device=self.device)
        self._seg_size = torch.tensor(np.diff(bounds), dtype=torch.float64, device=self.device)

    def _default_block_rows(self) -> int:
        return max(1, (1 << 22) // self.nnz_per_col)

    def _extra_fingerprint(self) -> dict:
        return {"nnz_per_col": self.nnz_per_col}

    def block_hash(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets int64 ``[rows_b, s]`` and weights fp32 ``[rows_b, s]`` (``±1/sqrt(s)``) of block ``b``."""
        start, stop = self.block_bounds(block)
        rows, s = stop - start, self.nnz_per_col
        gen = self._generator(block)
        u = torch.rand(rows, s, generator=gen, dtype=torch.float64, device=self.device)
        buckets = self._seg_start + torch.floor(u * self._seg_size).to(torch.int64)
        buckets = torch.minimum(buckets, self._seg_start + self._seg_size.to(torch.int64) - 1)
        signs = torch.randint(0, 2, (rows, s), generator=gen, device=self.device).to(torch.float32)
        return buckets, signs.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(s))

    def block_matrix(self, block: int) -> torch.Tensor:
        buckets, weights = self.block_hash(block)
        dense = torch.zeros(buckets.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        return dense.scatter_(1, buckets, weights)

    def _accumulate(self, out: torch.Tensor, chunk: torch.Tensor, block: int) -> None:
        buckets, weights = self.block_hash(block)
        contrib = chunk.unsqueeze(-1) * weights  # [B, rows, s]
        out.index_add_(1, buckets.reshape(-1), contrib.reshape(chunk.shape[0], -1))


def make_projector(
    kind: ProjectionKind,
    grad_dim: int,
    proj_dim: int,
    seed: int = 0,
    model_id: int = 0,
    device: str | torch.device = "cpu",
    block_rows: int | None = None,
    nnz_per_col: int = 4,
) -> _BlockProjector:
    """Build the projector named by ``TiveConfig.projection`` (``"rademacher"`` or ``"sparse"``)."""
    if kind == "rademacher":
        return RademacherProjector(grad_dim, proj_dim, seed, model_id, block_rows=block_rows, device=device)
    if kind == "sparse":
        return SparseJLProjector(grad_dim, proj_dim, seed, model_id, nnz_per_col=nnz_per_col,
                                 block_rows=block_rows, device=device)
    raise ValueError(f"Unknown projection '{kind}'. Choose from: rademacher, sparse")


def _column_blocks(pieces: list[torch.Tensor], block_rows: int):
    """Yield consecutive ``[B, <=block_rows]`` column slices of ``cat(pieces, dim=1)`` without building it."""
    pending: list[torch.Tensor] = []
    have = 0
    for piece in pieces:
        pos = 0
        while pos < piece.shape[1]:
            take = min(block_rows - have, piece.shape[1] - pos)
            pending.append(piece[:, pos:pos + take])
            have += take
            pos += take
            if have == block_rows:
                yield pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)
                pending, have = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)
