"""Near-duplicate removal on the feature store: an exact pass (:mod:`.exact`) and a partitioned semantic pass
(:mod:`.semantic`, SemDeDup / NeMo Curator's rule). Pure numpy + faiss; the phase is
:mod:`datasel_ray.pipeline.dedup`."""
