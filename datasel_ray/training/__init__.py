"""Model training used by the pipeline (pure torch/peft, no Ray): the TIVE/LESS LoRA warm-up."""
