"""Resolve references to maskparam objects by the name they are documented under.

The API reference documents each object under its public name (``maskparam.apply_masks``),
while docstrings refer to it as its own module sees it: a bare ``apply_masks`` inside
``maskparam.model``, or ``maskparam.partial.partial_conv`` from elsewhere. Sphinx looks
those up literally and finds nothing. This resolves such a reference to the one documented
maskparam object with the same last name, and only when there is exactly one.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.nodes import make_refnode


def _resolve(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.reference | None:
    if node.get("refdomain") != "py":
        return None
    target: str = node["reftarget"]
    if "." in target and not target.startswith("maskparam."):
        return None  # another library's name, such as torch.nn.Conv2d
    last = target.rpartition(".")[2]
    objects = env.get_domain("py").objects  # type: ignore[attr-defined]
    matches = [
        name
        for name in objects
        if name.startswith("maskparam.") and name.rpartition(".")[2] == last
    ]
    if len(matches) != 1:
        return None
    entry = objects[matches[0]]
    return make_refnode(
        app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, matches[0]
    )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", _resolve)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
