"""The driver: the one block loop that runs calibrate and prune over a model's blocks, where the blocks come from
and where the pruned checkpoints go."""
