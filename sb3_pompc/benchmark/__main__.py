"""``python -m sb3_pompc.benchmark``: see :mod:`sb3_pompc.benchmark`."""

import sys

from sb3_pompc.benchmark.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
