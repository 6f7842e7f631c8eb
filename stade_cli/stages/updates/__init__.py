"""Updates: what happens to a layer's weights (and bias) once its mask is chosen, one module per update, each
registering itself (stage.update). An update gets the original float32 weights of layers that share one input
(q/k/v, gate/up: one LayerStats) and their masks (True where pruned), or None where it chooses the masks itself.
Definitions: docs/methods.md#updates."""
