"""rl-zoo3 integration (``python -m rl_zoo3.train --algo pompc``) as a user gets it from a built wheel.

The module fixture builds the wheel from a copy of the repository, creates a fresh virtual environment WITHOUT the
repository on its path, installs the wheel there (not editable) and makes the heavy dependencies visible through a
``.pth`` line pointing at this interpreter's site-packages (``--system-site-packages`` would not do: the test
interpreter is itself a venv, and a venv's "system" packages are its base interpreter's). Every rl-zoo3 command
then runs from a temporary working directory with one torch thread, a tiny model and 50-step Pendulum episodes.
The in-process tests of the sampler, the storage and the yml files are in ``test_zoo_sampler.py``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import TINY_ALGO

from sb3_pompc import POMPC, zoo

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]

#: the tiny CPU configuration, as rl-zoo3 ``--hyperparams`` (values are Python expressions)
TINY_ARGS = [
    "model_size:None", "latent_dim:32", "mlp_dim:32", "enc_dim:32", "num_q:2", "num_samples:32", "num_elites:4",
    "num_pi_trajs:2", "iterations:2", "batch_size:16", "learning_starts:50", "pretrain_updates:5",
    "reanalyze_interval:0", "buffer_size:10000",
]
TINY: dict[str, Any] = TINY_ALGO
#: the options every pompc zoo run of this file shares: one thread, 50-step episodes, the tiny model
COMMON = ["--num-threads", "1", "--env-kwargs", "max_episode_steps:50", "--hyperparams", *TINY_ARGS]
TIMEOUT = 300


# ------------------------------------------------------------------------------------------------ the fresh venv
def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {".git", "build", "dist", "logs", "runs", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", "venv"}
    return {n for n in names if n in skip or n.endswith(".egg-info") or n.endswith(".zip")}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONWARNINGS="ignore")
    return env


def _check(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = TIMEOUT) -> str:
    """Run ``cmd``; return stdout+stderr, failing the test with the output's tail if it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc.stdout


def _make_venv(path: Path, env: dict[str, str]) -> Path:
    """A venv without pip whose site-packages also sees this interpreter's (plain path line: no .pth of it runs)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, env=env)
    python = path / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                               env=env, stdout=subprocess.PIPE, text=True).stdout.strip()
    outer = [p for p in site.getsitepackages() if os.path.isdir(p)]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        outer.append(site.getusersitepackages())
    Path(venv_site, "zz_outer_env.pth").write_text("\n".join(outer) + "\n")
    return python


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Build the wheel, install it (no deps, not editable) into a fresh venv; ``run(args, cwd)`` runs its python."""
    root = tmp_path_factory.mktemp("zoo_wheel")
    env = _clean_env()
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_ignore, symlinks=True)
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src),
            "-w", str(root / "dist")], root, env)
    wheels = list((root / "dist").glob("sb3_pompc-*.whl"))
    assert len(wheels) == 1, wheels
    python = _make_venv(root / "venv", env)
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--ignore-installed",
            "--no-index", "-q", str(wheels[0])], root, env)

    def run(args: list[str], cwd: Path, timeout: int = TIMEOUT) -> str:
        cwd.mkdir(parents=True, exist_ok=True)
        return _check([str(python), *args], cwd, env, timeout)

    return SimpleNamespace(root=root, python=python, wheel=wheels[0], env=env, run=run, venv=python.parents[1])


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                         stdout=subprocess.PIPE, text=True, env=_clean_env()).stdout.strip()
    return Path(out)


# ------------------------------------------------------------------------------------------------ install mechanism
def test_wheel_ships_pth_hook_and_yml(wheel_venv: SimpleNamespace) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel_venv.wheel).namelist())
    shipped = {"sb3_pompc_zoo.pth", "sb3_pompc_zoo_hook.py", "sb3_pompc/hyperparams/pompc.yml",
               "sb3_pompc/hyperparams/pompc_cpu.yml", "sb3_pompc/zoo.py"}
    assert shipped <= names
    pth = zipfile.ZipFile(wheel_venv.wheel).read("sb3_pompc_zoo.pth").decode()
    assert pth.strip() == "import sb3_pompc_zoo_hook"
    assert (_site_packages(wheel_venv.python) / "sb3_pompc_zoo.pth").is_file()


def test_hook_is_stdlib_only_and_lazy(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    """At start-up the hook is imported, imports nothing itself, and loads neither torch nor sb3_pompc/rl_zoo3;
    importing rl_zoo3 then registers POMPC from the wheel (not from the repository)."""
    probe = (
        "import sys, json; before = {m: m in sys.modules for m in "
        "('sb3_pompc_zoo_hook', 'torch', 'numpy', 'sb3_pompc', 'rl_zoo3', 'optuna')}; "
        "finders = [type(f).__name__ for f in sys.meta_path]; "
        "import rl_zoo3, sb3_pompc; from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER, HYPERPARAMS_CONVERTER; "
        "print(json.dumps(dict(before=before, finders=finders, file=sb3_pompc.__file__, "
        "algo=rl_zoo3.ALGOS['pompc'].__module__ + '.' + rl_zoo3.ALGOS['pompc'].__name__, "
        "sampler=HYPERPARAMS_SAMPLER['pompc'].__module__, converter=HYPERPARAMS_CONVERTER['pompc'].__name__, "
        "sac=rl_zoo3.ALGOS['sac'].__name__)))"
    )
    out = json.loads(wheel_venv.run(["-c", probe], tmp_path).strip().splitlines()[-1])
    assert out["before"] == {"sb3_pompc_zoo_hook": True, "torch": False, "numpy": False, "sb3_pompc": False,
                             "rl_zoo3": False, "optuna": False}
    assert out["finders"][0] == "ZooImportFinder"
    assert Path(out["file"]).resolve().is_relative_to(Path(wheel_venv.venv).resolve()), out["file"]
    assert out["algo"] == "sb3_pompc.pompc.POMPC" and out["sac"] == "SAC"
    assert out["sampler"] == "sb3_pompc.zoo" and out["converter"] == "convert_pompc_params"

    # -X importtime: nothing is imported underneath the hook (children are printed before it, indented deeper)
    lines = subprocess.run([str(wheel_venv.python), "-X", "importtime", "-c", "pass"], stderr=subprocess.PIPE,
                           text=True, env=wheel_venv.env, cwd=tmp_path, check=True).stderr.splitlines()
    entries = [(len(l.split("|")[2]) - len(l.split("|")[2].lstrip()), l.split("|")[2].strip())
               for l in lines if l.startswith("import time:") and l.count("|") == 2 and "imported package" not in l]
    idx = [i for i, (_, name) in enumerate(entries) if name == "sb3_pompc_zoo_hook"]
    assert len(idx) == 1, entries
    depth = entries[idx[0]][0]
    children = []
    for d, name in reversed(entries[: idx[0]]):
        if d <= depth:
            break
        children.append(name)
    assert children == [], f"the start-up hook imported {children}"


def test_broken_plugin_leaves_rl_zoo3_working(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    probe = (
        "import sys, warnings; sys.modules['sb3_pompc'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import rl_zoo3\n"
        "print('pompc' in rl_zoo3.ALGOS, 'sac' in rl_zoo3.ALGOS,\n"
        "      any('sb3-pompc could not register' in str(x.message) for x in w))"
    )
    assert wheel_venv.run(["-c", probe], tmp_path).strip().splitlines()[-1] == "False True True"


def test_editable_install_has_the_hook_too(tmp_path: Path) -> None:
    env = _clean_env()
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_ignore, symlinks=True)
    python = _make_venv(tmp_path / "venv", env)
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--ignore-installed",
            "--no-build-isolation", "--no-index", "-q", "-e", str(src)], tmp_path, env)
    assert (_site_packages(python) / "sb3_pompc_zoo.pth").is_file()
    out = _check([str(python), "-c", "import sys; print('sb3_pompc_zoo_hook' in sys.modules, 'torch' in sys.modules); "
                  "import rl_zoo3, sb3_pompc; print(rl_zoo3.ALGOS['pompc'].__name__, sb3_pompc.__file__)"],
                 tmp_path, env)
    first, second = out.strip().splitlines()[-2:]
    assert first == "True False"
    name, path = second.split()
    assert name == "POMPC"
    # setuptools' editable finder comes after the path entries, so a regular install of sb3_pompc in the outer env
    # (what .ci/run does) shadows the editable source here; otherwise the source must be the one imported
    outer = [Path(p, "sb3_pompc", "__init__.py").resolve() for p in site.getsitepackages()]
    assert Path(path).resolve().is_relative_to(src.resolve()) or Path(path).resolve() in outer


# ------------------------------------------------------------------------------------------------ zoo commands
def test_train_enjoy_and_continue_from_wheel(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    """Train, enjoy, then continue with ``-i``: the replay buffer comes back, and the continued run repeats neither the
    random warm-up nor the pretraining burst (they run once per model)."""
    work = tmp_path / "work"
    out = wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "pompc", "--env", "Pendulum-v1", "-n", "200", "--seed", "1",
                          "--eval-freq", "150", "--eval-episodes", "1", "--save-replay-buffer", "-tb", "tb", *COMMON],
                         work)
    packaged = _site_packages(wheel_venv.python) / "sb3_pompc" / "hyperparams" / "pompc.yml"
    assert f"Loading hyperparameters from: {packaged}" in out
    run1 = work / "logs" / "pompc" / "Pendulum-v1_1"
    for name in ("Pendulum-v1.zip", "0.monitor.csv", "evaluations.npz", "replay_buffer.pkl", "best_model.zip"):
        assert (run1 / name).is_file(), name
    config = yaml.load((run1 / "Pendulum-v1" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)
    assert config["preset"] == "pompc" and config["n_timesteps"] == 20000  # from the packaged yml's Pendulum entry
    assert config["num_samples"] == 32 and config["model_size"] is None  # the --hyperparams overrides
    assert list((work / "tb" / "Pendulum-v1").glob("POMPC_1/events.out.tfevents.*"))
    assert len(np.load(run1 / "evaluations.npz")["timesteps"]) == 1

    out = wheel_venv.run(["-m", "rl_zoo3.enjoy", "--algo", "pompc", "--env", "Pendulum-v1", "-f", "logs/",
                          "--no-render", "-n", "110", "--num-threads", "1"], work)
    assert "Loading logs/pompc/Pendulum-v1_1/Pendulum-v1.zip" in out
    assert out.count("Episode Length 50") == 2  # 110 steps of 50-step episodes: two finished episodes

    out = wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "pompc", "--env", "Pendulum-v1", "-n", "80", "--seed", "2",
                          "--eval-freq", "-1", "--save-replay-buffer", "-i", str(run1 / "Pendulum-v1.zip"), *COMMON],
                         work)
    assert "Loading pretrained agent" in out and "Loading replay buffer" in out
    run2 = work / "logs" / "pompc" / "Pendulum-v1_2"
    with open(run1 / "replay_buffer.pkl", "rb") as f:
        buffer1 = pickle.load(f)
    with open(run2 / "replay_buffer.pkl", "rb") as f:
        buffer2 = pickle.load(f)
    assert (buffer1.pos, buffer2.pos) == (200, 280)  # the old rows came back and 80 new ones were added
    np.testing.assert_array_equal(buffer2.observations[:200], buffer1.observations[:200])
    model1, model2 = POMPC.load(run1 / "Pendulum-v1.zip"), POMPC.load(run2 / "Pendulum-v1.zip")
    tiny = dict(arg.split(":") for arg in TINY_ARGS)
    # the first run: the random warm-up (learning_starts), the pretraining burst, then one update per later step
    assert model1._n_updates == int(tiny["pretrain_updates"]) + 200 - int(tiny["learning_starts"])
    # the warm-up and the burst run once per model: the -i run plans at each of its 80 steps and updates after each
    assert not buffer1.has_plan[:int(tiny["learning_starts"])].any() and buffer2.has_plan[200:280].all()
    assert model2._n_updates == model1._n_updates + 80


def test_sac_still_trains_with_the_plugin(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "sac", "--env", "Pendulum-v1", "-n", "200", "--num-threads", "1",
                    "--eval-freq", "-1", "--seed", "0"], tmp_path)
    assert (tmp_path / "logs" / "sac" / "Pendulum-v1_1" / "Pendulum-v1.zip").is_file()


def test_conf_file_with_a_preset(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    """``-conf`` wins over the packaged file, and a yml ``preset: bmpc`` reaches POMPC (λ = ∞, V critic)."""
    entry = {**TINY, "n_timesteps": 60, "policy": "MlpPolicy", "preset": "bmpc", "num_q": None}
    (tmp_path / "my_pompc.yml").write_text(yaml.safe_dump({"Pendulum-v1": entry}))
    out = wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "pompc", "--env", "Pendulum-v1", "-conf", "my_pompc.yml",
                          "--seed", "0", "--eval-freq", "-1", "--num-threads", "1", "--env-kwargs",
                          "max_episode_steps:50"], tmp_path)
    assert "Loading hyperparameters from: my_pompc.yml" in out
    model = POMPC.load(tmp_path / "logs" / "pompc" / "Pendulum-v1_1" / "Pendulum-v1.zip")
    assert model.preset == "bmpc" and model.kl_coef_init == math.inf and model.policy.model.critic_type == "v"
    assert model.num_timesteps == 60 and model._n_updates == 5 + 10


def test_dmc_id_with_a_slash(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "pompc", "--env", "dmc/cartpole-balance-v0", "-n", "60",
                    "--seed", "0", "--eval-freq", "-1", "--num-threads", "1", "--hyperparams", *TINY_ARGS], tmp_path)
    run = tmp_path / "logs" / "pompc" / "dmc-cartpole-balance-v0_1"
    assert (run / "dmc-cartpole-balance-v0.zip").is_file()
    config = yaml.load((run / "dmc-cartpole-balance-v0" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)
    assert config["n_timesteps"] == 500000  # its own entry of the packaged yml


def _journal(path: Path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_optimize_two_trials_and_reuse_a_trial(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    storage = tmp_path / "study.log"
    start = time.perf_counter()
    out = wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "pompc", "--env", "Pendulum-v1", "-n", "200", "--seed", "3",
                          "-optimize", "--n-trials", "2", "--sampler", "tpe", "--pruner", "median", "--eval-episodes",
                          "1", "--no-optim-plots", "--storage", str(storage), "--study-name", "opt", *COMMON], tmp_path)
    print(f"2-trial optimisation: {time.perf_counter() - start:.1f} s")
    assert "Number of finished trials:  2" in out and "Best trial:" in out and "kl_mode:" in out
    assert list((tmp_path / "logs" / "pompc").glob("report_Pendulum-v1_2-trials-200-tpe-median_*.csv"))
    study = optuna.load_study(study_name="opt", storage=_journal(storage))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 and all(math.isfinite(t.value) for t in trials)
    assert all(t.params["kl_mode"] in zoo.KL_MODES and 1 <= t.params["horizon"] <= 5 for t in trials)
    assert all(t.params["num_samples"] in (16, 32, 64) for t in trials)  # searched around --hyperparams num_samples:32

    # train with trial 1's parameters (rl-zoo3 converts them with HYPERPARAMS_CONVERTER["pompc"])
    wheel_venv.run(["-m", "rl_zoo3.train", "--algo", "pompc", "--env", "Pendulum-v1", "-n", "60", "--seed", "4",
                    "--eval-freq", "-1", "--storage", str(storage), "--study-name", "opt", "--trial-id", "1", "-f",
                    "from_trial", *COMMON], tmp_path)
    config = yaml.load((tmp_path / "from_trial" / "pompc" / "Pendulum-v1_1" / "Pendulum-v1" / "config.yml").read_text(),
                       Loader=yaml.UnsafeLoader)
    expected = zoo.convert_pompc_params(study.trials[1].params)
    for key in ("kl_coef", "prior", "critic", "kl_value", "horizon", "learning_rate"):
        assert config[key] == expected[key], key


def test_two_workers_share_one_study(wheel_venv: SimpleNamespace, tmp_path: Path) -> None:
    """Two rl-zoo3 workers started with the same --storage/--study-name run a 4-trial study together."""
    storage_arg, storage = str(tmp_path / "study.log"), _journal(tmp_path / "study.log")
    cmd = [str(wheel_venv.python), "-m", "rl_zoo3.train", "--algo", "pompc", "--env", "Pendulum-v1", "-n", "120",
           "-optimize", "--n-trials", "2", "--sampler", "tpe", "--pruner", "none", "--eval-episodes", "1",
           "--no-optim-plots", "--storage", storage_arg, "--study-name", "shared", *COMMON]
    procs = []
    for worker in (1, 2):
        cwd = tmp_path / f"worker{worker}"
        cwd.mkdir()
        procs.append(subprocess.Popen([*cmd, "--seed", str(worker)], cwd=cwd, env=wheel_venv.env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers  # each worker ran its 2 trials (hostname:pid)
    assert {str(p.pid) for p in procs} == {w.rsplit(":", 1)[1] for w in workers}


#: a worker that waits for the other before it first opens the SQL storage, so that both create the tables at once
_RACE_WORKER = """
import sys, time
from pathlib import Path
import optuna
barrier, name = Path(sys.argv[1]), sys.argv[2]
original = optuna.storages.RDBStorage.__init__
def synchronised(self, *args, **kwargs):
    if not getattr(synchronised, "done", False):
        synchronised.done = True
        (barrier / name).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.002)
    original(self, *args, **kwargs)
optuna.storages.RDBStorage.__init__ = synchronised
from rl_zoo3.train import train
sys.argv = ["rl_zoo3.train", *sys.argv[3:]]
train()
"""


def test_two_workers_start_together_on_a_new_sqlite_file(tmp_path: Path) -> None:
    """Two workers open a new SQLite storage at the same moment: both run their trial (no IntegrityError)."""
    url = f"sqlite:///{tmp_path / 'new_study.db'}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    args = ["--algo", "pompc", "--env", "Pendulum-v1", "-n", "60", "-optimize", "--n-trials", "1", "--sampler",
            "random", "--pruner", "none", "--eval-episodes", "1", "--no-optim-plots", "--storage", url,
            "--study-name", "race", *COMMON]
    procs = []
    for worker in (1, 2):
        cwd = tmp_path / f"worker{worker}"
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", _RACE_WORKER, str(barrier), str(worker), *args,
                                       "--seed", str(worker)], cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
    assert len(list(barrier.iterdir())) == 2  # both reached the storage
    trials = optuna.load_study(study_name="race", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} == {str(p.pid) for p in procs}


#: counts the curves plot_train draws (it only calls plt.show()), for rl-zoo3's own command line
_PLOT_TRAIN = """
import runpy, sys
import matplotlib.pyplot as plt
plt.show = lambda *a, **k: print("CURVES", sum(len(ax.get_lines()) for n in plt.get_fignums()
                                             for ax in plt.figure(n).axes))
sys.argv = ["plot_train", *sys.argv[1:]]
runpy.run_module("rl_zoo3.plots.plot_train", run_name="__main__")
"""


def test_plots_of_a_dmc_run(tmp_path: Path) -> None:
    """rl-zoo3's plot_train and all_plots find a ``dmc/...`` run under its folder name (slash → dash)."""
    env = {**_clean_env(), "MPLBACKEND": "Agg"}
    _check([sys.executable, "-m", "rl_zoo3.train", "--algo", "pompc", "--env", "dmc/cartpole-balance-v0", "-n", "60",
            "--seed", "0", "--eval-freq", "30", "--eval-episodes", "2", "--num-threads", "1", "--env-kwargs",
            "episode_length:20", "--hyperparams", *TINY_ARGS], tmp_path, env)
    assert (tmp_path / "logs" / "pompc" / "dmc-cartpole-balance-v0_1" / "evaluations.npz").is_file()
    out = _check([sys.executable, "-c", _PLOT_TRAIN, "--algo", "pompc", "--env", "dmc-cartpole-balance-v0", "-f",
                  "logs/", "-w", "1"], tmp_path, env)
    assert "CURVES 1" in out  # the training curve of the 3 monitored 20-step episodes
    _check([sys.executable, "-m", "rl_zoo3.plots.all_plots", "--algo", "pompc", "--env", "dmc-cartpole-balance-v0",
            "-f", "logs/", "--no-million", "--no-display", "-o", "results"], tmp_path, env)
    with open(tmp_path / "results.pkl", "rb") as f:
        results = pickle.load(f)["dmc-cartpole-balance-v0"]["POMPC-logs/"]
    assert list(results["timesteps"]) == [30, 60] and np.isfinite(results["mean"]).all()
    # a video on a machine without a display: MUJOCO_GL is chosen when sb3_pompc is imported
    headless = {k: v for k, v in env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL")}
    _check([sys.executable, "-m", "rl_zoo3.record_video", "--algo", "pompc", "--env", "dmc/cartpole-balance-v0", "-f",
            "logs/", "-n", "20", "-o", "videos"], tmp_path, headless)
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1
