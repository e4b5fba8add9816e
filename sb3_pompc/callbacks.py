"""Callbacks of the training job (``python -m sb3_pompc.train``): a periodic evaluation that writes a learning
curve, with an optional progress bar per evaluation, and a progress bar over the training steps.

The algorithm itself never imports this module.
"""

from __future__ import annotations

import csv
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, sync_envs_normalization
from tqdm.auto import tqdm

__all__ = ["EVAL_CSV_HEADER", "EvalCurveCallback", "TrainingProgressBar", "episode_length", "read_eval_csv"]

EVAL_CSV_HEADER = ("step", "mean", "std", "wall_time_s")
# read_eval_csv also reads files with these column names (same meaning)
_LEGACY_HEADER = ("step", "mean_return", "std_return", "wall_time_s")


def episode_length(env: Union[gym.Env, VecEnv]) -> Optional[int]:
    """Steps per episode of an env: its ``episode_length`` attribute (the ``dmc/`` ids), else its time limit, else
    None.

    :param env: a Gymnasium env or a VecEnv (its first env is asked)
    """
    def get(name: str) -> Any:
        try:
            return env.get_attr(name)[0] if isinstance(env, VecEnv) else getattr(env.unwrapped, name, None)
        except (AttributeError, KeyError, IndexError):
            return None

    length = get("episode_length")
    if length:
        return int(length)
    spec = env.spec if not isinstance(env, VecEnv) else get("spec")
    return int(spec.max_episode_steps) if spec is not None and spec.max_episode_steps else None


class EvalCurveCallback(BaseCallback):
    """Evaluate the agent every ``eval_freq`` environment steps and append a row to a CSV learning curve.

    Each evaluation runs :func:`~stable_baselines3.common.evaluation.evaluate_policy` on a separate environment
    that is re-seeded with ``eval_seed`` before every evaluation (every evaluation sees the same initial states),
    inside a forked torch/numpy/python RNG state seeded with ``eval_seed``: evaluating never changes the random
    stream of training, so a run's training trajectory does not depend on ``eval_freq``.

    Rows: ``step,mean,std,wall_time_s`` where ``step`` is ``model.num_timesteps`` (total env steps
    over all training envs), the return statistics are over ``n_eval_episodes`` episodes, and ``wall_time_s`` is
    the training wall time since the start of ``learn()`` **excluding the time spent evaluating**. The
    evaluation time is kept in :attr:`eval_time_s`. Values are also recorded under ``eval/`` in the SB3 logger.

    :param eval_env: the evaluation environment (a ``gym.Env`` is wrapped in ``Monitor`` + ``DummyVecEnv``)
    :param eval_freq: evaluate when ``num_timesteps`` reaches a multiple of ``eval_freq``
    :param n_eval_episodes: episodes per evaluation
    :param log_path: CSV file to write (its folder is created; an existing file is overwritten); None = no file
    :param deterministic: plan without exploration noise on the executed action
    :param eval_seed: seed of the evaluation env and of the RNG used while evaluating (None = no seeding)
    :param eval_at_start: also evaluate at step 0, before any training (the published curves start at 0)
    :param eval_at_end: also evaluate when training ends, if the last evaluation was at an earlier step
    :param progress_bar: show a tqdm bar with an ETA during each evaluation (over environment steps when the
        episode length is known, else over episodes); it sits below a :class:`TrainingProgressBar`
    :param verbose: 1 prints one line per evaluation
    """

    def __init__(
        self,
        eval_env: Union[gym.Env, VecEnv],
        eval_freq: int = 5000,
        n_eval_episodes: int = 10,
        log_path: Optional[Union[str, os.PathLike]] = None,
        deterministic: bool = True,
        eval_seed: Optional[int] = None,
        eval_at_start: bool = True,
        eval_at_end: bool = True,
        progress_bar: bool = False,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if eval_freq < 1:
            raise ValueError(f"eval_freq must be >= 1, got {eval_freq}")
        if n_eval_episodes < 1:
            raise ValueError(f"n_eval_episodes must be >= 1, got {n_eval_episodes}")
        if not isinstance(eval_env, VecEnv):
            env = eval_env if isinstance(eval_env, Monitor) else Monitor(eval_env)
            eval_env = DummyVecEnv([lambda: env])
        self.eval_env = eval_env
        self.eval_freq = int(eval_freq)
        self.n_eval_episodes = int(n_eval_episodes)
        self.log_path = Path(log_path) if log_path is not None else None
        self.deterministic = deterministic
        self.eval_seed = eval_seed
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.progress_bar = progress_bar
        self.rows: list[tuple[int, float, float, float]] = []
        self.eval_time_s = 0.0
        self._t_start = 0.0
        self._next_eval = self.eval_freq
        self._last_eval_step: Optional[int] = None

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def last_mean_return(self) -> Optional[float]:
        """Mean return of the latest evaluation (None before the first)."""
        return self.rows[-1][1] if self.rows else None

    def training_time_s(self) -> float:
        """Wall time since ``learn()`` started, evaluation time excluded."""
        return time.perf_counter() - self._t_start - self.eval_time_s

    def _rng_devices(self) -> list[int]:
        device = getattr(self.model, "device", torch.device("cpu"))
        if isinstance(device, torch.device) and device.type == "cuda":
            return [device.index if device.index is not None else torch.cuda.current_device()]
        return []

    def episode_length(self) -> Optional[int]:
        """Steps per evaluation episode (see :func:`episode_length`)."""
        return episode_length(self.eval_env)

    def _make_bar(self, step: int) -> tuple[Any, Any]:
        """The evaluation's tqdm bar and the ``evaluate_policy`` callback that advances it (None, None if off)."""
        if not self.progress_bar:
            return None, None
        length = self.episode_length()
        desc = f"eval @ {step}"
        if length is not None:
            bar = tqdm(total=self.n_eval_episodes * length, desc=desc, unit="step", leave=False, dynamic_ncols=True)

            def advance(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
                bar.update(1)  # evaluate_policy calls this once per env and step
        else:
            bar = tqdm(total=self.n_eval_episodes, desc=desc, unit="episode", leave=False, dynamic_ncols=True)

            def advance(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
                if locals_.get("done"):
                    bar.update(1)
        return bar, advance

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        wall = t0 - self._t_start - self.eval_time_s
        try:
            sync_envs_normalization(self.training_env, self.eval_env)
        except AttributeError as e:  # pragma: no cover - mirrors SB3's EvalCallback message
            raise AssertionError(
                "Training and eval env are not wrapped the same way (VecNormalize on one side only)"
            ) from e
        bar, advance = self._make_bar(int(self.num_timesteps))
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=self._rng_devices()):
            if self.eval_seed is not None:
                self.eval_env.seed(self.eval_seed)
                torch.manual_seed(self.eval_seed)
                np.random.seed(self.eval_seed)
                random.seed(self.eval_seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not wrapped with Monitor" for user VecEnvs
                returns, _ = evaluate_policy(
                    self.model,  # type: ignore[arg-type]
                    self.eval_env,
                    n_eval_episodes=self.n_eval_episodes,
                    deterministic=self.deterministic,
                    return_episode_rewards=True,
                    callback=advance,
                )
        if bar is not None:
            bar.close()
        np.random.set_state(np_state)
        random.setstate(py_state)
        returns_arr = np.asarray(returns, dtype=np.float64)
        mean, std = float(returns_arr.mean()), float(returns_arr.std())
        step = int(self.num_timesteps)
        self.rows.append((step, mean, std, wall))
        self._last_eval_step = step
        self._write()
        self.logger.record("eval/mean_reward", mean)
        self.logger.record("eval/std_reward", std)
        self.logger.record("eval/step", step)
        self.eval_time_s += time.perf_counter() - t0
        if self.verbose >= 1:  # tqdm.write keeps open progress bars intact
            tqdm.write(
                f"eval step={step} return={mean:.1f} ± {std:.1f} ({self.n_eval_episodes} episodes) "
                f"train_time={wall:.0f}s eval_time={time.perf_counter() - t0:.1f}s"
            )

    def _write(self) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(EVAL_CSV_HEADER)
            for step, mean, std, wall in self.rows:
                writer.writerow([step, f"{mean:.6g}", f"{std:.6g}", f"{wall:.3f}"])

    # ----------------------------------------------------------------------------------------------- hooks
    def _on_training_start(self) -> None:
        self._t_start = time.perf_counter()
        self.eval_time_s = 0.0
        self.rows = []
        self._last_eval_step = None
        self._next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
        if self.eval_at_start:
            self._evaluate()

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next_eval:
            self._evaluate()
            self._next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
        return True

    def _on_training_end(self) -> None:
        if self.eval_at_end and self._last_eval_step != self.num_timesteps:
            self._evaluate()


class TrainingProgressBar(BaseCallback):
    """tqdm bars over the environment steps of ``learn()``, with rate and ETA: one over the random warm-up
    (``model.learning_starts`` steps), then a line for the pretraining burst (``model.pretrain_updates`` updates,
    which run without a bar), then one over the planned steps, whose ETA is not skewed by the cheap warm-up steps.

    SB3's ``learn(progress_bar=True)`` draws a rich live display, which cannot share the terminal with a second bar;
    these plain tqdm bars leave room for the evaluation bar of :class:`EvalCurveCallback` below them.

    :param desc: text in front of the bar of the planned steps
    :param mininterval: seconds between redraws
    """

    def __init__(self, desc: str = "training", mininterval: float = 0.5) -> None:
        super().__init__(0)
        self.desc = desc
        self.mininterval = mininterval
        self.bar: Any = None
        self._total = 0
        self._warmup = 0

    def _open(self, desc: str, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        mininterval=self.mininterval)

    def _on_training_start(self) -> None:
        self._total = int(self.locals["total_timesteps"])
        start = int(self.model.num_timesteps)
        self._warmup = int(getattr(self.model, "learning_starts", 0) or 0)
        if start < self._warmup:
            self._open("warm-up (random actions)", min(self._warmup, self._total), start)
        else:
            self._warmup = 0
            self._open(self.desc, self._total, start)

    def _on_step(self) -> bool:
        step = int(self.num_timesteps)
        if self.bar is not None:
            self.bar.update(min(step, self.bar.total) - self.bar.n)
        if self._warmup and step >= self._warmup and self.bar is not None and self.bar.desc != self.desc:
            self.bar.close()
            self.bar = None
            updates = int(getattr(self.model, "pretrain_updates", 0) or 0)
            if updates and step < self._total:
                tqdm.write(f"pretraining: {updates} updates before the first planned step (no bar while they run)")
        elif self._warmup and step > self._warmup + 1 and self.bar is None and step < self._total:
            self._open(self.desc, self._total, step)  # the burst ran after the first step past the warm-up
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_eval_csv(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """Read an ``eval.csv`` written by :class:`EvalCurveCallback` into arrays keyed by its columns. A file with the
    columns ``step,mean_return,std_return,wall_time_s`` is read under the same keys.

    :param path: the CSV file
    :return: ``{"step": int64 array, "mean": ..., "std": ..., "wall_time_s": ...}``
    """
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) not in (EVAL_CSV_HEADER, _LEGACY_HEADER):
            raise ValueError(f"{path}: expected the header {','.join(EVAL_CSV_HEADER)}, got {header}")
        rows = [r for r in reader if r]
    data = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(EVAL_CSV_HEADER))
    out = {name: data[:, i] for i, name in enumerate(EVAL_CSV_HEADER)}
    out["step"] = out["step"].astype(np.int64)
    return out
