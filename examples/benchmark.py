"""Speed benchmark of PO-MPC (ms per plan / update, achieved GFLOP/s vs a dense matmul).

Same as ``python -m sb3_pompc.benchmark``; every option is passed through, e.g.::

    python examples/benchmark.py --quick --threads 2
    python examples/benchmark.py --sizes 5 --n-envs 1,8 --what plan,update,reanalyze --json bench.json

See docs/benchmark.md.
"""

import sys

from sb3_pompc.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
