"""stade: post-training pruning of Hugging Face causal language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stade")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
