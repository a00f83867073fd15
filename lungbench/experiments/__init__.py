"""Experiment recipes on top of the training engine; each module is one `lungbench train EXPERIMENT`."""
