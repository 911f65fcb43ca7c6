import importlib

import pytest

from datasel_ray.config import METHODS
from datasel_ray.methods.registry import METHOD_REGISTRY, get_method


def test_registry_covers_config_methods():
    assert set(METHOD_REGISTRY) == set(METHODS)
    assert get_method("coincide").columns == ("coincide_vector",)
    assert get_method("datatailor").columns == ("last_token", "informativeness", "tau", "n_turns", "task")
    assert get_method("random").columns == ()
    for name, spec in METHOD_REGISTRY.items():
        if name != "tive":
            importlib.import_module(spec.module)


def test_unknown_method_message():
    with pytest.raises(ValueError) as err:
        get_method("coincid")
    assert str(err.value) == ("Unknown method 'coincid'. Choose from: answer_loss, coincide, datatailor, random, "
                              "random_per_task, tive")
