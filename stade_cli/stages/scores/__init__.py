"""Scores: one module per pruning score, each registering itself (stage.score); the lowest scores are pruned.
Definitions: docs/methods.md#scores."""
