import pytest

from datasel_ray.config import SelectConfig
from datasel_ray.methods.registry import (METHOD_REGISTRY, SelectionMethod, get_method, method_names,
                                          register_method, registry, scored_methods)


def test_registry_lists_the_method_classes():
    assert method_names() == ("coincide", "datatailor", "tive", "random", "random_per_task", "answer_loss")
    assert scored_methods() == ("coincide", "datatailor", "tive")
    assert get_method("coincide").columns == ("coincide_vector", "last_token")
    assert get_method("datatailor").columns == ("last_token", "informativeness", "tau", "n_turns")
    assert get_method("random").columns == ()
    for name, cls in registry().items():
        assert issubclass(cls, SelectionMethod) and cls.name == name
        assert cls.select is not SelectionMethod.select, name
        assert (cls.fit is not SelectionMethod.fit) == cls.fits, name
        assert (cls.load.__func__ is not SelectionMethod.load.__func__) == cls.scored, name
    assert set(METHOD_REGISTRY) == set(method_names())


def test_unknown_method_message():
    with pytest.raises(ValueError) as err:
        get_method("coincid")
    assert str(err.value) == ("Unknown method 'coincid'. Choose from: answer_loss, coincide, datatailor, random, "
                              "random_per_task, tive")
    with pytest.raises(ValueError, match="Unknown method 'coincid'"):
        SelectConfig(methods=["coincid"])


def test_register_refuses_non_methods_and_taken_names():
    class NotAMethod:
        name = "x"

    with pytest.raises(ValueError, match="not a SelectionMethod subclass"):
        register_method(NotAMethod)

    class Nameless(SelectionMethod):
        description = "no name"

    with pytest.raises(ValueError, match=r"Nameless.name must be a non-empty string"):
        register_method(Nameless)

    class Impostor(SelectionMethod):
        name = "coincide"
        description = "another coincide"

    with pytest.raises(ValueError, match="the name 'coincide' is taken by datasel_ray.pipeline.fit.coincide.Coincide"):
        register_method(Impostor)

    class BadColumns(SelectionMethod):
        name = "bad_columns"
        description = "columns as a list"
        columns = ["tau"]

    with pytest.raises(ValueError, match="columns must be a tuple"):
        register_method(BadColumns)
    assert "bad_columns" not in method_names()
