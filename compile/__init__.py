"""kiln's compile step: bake a PyTorch classifier into a self-describing AOTInductor `.pt2`."""
