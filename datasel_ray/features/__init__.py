"""Pure torch feature kernels: COINCIDE activations, DataTailor spectra, extraction stages, LoRA gradients."""
