"""Value types and data: model specs, the accelerator catalog, run settings. Depends on nothing else."""
