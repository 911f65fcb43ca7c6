"""Pools built from real data sets (LLaVA format, with ground truth as :mod:`datasel_ray.synthetic` writes it)."""
