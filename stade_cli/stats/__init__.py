"""Statistics: accumulators of each layer's inputs, the one collector loop over a block, the statistics artifact,
its shards, merge and resume."""
