"""Sphinx configuration: the pages in docs/, the API reference from the docstrings, notebooks.

Build (warnings are errors): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.

The guides (``docs/guides/``) and the other pages are ordinary Markdown files. A few
pages include a short fragment of the README (its intro, quickstart and notebook
list, between ``<!-- docs:start NAME -->`` and ``<!-- docs:end NAME -->``). At
start-up this file

* copies ``notebooks/*.ipynb`` into ``docs/notebooks/`` (git-ignored), which myst-nb
  renders from their stored outputs without running them;
* checks that every ``docs:start`` marker in the README has its ``docs:end``.

When the build ends it warns (an error under ``-W``) about any public name of
``jax_roialign``, ``jax_roialign.nnx`` or ``jax_roialign.linen`` that no page documents.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import jax_roialign  # noqa: E402
import jax_roialign.linen  # noqa: E402
import jax_roialign.nnx  # noqa: E402

logger = logging.getLogger(__name__)

project = "jax_roialign"
author = "jax_roialign contributors"
copyright = "jax_roialign contributors"
version = release = jax_roialign.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

html_theme = "furo"
html_title = f"jax_roialign {release}"

# Google-style docstrings; type hints shown with the parameters they describe.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True

# Notebooks are rendered from their stored outputs (CI's slow stage executes them).
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
# README fragments may start at "##" headings (the README's "#" is its title).
suppress_warnings = ["myst.header"]

README = ROOT / "README.md"
MARKER = re.compile(r"<!-- docs:(start|end) ([a-z0-9-]+) -->")


def check_readme_markers() -> None:
    """Warns about README fragment markers without their partner."""
    opened: list[str] = []
    names: list[str] = []
    for kind, name in MARKER.findall(README.read_text(encoding="utf-8")):
        if kind == "start":
            if name in names:
                logger.warning("README.md: fragment %r is marked twice", name)
            opened.append(name)
            names.append(name)
        elif name not in opened:
            logger.warning("README.md: <!-- docs:end %s --> without its start", name)
        else:
            opened.remove(name)
    for name in opened:
        logger.warning("README.md: <!-- docs:start %s --> without its end", name)


def copy_notebooks() -> None:
    out = DOCS / "notebooks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(nb, out / nb.name)


def public_names() -> list[str]:
    names = [f"jax_roialign.{n}" for n in jax_roialign.__all__ if n != "__version__"]
    for mod in (jax_roialign.nnx, jax_roialign.linen):
        names += [f"{mod.__name__}.{n}" for n in mod.__all__]
    return names


def check_documented(app, exception) -> None:
    """Every public function and module class must have an autodoc entry."""
    if exception is not None:
        return
    documented = set(app.env.get_domain("py").objects)
    for name in public_names():
        if name not in documented:
            logger.warning("%s is public but no page documents it (add it to docs/api/)", name)


def setup(app):
    copy_notebooks()
    check_readme_markers()
    app.connect("build-finished", check_documented)
