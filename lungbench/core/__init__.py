"""Layer 1 (core), the ground: errors, device helpers, run folders, safe paths, the environment record,
option declarations, caches, locks and the C allocator.

What may live here: what every room needs and that needs nothing of lungbench (torch only
where a device is named). What may not: data, models, measuring, or anything that prints.
"""
