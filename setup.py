"""Build step that pyproject.toml cannot express: ship ``sb3_pompc_zoo.pth`` at the root of site-packages.

All metadata lives in pyproject.toml. The ``.pth`` file holds one line, ``import sb3_pompc_zoo_hook``, which makes
``python -m rl_zoo3.train --algo pompc`` work without editing rl-zoo3 (see ``sb3_pompc_zoo_hook.py`` and
``docs/zoo.md``). A file at the root of the wheel's purelib lands in site-packages, so ``build_py`` writes it into
``build_lib``; for an editable install (PEP 660) it writes it into the editable wheel's root instead.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "sb3_pompc_zoo.pth"
PTH_CONTENT = "import sb3_pompc_zoo_hook\n"


class build_py_with_zoo_hook(build_py):
    """``build_py`` that also writes :data:`PTH_NAME` at the root of the build (or of the editable wheel)."""

    def _pth_dir(self) -> str:
        if getattr(self, "editable_mode", False):
            # editable_wheel points install_lib at the unpacked editable wheel (setuptools >= 64)
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self) -> None:
        super().run()
        target = os.path.join(self._pth_dir(), PTH_NAME)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not self.dry_run:
            with open(target, "w", encoding="utf-8") as f:
                f.write(PTH_CONTENT)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_zoo_hook})
