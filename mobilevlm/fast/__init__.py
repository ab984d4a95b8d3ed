"""Fast CPU inference: int8 / group-wise int4 linears on torch's own kernels, a lean static-cache
decoder, offline quantized checkpoints, and `FastPipeline` (the `Pipeline` API on top of them)."""
