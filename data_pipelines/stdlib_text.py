"""Extracts English documentation text from the running CPython's standard library.

This file is executed as a *script* in an isolated child interpreter
(``python -I -S stdlib_text.py OUT.jsonl``) by ``data_pipelines.local_corpus``,
so it imports nothing but the standard library, and whatever the imported
modules do on import (print, install handlers, touch the cwd) happens in the
child, not in the caller. It writes one JSON object per line,
``{"id": ..., "source": ..., "text": ...}``, in a deterministic order:

* ``stdlib_docstring``: the docstring of every importable public stdlib module,
  and of the classes, functions and methods it defines, headed by the object's
  qualified name (docstrings shorter than ``MIN_DOCSTRING_CHARS`` are dropped,
  repeated docstrings are kept once).
* ``python_reference``: the language-reference topics that ``help()`` shows
  (``pydoc_data.topics``), one document per topic.
* ``stdlib_source``: the source file of every public pure-Python stdlib module
  that is not blank (English comments and docstrings with the code they
  document).

Modules with side effects on import or that need a GUI/terminal (``SKIPPED``),
private modules (leading underscore), tests and platform-specific modules that
fail to import are skipped.
"""

import importlib
import inspect
import json
import pathlib
import pkgutil
import sys
import sysconfig
import warnings

from pydoc_data import topics

MIN_DOCSTRING_CHARS = 160

# Never imported (side effects on import, GUI/terminal, deprecated tooling,
# installers) nor read as sources.
SKIPPED = frozenset(
  {
    "antigravity",
    "this",
    "tkinter",
    "idlelib",
    "turtle",
    "turtledemo",
    "lib2to3",
    "test",
    "tests",
    "ensurepip",
    "venv",
    "readline",
    "distutils",
    "pydoc_data",
    "site",
    "sitecustomize",
    "usercustomize",
  }
)
# Read as docstrings but not as sources: generated tables, not prose.
NO_SOURCE = frozenset({"encodings"})


def _public(qualified_name: str) -> bool:
  return not any(part in SKIPPED or part.startswith("_") for part in qualified_name.split("."))


def module_names() -> list[str]:
  """Public stdlib modules and their public submodules, sorted."""
  names = []
  for top in sorted(n for n in sys.stdlib_module_names if _public(n)):
    names.append(top)
    try:
      module = importlib.import_module(top)
    except Exception:  # Platform-specific module (winreg, msvcrt, ...).
      continue
    if hasattr(module, "__path__"):
      for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _: None):
        if _public(info.name):
          names.append(info.name)
  return sorted(set(names))


def _object_docs(module_name: str, module) -> list[tuple[str, str]]:
  """(qualified name, docstring) of a module and what it defines."""
  docs = [(module_name, inspect.getdoc(module))]
  for name, obj in inspect.getmembers(module):
    if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
      continue
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
      continue
    qualified = f"{module_name}.{name}"
    docs.append((qualified, inspect.getdoc(obj)))
    if inspect.isclass(obj):
      for attr_name, attr in vars(obj).items():
        if attr_name.startswith("_") and attr_name != "__init__":
          continue
        if isinstance(attr, (classmethod, staticmethod)):
          attr = attr.__func__
        if inspect.isroutine(attr) or isinstance(attr, property):
          docs.append((f"{qualified}.{attr_name}", inspect.getdoc(attr)))
  return docs


def docstring_documents(names: list[str]):
  seen = set()
  for module_name in names:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    except Exception:
      continue
    for qualified, doc in _object_docs(module_name, module):
      if not doc or len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
        continue
      seen.add(doc)
      yield qualified, "stdlib_docstring", f"{qualified}\n\n{doc}"


def reference_documents():
  for name in sorted(topics.topics):
    yield f"reference.{name}", "python_reference", topics.topics[name]


def source_documents():
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for top in sorted(sys.stdlib_module_names):
    if not _public(top) or top in NO_SOURCE:
      continue
    package = stdlib / top
    files = (
      [stdlib / f"{top}.py"]
      if (stdlib / f"{top}.py").is_file()
      else (sorted(package.rglob("*.py")) if package.is_dir() else [])
    )
    for path in files:
      rel = path.relative_to(stdlib)
      module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
      if not _public(module):
        continue
      try:
        text = path.read_text(encoding="utf-8")
      except (OSError, UnicodeDecodeError):
        continue
      if text.strip():  # Some __init__.py files are empty.
        yield f"source.{module}", "stdlib_source", text


def main(out_path: str) -> None:
  with open(out_path, "w", encoding="utf-8") as f:
    for producer in (
      docstring_documents(module_names()),
      reference_documents(),
      source_documents(),
    ):
      for doc_id, source, text in producer:
        f.write(json.dumps({"id": doc_id, "source": source, "text": text}))
        f.write("\n")


if __name__ == "__main__":
  main(sys.argv[1])
