"""Data: the HDF5 store, generators, readers for the real archives, transforms and splits."""
