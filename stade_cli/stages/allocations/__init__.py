"""Allocations: how the requested sparsity is spread over the decoder blocks, one module per allocation, each
registering itself (stage.allocation). Definitions: docs/methods.md#allocations."""
