"""Import hook that registers sb3-pompc with rl-zoo3 when (and only when) rl-zoo3 is imported.

``pip install sb3-pompc`` puts ``sb3_pompc_zoo.pth`` into site-packages; its single line ``import sb3_pompc_zoo_hook``
runs at interpreter start-up and calls :func:`install`, which puts a small finder at the front of ``sys.meta_path``.
The finder ignores every import except three rl-zoo3 modules; when one of them has been executed it hands the module
to ``sb3_pompc.zoo``, which patches it in place:

- ``rl_zoo3.utils``: ``ALGOS["pompc"] = POMPC`` (importing ``sb3_pompc`` also registers the ``dmc/...`` env ids,
  before ``rl_zoo3.train`` checks ``--env`` against the Gymnasium registry);
- ``rl_zoo3.hyperparams_opt``: the Optuna sampler and converter of ``pompc``;
- ``rl_zoo3.exp_manager``: the default hyper-parameter file of ``--algo pompc`` is the packaged ``pompc.yml``
  (``-conf pompc_cpu.yml`` names the packaged CPU-sized one), and an SQL ``--storage`` is created safely by
  workers that start together.

This module imports nothing but ``sys`` at start-up (torch, SB3 and rl-zoo3 are only imported by a process that
imports rl-zoo3 itself), so it costs other Python processes a fraction of a millisecond. If registration fails,
rl-zoo3 keeps working for its own algorithms and a ``RuntimeWarning`` says why ``pompc`` is missing.
Without the ``.pth`` file (e.g. an editable install by an old setuptools), ``import sb3_pompc.zoo`` before rl-zoo3
(or ``sb3_pompc.zoo.register()``) does the same.
"""

import sys  # the only import: typing alone would cost ~20 ms at every interpreter start-up

__all__ = ["TARGETS", "ZooImportFinder", "install", "installed"]

#: the rl-zoo3 modules patched after they have been executed (the one list of them; ``sb3_pompc.zoo`` patches each)
TARGETS = ("rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager")


def _patch(name: str, module: object) -> None:
    """Hand a freshly executed rl-zoo3 module to ``sb3_pompc.zoo`` (never raises: rl-zoo3 must keep working)."""
    try:
        from sb3_pompc import zoo

        zoo.patch_module(name, module)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break rl-zoo3's own algorithms
        import warnings

        warnings.warn(
            f"sb3-pompc could not register with rl-zoo3 while importing {name} ({type(exc).__name__}: {exc}); "
            "'--algo pompc' is unavailable, rl-zoo3's own algorithms are unaffected",
            RuntimeWarning,
            stacklevel=2,
        )


class _PatchingLoader:
    """Wraps the real loader of a target module: executes it, then patches it. Everything else is delegated.

    :param loader: the loader found by the other finders
    :param name: the module's full name
    """

    def __init__(self, loader: object, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: object) -> object:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        _patch(self._name, module)

    def __getattr__(self, attr: str) -> object:  # get_code, get_source, get_resource_reader, is_package, ...
        if attr == "_loader":  # not set yet (copy/pickle protocols): no recursion
            raise AttributeError(attr)
        return getattr(self._loader, attr)


class ZooImportFinder:
    """A ``sys.meta_path`` finder that answers only for :data:`TARGETS` (one tuple lookup for any other import).

    It asks the finders behind it for the real spec and wraps its loader in a :class:`_PatchingLoader`.
    """

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in TARGETS:
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, ZooImportFinder) or type(finder).__name__ == "ZooImportFinder":
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader, fullname)
            return spec
        return None

    def invalidate_caches(self) -> None:
        """Nothing cached."""


def installed() -> bool:
    """Whether a :class:`ZooImportFinder` (from any copy of this module) is on ``sys.meta_path``."""
    return any(type(finder).__name__ == "ZooImportFinder" for finder in sys.meta_path)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), and patch the targets that are already imported."""
    if not installed():
        sys.meta_path.insert(0, ZooImportFinder())
    for name in TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _patch(name, module)


install()
