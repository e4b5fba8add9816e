"""Sphinx configuration of the sb3-pompc documentation (Markdown pages through MyST).

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (``pip install ".[docs]"``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the checkout's package, when it is not installed

os.environ.setdefault("MUJOCO_GL", "egl")

import sb3_pompc  # noqa: E402

project = "sb3-pompc"
author = "The sb3-pompc authors"
copyright = "2026, The sb3-pompc authors"
version = release = sb3_pompc.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autoclass_content = "class"

html_theme = "sphinx_rtd_theme"
html_title = f"sb3-pompc {release}"
html_static_path: list[str] = []

# Pages of the toctree that may not be written yet: left out of the build until their file exists.
OPTIONAL_PAGES = ("sweep",)


def _drop_missing_optional_pages(app, docname: str, source: list[str]) -> None:
    if docname != root_doc:
        return
    for page in OPTIONAL_PAGES:
        if not (DOCS / f"{page}.md").is_file():
            source[0] = re.sub(rf"(?m)^{page}\n", "", source[0])


def _escape_bars(app, what: str, name: str, obj, options, lines: list[str]) -> None:
    """Docstrings write conditionals as in the papers, ``π(·|z)``; outside inline literals reStructuredText would
    read ``|z...`` as the start of a substitution, so bars there are escaped."""
    text = "\n".join(lines)
    if "|" not in text:
        return
    parts = text.split("``")
    for i in range(0, len(parts), 2):  # even parts lie outside ``inline literals``
        parts[i] = parts[i].replace("|", "\\|")
    lines[:] = "``".join(parts).split("\n")


def setup(app) -> None:
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("autodoc-process-docstring", _escape_bars)
