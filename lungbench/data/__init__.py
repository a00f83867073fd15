"""Layer 3 (data): the HDF5 store, generators, readers for the real archives, the cube
geometry, transforms, splits and the production loader (data.loader)."""
