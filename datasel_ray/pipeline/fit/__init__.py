"""The selection methods as classes (:class:`~datasel_ray.methods.registry.SelectionMethod`), each run over the
partitions of the feature store (aggregate = ``fit``, select = ``select``) and answering online (``load`` →
``score_new``).

``coincide``, ``datatailor`` and ``tive`` each define the method class (its stats file, column and summary
names), its partition tasks (frozen dataclasses), its driver steps and its frozen online state; ``baselines``
the three baselines; ``context`` the :class:`~datasel_ray.pipeline.fit.context.FitContext` and
:class:`~datasel_ray.pipeline.fit.context.MethodSelection`; ``state`` what the online states share. The maths is
in :mod:`datasel_ray.methods`; these modules only plan partitions, call the kernels on them through
``ctx.executor`` and write and read the results.
"""
