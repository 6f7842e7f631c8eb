"""Planning: what a run will need (memory, disk, time) from a model's config alone."""
