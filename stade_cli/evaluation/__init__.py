"""Evaluation: perplexity and zero-shot accuracy as published, the results artifact, and comparisons of results."""
