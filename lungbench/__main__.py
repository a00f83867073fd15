import sys

from lungbench.cli import main

sys.exit(main())
