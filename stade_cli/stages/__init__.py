"""Stages: the pruning maths. Scores, updates, allocations and reconstructions, each a module that registers
itself; the presets that combine them; and PruneConfig, one run's choice of stages."""
