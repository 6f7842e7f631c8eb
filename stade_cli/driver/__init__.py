"""The driver: calibrate, and prune's one block loop with where the pruned checkpoints go; both run each block
through the one collector loop (stats/collect.py)."""
