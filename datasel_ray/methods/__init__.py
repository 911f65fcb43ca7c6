"""Selection methods: pure numpy functions of feature arrays (no Ray, torch or I/O at import time), and the
method contract and registry (:mod:`datasel_ray.methods.registry`)."""

from datasel_ray.methods.budget import allocate_proportional, largest_remainder, resolve_budget
from datasel_ray.methods.registry import METHOD_REGISTRY, SelectionMethod, get_method, register_method

__all__ = ["METHOD_REGISTRY", "SelectionMethod", "allocate_proportional", "get_method", "largest_remainder",
           "register_method", "resolve_budget"]
