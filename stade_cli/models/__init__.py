"""Model access: loading models, their decoder blocks and prunable layers, reading weights block by block, and
transformers' private internals behind one adapter."""
