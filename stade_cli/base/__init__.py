"""Base: what every layer shares and nothing of stade's own: errors, files and atomic writes, the registry, the
artifact schemas, consoles. Imports no other layer."""
