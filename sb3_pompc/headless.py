"""An OpenGL backend for MuJoCo on headless machines, chosen before dm_control or MuJoCo is imported.

On Linux without ``DISPLAY``/``WAYLAND_DISPLAY`` and without ``MUJOCO_GL``, importing this module sets
``MUJOCO_GL=egl`` (``osmesa`` when EGL cannot be loaded), as TD-MPC2's training script does; an explicit ``MUJOCO_GL``
is never changed. GLFW's "The DISPLAY environment variable is missing" warning is filtered out (only that message of
the ``glfw`` module). :mod:`sb3_pompc.envs` imports this module first, so importing ``sb3_pompc`` does all of this.

Only the standard library is imported here.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, MutableMapping
from typing import Optional

#: OpenGL libraries tried, in order, for a headless ``MUJOCO_GL`` (backend name, shared libraries to ``dlopen``).
HEADLESS_GL_BACKENDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("egl", ("libEGL.so.1", "libEGL.so")),
    ("osmesa", ("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so")),
)


def _library_loads(names: tuple[str, ...]) -> bool:
    """Whether one of the shared libraries ``names`` can be loaded."""
    import ctypes

    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def select_headless_mujoco_gl(
    environ: Optional[MutableMapping[str, str]] = None,
    platform: Optional[str] = None,
    loads: Callable[[tuple[str, ...]], bool] = _library_loads,
) -> Optional[str]:
    """Set ``MUJOCO_GL`` for a headless Linux machine, before dm_control/MuJoCo is imported (run at import time).

    Nothing changes when ``MUJOCO_GL`` is set, on other platforms, or when ``DISPLAY`` or ``WAYLAND_DISPLAY`` is set.
    Otherwise ``MUJOCO_GL`` becomes the first backend of :data:`HEADLESS_GL_BACKENDS` whose library loads (``egl``,
    then ``osmesa``); with neither, it stays unset and dm_control chooses.

    :param environ: the environment to read and update (default ``os.environ``)
    :param platform: the platform name (default ``sys.platform``)
    :param loads: tells whether one of the given shared libraries can be loaded
    :return: the backend that was set, or ``None`` when nothing was set
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if environ.get("MUJOCO_GL") is not None or not platform.startswith("linux"):
        return None
    if environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"):
        return None
    for backend, libraries in HEADLESS_GL_BACKENDS:
        if loads(libraries):
            environ["MUJOCO_GL"] = backend
            return backend
    return None


select_headless_mujoco_gl()
# dm_control tries GLFW first when MUJOCO_GL is unset, and GLFW warns once per process without an X display
warnings.filterwarnings("ignore", message=r".*The DISPLAY environment variable is missing", category=UserWarning,
                        module=r"glfw(\.|$)")

__all__ = ["HEADLESS_GL_BACKENDS", "select_headless_mujoco_gl"]
