"""datasel-ray: distributed scoring and selection of visual-instruction-tuning data on Ray."""

__version__ = "0.1.0"
