"""`python -m cellstream.bench`: see `cellstream.bench.cli`."""

import sys

from cellstream.bench.cli import main

# Client processes are spawned: they re-import this module, and must not rerun the benchmark.
if __name__ == "__main__":
    sys.exit(main())
