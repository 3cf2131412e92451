"""Training helpers above the modules: DyLoRA rank sampling, AdaLoRA budget allocation and orthogonality penalty."""
