"""Layer 11 (experiments): the recipes. `speedup` is the thesis's speed-up run (`lungbench
bench`); each other module is one `lungbench train EXPERIMENT`; `reproduce` runs them all.

What may live here: a recipe's config (its options declared on it, FULL and QUICK sizes),
the run it strings together and the tables it writes. What may not: argparse or print (the
commands own them; tests/test_layers.py checks), or a measuring or training primitive.
"""
