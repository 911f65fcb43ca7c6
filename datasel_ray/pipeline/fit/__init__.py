"""Each selection method run over the partitions of the feature store (aggregate = ``fit``, select = ``select``).

Every module here is named after its method in :data:`datasel_ray.methods.registry.METHOD_REGISTRY` and defines
``fit(ctx) -> dict`` (budget-independent statistics into ``stats/<method>/``) and ``select(ctx, budget) ->
MethodSelection``. The maths is in :mod:`datasel_ray.methods`; these modules only plan partitions, call the
kernels on them through ``ctx.executor`` and write the results. See :mod:`datasel_ray.pipeline.fit.context`.
"""
