"""A ``code-figure`` directive: show Python code, run it at build time, embed its figures.

Every ``code-figure`` block of a page runs in order in one namespace for that page, so a
block may use what an earlier block defined. The figures a block leaves open (matplotlib,
``maskparam.plot.plot_mask``) are saved as PNG files under ``docs/_generated/`` and shown
below its code, then closed. A block that raises fails the build with its traceback.

tests/test_docs.py runs the same blocks the same way, which is why a page that uses
``code-figure`` holds no plain ``python`` blocks: Sphinx runs only ``code-figure`` blocks,
and a plain block between them would run in the tests but not in the build.

Usage in a MyST page::

    ```{code-figure}
    :alt: A 3x3x3 cross.

    plot_mask(masks.cross(3, ndim=3))
    ```
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display at build time

import matplotlib.pyplot as plt
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

GENERATED = "_generated"
_NAMESPACE = "code_figure_namespace"
_COUNT = "code_figure_count"


class CodeFigure(SphinxDirective):
    """Show the code, run it in the page's namespace, and embed the figures it opens."""

    has_content = True
    option_spec: ClassVar[dict[str, Any]] = {
        "alt": directives.unchanged,
        "width": directives.length_or_percentage_or_unitless,
    }

    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        docname = self.env.docname
        namespace = self.env.temp_data.setdefault(_NAMESPACE, {"__name__": "__docs__"})
        index = self.env.temp_data.get(_COUNT, 0)
        self.env.temp_data[_COUNT] = index + 1

        block = nodes.literal_block(code, code, language="python")
        self.set_source_info(block)
        plt.close("all")
        try:
            exec(compile(code, f"<{docname}.md, code-figure {index + 1}>", "exec"), namespace)
        except Exception:
            plt.close("all")
            raise self.error(
                f"code-figure {index + 1} of {docname} raised:\n{traceback.format_exc()}"
            ) from None

        out: list[nodes.Node] = [block]
        folder = Path(self.env.srcdir) / GENERATED
        folder.mkdir(exist_ok=True)
        stem = docname.replace("/", "-")
        for number in plt.get_fignums():
            name = f"{stem}-{index + 1}-{number}.png"
            plt.figure(number).savefig(folder / name, dpi=110, bbox_inches="tight")
            image = nodes.image(uri=f"/{GENERATED}/{name}", alt=self.options.get("alt", ""))
            if "width" in self.options:
                image["width"] = self.options["width"]
            out.append(image)
        plt.close("all")
        return out


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("code-figure", CodeFigure)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
