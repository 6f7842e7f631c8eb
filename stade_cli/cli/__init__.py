"""The `stade` command line: parse, build a config, make one library call, render. The entry point is `main`."""

from stade_cli.cli.app import app, main

__all__ = ["app", "main"]
