"""Layer 1 (core), the ground: errors, device helpers, run folders, safe paths, the environment record."""
