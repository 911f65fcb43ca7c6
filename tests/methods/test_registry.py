import importlib

import pytest

from datasel_ray.config import METHODS
from datasel_ray.methods.registry import METHOD_REGISTRY, get_method


def test_registry_covers_config_methods():
    assert set(METHOD_REGISTRY) == set(METHODS)
    assert get_method("coincide").columns == ("coincide_vector", "last_token")
    assert get_method("datatailor").columns == ("last_token", "informativeness", "tau", "n_turns")
    assert get_method("random").columns == ()
    for spec in METHOD_REGISTRY.values():
        module = importlib.import_module(spec.pipeline)
        assert callable(module.fit) and (callable(getattr(module, "select", None)) or spec.name in
                                         ("random", "random_per_task", "answer_loss"))


def test_unknown_method_message():
    with pytest.raises(ValueError) as err:
        get_method("coincid")
    assert str(err.value) == ("Unknown method 'coincid'. Choose from: answer_loss, coincide, datatailor, random, "
                              "random_per_task, tive")
