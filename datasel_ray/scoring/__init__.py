"""Online scoring of new samples against the frozen state of a finished run (DESIGN.md, ``serve``).

* :mod:`~datasel_ray.scoring.request`: request validation (:class:`SampleParser`, :class:`SampleError`);
* :mod:`~datasel_ray.scoring.state`: the frozen per-method state and what each answer means;
* :mod:`~datasel_ray.scoring.scorer`: :class:`Scorer` (model + state), used by ``serve/app.py``.
"""

from datasel_ray.scoring.request import SampleError, SampleParser, ScoringLimits, ValidatedSample
from datasel_ray.scoring.scorer import Scorer, score_pool_samples
from datasel_ray.scoring.state import MemberCache, RunStats

__all__ = ["MemberCache", "RunStats", "SampleError", "SampleParser", "Scorer", "ScoringLimits", "ValidatedSample",
           "score_pool_samples"]
