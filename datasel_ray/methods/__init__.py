"""Selection methods: pure numpy functions of feature arrays (no Ray, torch or I/O at import time)."""

from datasel_ray.methods.budget import allocate_proportional, largest_remainder, resolve_budget
from datasel_ray.methods.registry import METHOD_REGISTRY, MethodSpec, get_method

__all__ = ["METHOD_REGISTRY", "MethodSpec", "allocate_proportional", "get_method", "largest_remainder",
           "resolve_budget"]
