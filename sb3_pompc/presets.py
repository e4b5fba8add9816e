"""Presets of the PO-MPC family: TD-MPC2 (λ = 0), BMPC (λ = ∞) and PO-MPC (intermediate λ, learned prior).

A preset fills every keyword argument that the user left at ``None``; explicit arguments win.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRIORS", "CPU_SETTINGS", "resolve_preset"]

#: π_ref of the KL terms: the buffer's planner stats, or a prior network fitted by forward or reverse KL.
PRIORS = ("planner", "forward", "reverse")

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's default: intermediate λ with a reverse-KL intermediate prior, the KL-regularised critic Q̃, the KL
    # terms only on rows with a real plan (after the pretraining burst), BMPC's policy head
    "pompc": dict(
        kl_coef=1.0,
        prior="reverse",
        kl_value=True,
        mask_unplanned=True,
        critic="q",
        num_q=5,
        target_reduce="min",
        policy_squash="clamp",
        log_std_min=-3.0,
        log_std_max=1.0,
        critic_init="trunc_normal",
        pretrain_policy=True,
        reanalyze_interval=10,
    ),
    # TD-MPC2 (spec §3.3): return-only policy update over H+1 latents, min of 2 target heads
    "tdmpc2": dict(
        kl_coef=0.0,
        prior="planner",
        kl_value=False,
        mask_unplanned=False,
        critic="q",
        num_q=5,
        target_reduce="min",
        policy_squash="tanh",
        log_std_min=-10.0,
        log_std_max=2.0,
        critic_init="trunc_normal",
        pretrain_policy=True,
        reanalyze_interval=0,
    ),
    # BMPC (spec §3.4): pure KL to the buffer's planner stats over H latents (warm-up rows' N(0, 1) included),
    # 2-head V critic, lazy reanalyze
    "bmpc": dict(
        kl_coef=float("inf"),
        prior="planner",
        kl_value=False,
        mask_unplanned=False,
        critic="v",
        num_q=2,
        target_reduce="avg",
        policy_squash="clamp",
        log_std_min=-3.0,
        log_std_max=1.0,
        critic_init="default",
        pretrain_policy=False,
        reanalyze_interval=10,
    ),
}


# CPU-sized settings for DMControl (any preset): the 1M-parameter model, 64 MPPI samples (8 elites, 4 policy
# trajectories) x 3 iterations, batch 64, no lazy reanalyze and a 500-update pretraining burst.
CPU_SETTINGS: dict[str, Any] = dict(
    model_size=1,
    num_samples=64,
    num_elites=8,
    num_pi_trajs=4,
    iterations=3,
    batch_size=64,
    reanalyze_interval=0,
    pretrain_updates=500,
)


def resolve_preset(preset: str, **overrides: Any) -> dict[str, Any]:
    """The preset's settings with every non-None keyword argument taking precedence."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; supported presets: {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"not preset settings: {sorted(unknown)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg
