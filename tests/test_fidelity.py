"""The pompc preset as the paper defines it: the KL-regularised critic by default and where it is trained, a prior
that learns only from real plans, KL terms that wait for N_s updates and real plans, episode breaks at env resets,
the first plan after the first updates, and a deterministic ``predict``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import tiny_algo
from test_family import record_calls

from sb3_pompc import POMPC
from sb3_pompc import objectives as obj
from sb3_pompc.config import resolve_config

torch.set_num_threads(1)


def short_pendulum(steps: int = 40) -> gym.Env:
    return gym.make("Pendulum-v1", max_episode_steps=steps)


def test_pompc_preset_trains_the_kl_critic_and_masks_placeholders_the_others_do_not() -> None:
    c = resolve_config("pompc", None)
    assert c.kl_value and c.mask_unplanned and c.kl_warmup == c.pretrain_updates
    for preset in ("tdmpc2", "bmpc"):
        c = resolve_config(preset, None)
        assert not c.kl_value and not c.mask_unplanned and c.kl_warmup == 0
    assert not resolve_config("pompc", None, kl_coef="inf").kl_value  # λ = ∞ has no return term to regularise
    with pytest.raises(ValueError, match="kl_value=True needs"):
        resolve_config("pompc", None, kl_coef="inf", kl_value=True)


def test_warm_up_rows_never_reach_the_prior_and_the_kl_terms_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """During the pretraining burst every row is a random warm-up row (N(0, 1), ``has_plan = 0``): π_p's loss is 0
    and its parameters do not move, π_s's loss has no KL term and Q̃'s target no KL penalty. After the burst the
    first plans are stored and the KL terms start."""
    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(learning_starts=60, pretrain_updates=6))
    prior0 = [p.detach().clone() for p in model.policy.model.prior.parameters()]
    prior_losses = record_calls(monkeypatch, obj, "prior_loss")
    policy_losses = record_calls(monkeypatch, obj, "policy_loss")
    kl_targets = record_calls(monkeypatch, obj, "kl_value_target")
    model.learn(61)  # the warm-up, then the burst of 6 updates and 1 update
    burst = slice(0, 6)
    assert all(float(c["out"][0]) == 0.0 for c in prior_losses[burst])
    assert all(torch.equal(a, b) for a, b in zip(prior0, model.policy.model.prior.parameters()))
    assert all(c["args"][1] is None for c in policy_losses[burst])  # no KL term
    assert all(float(c["args"][4]) == 0.0 for c in kl_targets[burst])  # λ = 0: no KL penalty
    assert not model.replay_buffer.has_plan[:61].any()
    model.learn(20, reset_num_timesteps=False)  # planned rows arrive, the KL terms start
    assert model.replay_buffer.has_plan[61:81].all()
    assert policy_losses[-1]["args"][1] is not None and float(kl_targets[-1]["args"][4]) == 1.0
    assert float(prior_losses[-1]["out"][0]) > 0.0


def test_planner_prior_windows_without_a_plan_add_no_kl(monkeypatch: pytest.MonkeyPatch) -> None:
    """``prior="planner"``: the π_s loss gets ``has_plan`` as its KL mask, and Q̃'s KL at z' is 0 where z' has no
    plan."""
    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(prior="planner", kl_warmup=0))
    model.learn(80)
    losses = record_calls(monkeypatch, obj, "policy_loss")
    targets = record_calls(monkeypatch, obj, "kl_value_target")
    batches: list[Any] = []
    sample = model.replay_buffer.sample

    def sample_with_placeholders(*args: Any, **kwargs: Any) -> Any:
        batch = sample(*args, **kwargs)
        has_plan = batch.has_plan.clone()
        has_plan[:, ::2] = 0.0  # every other window holds no plan
        batches.append(batch._replace(has_plan=has_plan))
        return batches[-1]

    monkeypatch.setattr(model.replay_buffer, "sample", sample_with_placeholders)
    model.update()
    mask = losses[-1]["args"][8] if len(losses[-1]["args"]) > 8 else losses[-1]["kwargs"].get("kl_mask")
    H = model.horizon
    assert torch.equal(mask, batches[-1].has_plan[:H])
    next_kl = targets[-1]["args"][3]
    assert torch.all(next_kl[:, ::2] == 0) and torch.any(next_kl[:, 1::2] > 0)


def test_kl_critic_is_trained_on_the_rollout_latents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Q̃ is queried by π_s at the rollout latents ẑ_t: it is trained there (detached), not on encoder latents."""
    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(kl_warmup=0))
    model.learn(80)
    wm_calls = record_calls(monkeypatch, obj, "world_model_loss")
    monkeypatch.setitem(model._update_fns, "world_model", obj.world_model_loss)
    seen: list[torch.Tensor] = []
    critic_logits = model.policy.model.critic_logits

    def spy(z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("kl"):
            seen.append(z.detach().clone())
        return critic_logits(z, *args, **kwargs)

    monkeypatch.setattr(model.policy.model, "critic_logits", spy)
    model.update()
    zs = wm_calls[-1]["out"][2].detach()
    T = model.config.kl_value_steps
    assert len(seen) == 1 and torch.equal(seen[0], zs[:T].reshape(-1, zs.shape[-1]))
    assert not seen[0].requires_grad


def test_a_reset_between_learn_calls_ends_the_stored_episodes() -> None:
    """A second ``learn`` with ``reset_num_timesteps=True`` resets the env mid-episode: the last stored row becomes
    a truncation, so no sampled window runs from the old episode into the new reset observation."""
    model = POMPC("MlpPolicy", short_pendulum(1000), seed=0, **tiny_algo(learning_starts=30, pretrain_updates=2))
    model.learn(45)
    rb, last = model.replay_buffer, model.replay_buffer.pos - 1
    assert rb.dones[last, 0] == 0  # mid-episode (1000-step episodes)
    model.learn(30)  # SB3 resets the env here
    assert rb.dones[last, 0] == 1 and rb.timeouts[last, 0] == 1
    starts = np.arange(0, rb.pos - rb.horizon + 1)
    ok = rb.valid_windows(starts, np.zeros_like(starts))
    crossing = (starts <= last) & (starts + rb.horizon - 1 > last)
    assert crossing.any() and not ok[crossing].any() and ok[~crossing].all()
    batch = rb.sample(64)
    assert not (batch.terminated > 0).any()  # a truncation still bootstraps
    model.learn(20, reset_num_timesteps=False)  # no reset: the episode goes on
    assert rb.dones[rb.pos - 21, 0] == 0


def test_the_first_plan_comes_after_the_first_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """``learning_starts=50``: the 51st action is random too (no update has run when it is chosen); the first plan
    is made by a model that has been through the pretraining burst. A second ``learn`` never repeats the warm-up."""
    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(learning_starts=50, pretrain_updates=5,
                                                                      reanalyze_interval=0))
    updates_at_plan: list[int] = []
    act = model.policy.act

    def recording_act(*args: Any, **kwargs: Any) -> Any:
        updates_at_plan.append(model._n_updates)
        return act(*args, **kwargs)

    monkeypatch.setattr(model.policy, "act", recording_act)
    model.learn(60)
    assert updates_at_plan and updates_at_plan[0] >= 5
    assert not model.replay_buffer.has_plan[:51].any() and model.replay_buffer.has_plan[51:60].all()
    n = len(updates_at_plan)
    model.learn(10)  # reset_num_timesteps=True: no second random warm-up, updates continue at once
    assert len(updates_at_plan) == n + 10 and model.replay_buffer.has_plan[60:70].all()


@pytest.mark.parametrize("how", ["elite", "mean"])
def test_deterministic_predict_is_a_function_of_the_observation(how: str) -> None:
    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(deterministic_action=how))
    model.learn(70)
    obs = np.array([0.3, -0.9, 0.5], np.float32)
    actions = {float(model.predict(obs, deterministic=True)[0][0]) for _ in range(10)}
    assert len(actions) == 1
    state = torch.get_rng_state()
    model.predict(obs, deterministic=True)
    assert torch.equal(state, torch.get_rng_state())  # evaluation leaves training's random stream alone
    stochastic = {float(model.predict(obs, deterministic=False)[0][0]) for _ in range(10)}
    assert len(stochastic) > 1


def test_tdmpc2_evaluation_protocol_stays_available() -> None:
    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(deterministic_action="sample", num_elites=16))
    model.learn(70)
    obs = np.array([0.3, -0.9, 0.5], np.float32)
    assert len({float(model.predict(obs, deterministic=True)[0][0]) for _ in range(20)}) > 1
    with pytest.raises(ValueError, match="deterministic_action must be one of"):
        POMPC("MlpPolicy", "Pendulum-v1", **tiny_algo(deterministic_action="best"))


def test_the_return_scale_comes_from_the_planners_critic_when_pi_maximises_q_tilde(monkeypatch) -> None:
    """With ``kl_value`` S_Q is measured on Q at π_s's first latents and actions, not on Q̃: Q̃'s penalty
    λ·(S_Q/S_KL)·KL would otherwise grow with Q̃'s own scale."""
    from sb3_pompc.math import RunningScale

    model = POMPC("MlpPolicy", short_pendulum(), seed=0, **tiny_algo(kl_warmup=0))
    model.learn(80)
    with torch.no_grad():  # a Q̃ on another scale than Q
        for p in model.policy.model.kl_critic.parameters():
            p.mul_(50.0)
    values: list[dict[str, Any]] = []
    critic_value = model.policy.model.critic_value

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = critic_value(*args, **kwargs)
        values.append(dict(kl=kwargs.get("kl", False), out=out))
        return out

    monkeypatch.setattr(model.policy.model, "critic_value", spy)
    updates = record_calls(monkeypatch, RunningScale, "update")
    model.update()
    scale_inputs = [c["args"][1] for c in updates if c["args"][0] is model.policy.q_scale]
    plain = [v["out"] for v in values if not v["kl"] and v["out"].shape == scale_inputs[0].shape]
    assert len(scale_inputs) == 1 and any(torch.equal(scale_inputs[0], q) for q in plain)
