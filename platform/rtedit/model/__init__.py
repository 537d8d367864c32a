"""The model side of a frame: token packing and position ids, the transformer's inputs, the sampler's schedule."""
