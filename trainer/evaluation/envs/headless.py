"""dm_control without its noise on a machine without a display (a cluster node, a CI runner).

Two sources of stderr lines, each handled where it arises:

- The OpenGL backend. dm_control picks it when first imported: with `MUJOCO_GL` unset it
  tries GLFW first, which without a display prints "GLFWError: X11: The DISPLAY environment
  variable is missing" before falling back to EGL or OSMesa. `choose_gl_backend()` (called
  by `trainer.evaluation.envs` before it imports dm_control) names the headless backend dm_control
  would fall back to, so GLFW is never tried: EGL if libEGL is installed, else OSMesa if
  libOSMesa is, else "off" (dm_control's no-renderer: stepping works, rendering raises).
  A `MUJOCO_GL` given by the user is always kept, and so is everything on a machine with a
  display.
- MuJoCo's compiler deprecation notices. dm_control's shipped cheetah.xml uses
  `<compiler settotalmass=...>`, and compiling it logs "compiler attribute 'settotalmass' is
  deprecated ..." through absl for every cheetah env. The model must stay as shipped (the
  tasks are the official ones), so `mujoco_deprecations_silenced()` drops exactly those
  notices from the absl logger while an env is built; every other log line still shows.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import logging
import os
import re
import sys
from collections.abc import Iterator

GL_VARIABLE = "MUJOCO_GL"
_DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY")
_HEADLESS_LIBRARIES = (("egl", "EGL"), ("osmesa", "OSMesa"))  # dm_control's fallback order
_DEPRECATION = re.compile(r"compiler attribute '\w+' is deprecated")


def headless_backend() -> str:
    """The backend dm_control falls back to without a display: egl, osmesa or off."""
    for backend, library in _HEADLESS_LIBRARIES:
        if ctypes.util.find_library(library):
            return backend
    return "off"


def choose_gl_backend() -> str | None:
    """Set `MUJOCO_GL` to the headless backend on a Linux machine without a display, unless
    the user set it; returns the value set (None: left as it was)."""
    has_display = any(os.environ.get(name) for name in _DISPLAY_VARIABLES)
    if GL_VARIABLE in os.environ or has_display or not sys.platform.startswith("linux"):
        return None
    os.environ[GL_VARIABLE] = headless_backend()
    return os.environ[GL_VARIABLE]


class _DropDeprecations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DEPRECATION.match(record.getMessage())


@contextlib.contextmanager
def mujoco_deprecations_silenced() -> Iterator[None]:
    """While the block runs, the absl logger drops MuJoCo's "compiler attribute '...' is
    deprecated" notices (dm_control logs MuJoCo's warnings through absl)."""
    absl_logger, drop = logging.getLogger("absl"), _DropDeprecations()
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)
