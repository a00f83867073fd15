"""Layer 11 (experiments): the recipes. `speedup` is the thesis's speed-up run (`lungbench
bench`); each other module is one `lungbench train EXPERIMENT`."""
