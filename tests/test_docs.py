"""The documentation site: Sphinx builds it with warnings as errors, the pages and the API reference are there, and
the Python examples of the pages run.

A Python example runs in this test when it is written as a ``{code-block} python`` with a ``:name: run-<id>``
option. It runs with tiny settings: every POMPC gets a tiny model and a short warm-up, ``learn`` is capped at a few
hundred steps and every evaluation runs one episode. Every other ``python`` block of the docs must at least compile.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HAVE_SPHINX = all(importlib.util.find_spec(m) is not None for m in ("sphinx", "myst_parser", "sphinx_rtd_theme"))
needs_sphinx = pytest.mark.skipif(not HAVE_SPHINX, reason="sphinx, myst-parser or sphinx-rtd-theme not installed "
                                                           "(pip install '.[docs]')")

RUN_BLOCK = re.compile(r"```\{code-block\} python\n:name: (run-[\w-]+)\n(?::[^\n]*\n)*\n(.*?)\n```", re.S)
PY_BLOCK = re.compile(r"```(?:python|\{code-block\} python)\n((?::[^\n]*\n)*)(.*?)\n```", re.S)
TINY = dict(model_size=None, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=32, num_elites=4,
            num_pi_trajs=2, iterations=2, horizon=3, batch_size=16, learning_starts=100, pretrain_updates=5,
            reanalyze_interval=0)
MAX_STEPS = 250


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def runnable_blocks() -> list[tuple[str, str]]:
    """``(name, code)`` of every block marked for execution, over all pages."""
    return [m.groups() for page in _pages() for m in RUN_BLOCK.finditer(page.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                          str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, f"sphinx -W failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return out


def _text(path: Path) -> str:
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


@needs_sphinx
def test_docs_build_without_warnings(site: Path) -> None:
    for page in ("index", "install", "quickstart", "algorithm", "presets", "zoo", "results", "benchmark", "api",
                 "changelog"):
        assert (site / f"{page}.html").is_file(), f"{page}.html was not rendered"
    if (DOCS / "sweep.md").is_file():
        assert (site / "sweep.html").is_file()
    api = _text(site / "api.html")
    assert re.search(r"class sb3_pompc\.POMPC\(policy: .*env: .*kl_coef", api), "POMPC's signature not in the API page"
    for name in ("POMPCPolicy", "POMPCReplayBuffer", "policy_loss", "MPPIPlanner", "WorldModel", "RunningScale",
                 "load_anchor_curves", "draw_anchor_markers"):
        assert name in api, f"{name} missing from the API reference"
    algorithm = _text(site / "algorithm.html")
    for text in ("Can I use?", "How to replicate", "Parameters", "kl_coef"):
        assert text in algorithm, f"{text!r} missing from the algorithm page"
    assert "Unreleased" in _text(site / "changelog.html")
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in ("install", "quickstart", "algorithm", "presets", "zoo", "results", "benchmark", "api", "changelog"):
        assert f'href="{page}.html"' in index, f"{page} is not in the index's toctree"


def test_docs_python_blocks_compile() -> None:
    count = 0
    for page in _pages():
        for i, m in enumerate(PY_BLOCK.finditer(page.read_text(encoding="utf-8"))):
            compile(m.group(2), f"{page.name}[{i}]", "exec")
            count += 1
    assert count >= 5


def test_docs_history_free() -> None:
    """The docs describe the product: no issue numbers, work sessions or commit hashes."""
    pattern = re.compile(r"\bissue \d|\bsession \d|\bcommit [0-9a-f]{7}|\bclosing notes\b", re.I)
    for page in [*_pages(), ROOT / "README.md"]:
        hits = [line for line in page.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
        assert not hits, f"{page.name}: {hits[:3]}"


@pytest.fixture
def tiny_world(monkeypatch, tmp_path):
    """POMPC with a tiny model, ``learn`` capped at MAX_STEPS steps, one episode per evaluation, cwd in tmp_path."""
    import stable_baselines3.common.evaluation as sb3_evaluation

    import sb3_pompc.callbacks as callbacks
    from sb3_pompc import POMPC

    init, learn, evaluate = POMPC.__init__, POMPC.learn, sb3_evaluation.evaluate_policy

    def tiny_init(self, *args, **kwargs):
        if kwargs.get("_init_setup_model", True):
            kwargs.update(TINY)
            kwargs["verbose"] = 0
        init(self, *args, **kwargs)

    def short_learn(self, total_timesteps, *args, **kwargs):
        kwargs["progress_bar"] = False
        return learn(self, min(int(total_timesteps), MAX_STEPS), *args, **kwargs)

    def one_episode(model, env, n_eval_episodes=10, *args, **kwargs):
        return evaluate(model, env, 1, *args, **kwargs)

    monkeypatch.setattr(POMPC, "__init__", tiny_init)
    monkeypatch.setattr(POMPC, "learn", short_learn)
    monkeypatch.setattr(sb3_evaluation, "evaluate_policy", one_episode)
    monkeypatch.setattr(callbacks, "evaluate_policy", one_episode)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runnable_blocks_are_marked() -> None:
    names = [name for name, _ in runnable_blocks()]
    assert len(names) == len(set(names)), f"duplicate :name: in {names}"
    assert {"run-quickstart", "run-curve", "run-algorithm-example"} <= set(names)


@pytest.mark.parametrize("name, code", runnable_blocks(), ids=[n for n, _ in runnable_blocks()])
def test_docs_example_runs(name: str, code: str, tiny_world: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    namespace = {"__name__": f"docs_{name.replace('-', '_')}"}
    exec(compile(code, name, "exec"), namespace)  # noqa: S102 - the docs' own example
    model = namespace.get("model")
    assert model is not None and 0 < model.num_timesteps <= MAX_STEPS
    saved = {p.name for p in tiny_world.rglob("*") if p.is_file()}
    assert saved, f"{name} wrote nothing"
