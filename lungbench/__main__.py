"""Layer 13: `python -m lungbench` runs the command line (lungbench.cli)."""

import sys

from lungbench.cli import main

sys.exit(main())
