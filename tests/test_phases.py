"""The phase list is defined once (config.PHASES); every per-phase table is keyed by it, in its order."""

from datasel_ray.config import PHASES, RunConfig
from datasel_ray.demo import demo_config
from datasel_ray.io.rundir import PHASE_DIRS
from datasel_ray.pipeline.runner import PHASE_FUNCS


def test_every_phase_table_names_the_phases_of_config_in_order():
    assert PHASES == ("ingest", "warmup", "extract", "dedup", "aggregate", "select", "report")
    assert tuple(PHASE_DIRS) == PHASES
    assert tuple(PHASE_FUNCS) == PHASES
    assert RunConfig.model_fields["phases"].default_factory() == list(PHASES)


def test_demo_phases_come_from_the_one_list(tmp_path):
    assert demo_config(tmp_path, tmp_path / "pool", tive=True).phases == list(PHASES)
    assert demo_config(tmp_path, tmp_path / "pool", tive=False).phases == [p for p in PHASES if p != "warmup"]
