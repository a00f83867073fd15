"""Layer 12 (commands): one module per CLI command; each has `register(subparsers)`. Parsing only: no work here."""
