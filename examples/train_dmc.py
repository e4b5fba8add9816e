"""Train POMPC on a DMControl task and plot its learning curve against the published TD-MPC2 and BMPC curves.

This is the package's training job, :mod:`sb3_pompc.train`; the same command line works as
``python -m sb3_pompc.train ...`` or ``sb3-pompc-train ...`` after ``pip install sb3-pompc``::

    python examples/train_dmc.py --env dmc/cartpole-balance-v0 --cpu --steps 30000 --out runs/cartpole
"""

from sb3_pompc.train import cli

if __name__ == "__main__":
    cli()
