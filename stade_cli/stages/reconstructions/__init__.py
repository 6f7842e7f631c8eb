"""Reconstructions: what tunes a pruned block after its mask and update, one module each, each registering itself
(stage.reconstruction). Definitions: docs/methods.md#reconstruction."""
