"""Grid files of the sweep runner: loading, validation, grid points, run names and per-run settings.

A grid file is YAML::

    env: Pendulum-v1          # or an axis named env
    seed: 0                   # optional, when seed is not an axis (default 0)
    steps: 10000              # env steps of every run
    eval_every: 1000          # evaluate every N env steps and at the end (not at step 0)
    eval_episodes: 5          # episodes per evaluation
    eval_max_steps: null      # optional: cut evaluation episodes to N steps (TimeLimit)
    settings: {}              # POMPC keyword arguments shared by every run
    axes:                     # every combination of the axes' values is one run
      kl_coef: [0, 0.1, 1, 9, inf]
      seed: [0, 1, 2]
    overrides:                # optional: settings for the points that match `when`
      - when: {kl_coef: inf}
        set: {kl_value: false}

``inf``, ``-inf`` and ``nan`` (any case, also ``.inf``) are read as floats anywhere in the file; other strings
(``"auto"``, ``"reverse"``) pass through unchanged. Axis names are POMPC keyword arguments, ``env`` or ``seed``.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = ["Grid", "GridError", "load_grid", "parse_grid", "encode_value", "decode_value", "format_value",
           "pompc_keywords"]

TOP_LEVEL_KEYS = ("env", "seed", "steps", "eval_every", "eval_episodes", "eval_max_steps", "settings", "axes",
                  "overrides")
#: axis names that are not POMPC keyword arguments
RUN_AXES = ("env", "seed")
#: POMPC.__init__ parameters that a grid cannot set (the runner passes them itself)
_RESERVED = ("self", "env", "seed", "_init_setup_model")
_NON_FINITE = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf, ".inf": math.inf, "+.inf": math.inf,
               "-.inf": -math.inf, "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf,
               "nan": math.nan, ".nan": math.nan}


class GridError(ValueError):
    """An invalid grid file."""


def pompc_keywords() -> set[str]:
    """Keyword arguments a grid may set: the parameters of ``POMPC.__init__`` except ``env`` and ``seed``."""
    from sb3_pompc.pompc import POMPC

    return set(inspect.signature(POMPC.__init__).parameters) - set(_RESERVED)


def _floats(value: Any) -> Any:
    """``value`` with every string spelling of inf / nan replaced by the float, recursively."""
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return _NON_FINITE[value.strip().lower()]
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def encode_value(value: Any) -> str:
    """A JSON-safe string for an axis value (Optuna's categorical choices); :func:`decode_value` inverts it.

    Non-finite floats become ``inf`` / ``-inf`` / ``nan``; everything else is its JSON text (strings keep their
    quotes, so the string ``"inf"`` and the float inf stay distinct).

    :param value: None, bool, int, float or str
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(value)


def decode_value(text: str) -> Any:
    """The axis value that :func:`encode_value` turned into ``text``.

    :param text: an encoded value
    """
    if text in ("inf", "-inf", "nan"):
        return float(text)
    return json.loads(text)


def format_value(value: Any) -> str:
    """An axis value as written in run names and plot labels: ``1``, ``0.1``, ``inf``, ``reverse``.

    :param value: an axis value
    """
    return str(value)


def _same(a: Any, b: Any) -> bool:
    """Axis values equal as grid values (``True`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


@dataclass(frozen=True)
class Grid:
    """A validated grid (see the module docstring for the file format).

    :param env: the environment id when ``env`` is not an axis
    :param seed: the seed when ``seed`` is not an axis
    :param steps: env steps per run
    :param eval_every: evaluate every ``eval_every`` env steps (and at the end)
    :param eval_episodes: episodes per evaluation
    :param eval_max_steps: cut evaluation episodes to this many steps (None = the env's own limit)
    :param settings: POMPC keyword arguments shared by every run
    :param axes: axis name → its values, in file order
    :param overrides: ``[{"when": {axis: value}, "set": {keyword: value}}]``, applied in order
    """

    env: Optional[str]
    seed: Optional[int]
    steps: int
    eval_every: int
    eval_episodes: int
    eval_max_steps: Optional[int]
    settings: dict[str, Any]
    axes: dict[str, list[Any]]
    overrides: list[dict[str, dict[str, Any]]] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ points
    def points(self) -> list[dict[str, Any]]:
        """Every combination of the axes' values, as ``{axis: value}``, first axis slowest."""
        names = list(self.axes)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.axes[n] for n in names))]

    def search_space(self) -> dict[str, list[str]]:
        """The axes with encoded values: the search space of Optuna's ``GridSampler``."""
        return {name: [encode_value(v) for v in values] for name, values in self.axes.items()}

    def key(self, params: dict[str, str]) -> Optional[tuple[str, ...]]:
        """The grid point of a trial's (encoded) params as a tuple in axis order, None if an axis is missing.

        :param params: a trial's params
        """
        if any(name not in params for name in self.axes):
            return None
        return tuple(str(params[name]) for name in self.axes)

    def point_key(self, point: dict[str, Any]) -> tuple[str, ...]:
        """The key (see :meth:`key`) of a decoded point."""
        return tuple(encode_value(point[name]) for name in self.axes)

    def run_name(self, point: dict[str, Any]) -> str:
        """Folder name of a point's run, ``kl_coef=1_seed=0`` (characters other than letters, digits and ``.+-=``
        become ``-``).

        :param point: ``{axis: value}``
        """
        raw = "_".join(f"{name}={format_value(point[name])}" for name in self.axes)
        return re.sub(r"[^A-Za-z0-9.+=_-]", "-", raw)

    def run_config(self, point: dict[str, Any]) -> dict[str, Any]:
        """The full settings of one run: env, seed, budget, evaluation and the POMPC keyword arguments.

        :param point: ``{axis: value}``
        """
        kwargs = dict(self.settings)
        for override in self.overrides:
            if all(_same(point[name], value) for name, value in override["when"].items()):
                kwargs.update(override["set"])
        kwargs.update({name: value for name, value in point.items() if name not in RUN_AXES})
        return dict(
            run_name=self.run_name(point),
            env=point.get("env", self.env),
            seed=int(point.get("seed", 0 if self.seed is None else self.seed)),
            steps=self.steps,
            eval_every=self.eval_every,
            eval_episodes=self.eval_episodes,
            eval_max_steps=self.eval_max_steps,
            axes=dict(point),
            pompc=kwargs,
        )

    # ------------------------------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """The grid as plain data (the form :func:`parse_grid` reads)."""
        out = dict(steps=self.steps, eval_every=self.eval_every, eval_episodes=self.eval_episodes,
                   eval_max_steps=self.eval_max_steps, settings=self.settings, axes=self.axes,
                   overrides=self.overrides)
        if self.env is not None:
            out["env"] = self.env
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def fingerprint(self) -> str:
        """A short hash of the grid's content (stored on the study so that a study serves one grid only)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- parsing
def _positive_int(data: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise GridError(f"missing top-level key {key!r}")
        return default
    value = data[key]
    if default is None and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GridError(f"{key} must be a positive integer, got {value!r}")
    return value


def _check_keywords(names: Any, allowed: set[str], where: str) -> None:
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown POMPC keyword(s) {unknown} (see POMPC.__init__)")


def parse_grid(data: Any, allowed: Optional[set[str]] = None) -> Grid:
    """Validate a grid given as plain data (a YAML document) and return it.

    :param data: the mapping read from a grid file
    :param allowed: POMPC keyword arguments that ``settings``, axes and overrides may set (default: the
        parameters of ``POMPC.__init__``)
    :raises GridError: on any invalid entry, with a message naming it
    """
    if not isinstance(data, dict):
        raise GridError(f"a grid file is a mapping of {list(TOP_LEVEL_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise GridError(f"unknown top-level key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}")
    data = _floats(data)
    allowed = pompc_keywords() if allowed is None else allowed

    axes = data.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise GridError("axes must be a non-empty mapping of axis name → list of values")
    _check_keywords([a for a in axes if a not in RUN_AXES], allowed, "axes")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"axis {name!r} must be a non-empty list of values, got {values!r}")
        for v in values:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise GridError(f"axis {name!r}: values must be numbers, strings, booleans or null, got {v!r}")
        encoded = [encode_value(v) for v in values]
        if len(set(encoded)) != len(encoded):
            raise GridError(f"axis {name!r} repeats a value: {values}")
    for name in RUN_AXES:
        if name in axes and name in data:
            raise GridError(f"{name!r} is both a top-level key and an axis; keep one")
    if "env" not in axes and not isinstance(data.get("env"), str):
        raise GridError("env must be an environment id (top-level string) or an axis")
    if "env" in axes and not all(isinstance(v, str) for v in axes["env"]):
        raise GridError(f"axis 'env' must list environment ids, got {axes['env']}")
    if "seed" in axes and not all(isinstance(v, int) and not isinstance(v, bool) for v in axes["seed"]):
        raise GridError(f"axis 'seed' must list integers, got {axes['seed']}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GridError(f"seed must be an integer, got {seed!r}")

    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise GridError(f"settings must be a mapping of POMPC keyword arguments, got {settings!r}")
    _check_keywords(settings, allowed, "settings")
    both = sorted(set(settings) & set(axes))
    if both:
        raise GridError(f"{both} set both in settings and as axes; keep one")

    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise GridError("overrides must be a list of {when: {axis: value}, set: {keyword: value}}")
    for i, item in enumerate(overrides):
        if not isinstance(item, dict) or set(item) != {"when", "set"} or not isinstance(item["when"], dict) \
                or not isinstance(item["set"], dict) or not item["when"]:
            raise GridError(f"overrides[{i}] must be {{when: {{axis: value}}, set: {{keyword: value}}}}, got {item!r}")
        for name, value in item["when"].items():
            if name not in axes:
                raise GridError(f"overrides[{i}].when: {name!r} is not an axis (axes: {list(axes)})")
            if not any(_same(value, v) for v in axes[name]):
                raise GridError(f"overrides[{i}].when: {name}={value!r} is not a value of that axis {axes[name]}")
        _check_keywords(item["set"], allowed, f"overrides[{i}].set")
        clash = sorted(set(item["set"]) & (set(axes) | set(RUN_AXES)))
        if clash:
            raise GridError(f"overrides[{i}].set: {clash} cannot be set by an override (axes, env and seed)")

    grid = Grid(
        env=data.get("env"),
        seed=seed,
        steps=_positive_int(data, "steps"),
        eval_every=_positive_int(data, "eval_every"),
        eval_episodes=_positive_int(data, "eval_episodes", 5),
        eval_max_steps=_positive_int(data, "eval_max_steps", None),
        settings=settings,
        axes={name: list(values) for name, values in axes.items()},
        overrides=[{"when": dict(o["when"]), "set": dict(o["set"])} for o in overrides],
    )
    names = [grid.run_name(p) for p in grid.points()]
    if len(set(names)) != len(names):
        raise GridError("two grid points get the same run name (axis values that differ only in characters "
                        "outside letters, digits and '.+-'); rename a value")
    return grid


def load_grid(path: Union[str, Path], allowed: Optional[set[str]] = None) -> Grid:
    """Read and validate a grid file.

    :param path: the YAML file
    :param allowed: see :func:`parse_grid`
    :raises GridError: on any invalid entry (the message starts with the file name)
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {e}") from e
    try:
        return parse_grid(data, allowed)
    except GridError as e:
        raise GridError(f"{path}: {e}") from None
