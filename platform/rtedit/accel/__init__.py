"""Speed-ups attached to a model from outside: attention kernels and their probe, DBCache, selective compile,
and TAEF2, the tiny autoencoder."""
