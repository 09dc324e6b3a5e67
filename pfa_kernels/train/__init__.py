"""Training with PFA and baseline rules: `python -m pfa_kernels.train --help` (recipes in configs/)."""
