"""Layer 3 (data): the HDF5 store, generators, readers for the real archives, the cube
geometry, transforms, splits and the production loader (data.loader).

What may live here: what reads, writes, generates or serves samples; the one DataLoader
construction (data.loader.make_loader). What may not: models, training or timing.
"""
