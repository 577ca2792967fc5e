"""``python -m experiments.structured``: see :mod:`experiments.structured.cli`."""

import sys

from experiments.structured.cli import main

if __name__ == "__main__":
  sys.exit(main())
