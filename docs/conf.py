"""Sphinx configuration for the optax-gsm API reference.

Build (warnings are errors, as in CI)::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

The API pages are ``docs/api/*.rst``: one ``autosummary`` list per group, each
entry generating a page under ``docs/api/generated/`` (not committed). A
build fails when a name in the ``__all__`` of a public module of
``optax_gsm`` is on no page (see ``_check_api_coverage`` below), so a new
export needs a line in one of the lists.
"""

import importlib
import inspect
import os
import pkgutil
import sys

sys.path.insert(0, os.path.abspath(".."))

import optax_gsm  # noqa: E402

from sphinx.pycode import ModuleAnalyzer  # noqa: E402
from sphinx.util import logging  # noqa: E402

project = "optax-gsm"
author = "optax-gsm contributors"
copyright = "optax-gsm contributors"  # noqa: A001
release = optax_gsm.__version__
version = release

master_doc = "index"
extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
exclude_patterns = ["_build"]

# Google-style docstrings (Args, Returns, Raises, Example, References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# ``Attributes:`` of NamedTuples and dataclasses as a field list of the
# class, so that they are not a second description of the fields.
napoleon_use_ivar = True
# ... without the annotations' types (as the signatures, see below).
napoleon_attr_annotations = False

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {
  "member-order": "bysource",
  "exclude-members": "__repr__, __str__, __weakref__, __init__, __new__",
}
# Signatures without annotations: the docstrings say what each argument is,
# and the library's type aliases (schedules, pytrees) would be printed
# expanded in full.
autodoc_typehints = "none"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_title = f"optax-gsm {release}"
html_static_path = []

_LOG = logging.getLogger(__name__)


def _skip_member(app, what, name, obj, skip, options):
  """Skips the generated field accessors of NamedTuples."""
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  if doc.startswith("Alias for field number"):
    return True
  return skip


def _defining_comment(fullname, obj):
  """The ``#:`` comment of a re-exported constant, in the module that sets it.

  autodoc reads ``#:`` comments from the module a name is documented under
  (``optax_gsm``), not from the one that assigns it (``optax_gsm.transform``).
  """
  package, _, attr = fullname.rpartition(".")
  for module in _public_modules(include_private=True):
    if module.__name__ == package or not module.__name__.startswith(package):
      continue
    if getattr(module, attr, None) is not obj:
      continue
    try:
      docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
    except Exception:  # pylint: disable=broad-except
      continue
    if ("", attr) in docs:
      return list(docs[("", attr)])
  return []


def _constant_docstring(app, what, name, obj, options, lines):
  """Documents a constant by its ``#:`` comment, never by its type's docstring.

  Without a comment autodoc would describe, say, a tuple by ``tuple.__doc__``.
  """
  del app, options
  if what not in ("data", "attribute"):
    return
  type_doc = (type(obj).__doc__ or "").strip().splitlines()
  if lines and type_doc and lines[0].strip() == type_doc[0].strip():
    lines.clear()
  if not lines:
    lines.extend(_defining_comment(name, obj))


def _public_modules(include_private=False):
  """The public modules of ``optax_gsm`` (no ``_`` in their dotted name)."""
  yield optax_gsm
  for info in pkgutil.walk_packages(optax_gsm.__path__, "optax_gsm."):
    if not include_private and any(part.startswith("_") for part in info.name.split(".")):
      continue
    yield importlib.import_module(info.name)


def _resolve(fullname):
  module, _, attr = fullname.rpartition(".")
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError):
    return None


def _check_api_coverage(app, env):
  """Warns (an error under ``-W``) for each export that is on no API page.

  An export is a name in the ``__all__`` of a public module; it is covered
  when the same object is documented under any name (``optax_gsm.gsm`` covers
  ``optax_gsm.transform.gsm`` too).
  """
  del app
  documented = env.get_domain("py").objects
  covered = set()
  for fullname in documented:
    obj = _resolve(fullname)
    if obj is not None:
      covered.add(id(obj))
  missing = []
  for module in _public_modules():
    for name in getattr(module, "__all__", ()):
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      if f"{module.__name__}.{name}" not in documented and id(obj) not in covered:
        missing.append(f"{module.__name__}.{name}")
  for fullname in sorted(missing):
    _LOG.warning(
      "%s is exported but on no page of docs/api/: add it to an autosummary list",
      fullname,
      type="optax_gsm",
      subtype="api",
    )


def setup(app):
  app.connect("autodoc-skip-member", _skip_member)
  app.connect("autodoc-process-docstring", _constant_docstring)
  app.connect("env-check-consistency", _check_api_coverage)
