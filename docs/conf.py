"""Sphinx configuration: MyST pages, autodoc with napoleon, the furo theme, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import maskparam

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "maskparam"
author = "maskparam developers"
copyright = "maskparam developers"
version = release = maskparam.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "code_figure",
    "public_names",
]
# No intersphinx: the build must not fetch anything. References to torch stay plain text.

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Nitpicky: a reference to anything of maskparam that does not exist fails the build.
# Without intersphinx, other libraries' names cannot resolve; they stay plain text.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|matplotlib|numpy|typing|collections|os|pathlib|fnmatch)(\..*)?"),
    (r"py:.*", r"(Tensor|nn\.Module|Axes|Figure|TypeAlias|Literal)"),
    (r"py:.*", r"(int|float|bool|str|bytes|tuple|list|dict|set|object|type|None|Any)"),
]

html_theme = "furo"
html_title = f"maskparam {release}"
html_static_path: list[str] = []
