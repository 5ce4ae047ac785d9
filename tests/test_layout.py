"""The layout rules of the README's Layout section, checked on the source (ast), not by convention.

  * the library (bagpiper_jax) never imports the offline tools, launch, configs or tests; the
    training command line (bagpiper_jax.train) alone calls the demo generator of data_pipeline;
  * model files import only the model package and the batch contract (logical axes, no meshes);
  * no import cycle between modules;
  * no private module of a third-party library (`_src`, `_internal`, ...);
  * imports sit at the top of the module; inside functions only the optional heavy dependencies
    (torch, transformers, libtpu), each with a comment saying why.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("bagpiper_jax", "data_pipeline", "launch", "configs")
OFFLINE = ("data_pipeline", "launch", "configs", "tests")
# Library modules that are command lines and may call an offline tool (the README main command
# generates the demo data).
ENTRY_POINT_IMPORTS = {"bagpiper_jax.train": {"data_pipeline.demo"}}
LAZY_OK = ("torch", "transformers", "libtpu", "safetensors.torch")


def _modules():
  out = {}
  for pkg in PACKAGES:
    for root, _, files in os.walk(os.path.join(REPO, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(root, f)
          rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = _modules()


def _imports(path):
  """[(imported module, lineno, at top level, source line)]."""
  src = open(path).read()
  lines = src.splitlines()
  tree = ast.parse(src)
  top = {id(n) for n in tree.body}
  for n in tree.body:  # `if __name__ == "__main__":` and try/except blocks at module level count as top
    if isinstance(n, (ast.If, ast.Try)):
      top |= {id(c) for c in ast.walk(n) if isinstance(c, (ast.Import, ast.ImportFrom))}
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
               for a in node.names]
    for name in names:
      out.append((name, node.lineno, id(node) in top, lines[node.lineno - 1]))
  return out


def _internal(name):
  """The module of ours that `name` is (or is inside), else None."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


GRAPH = {m: {(_internal(n), top) for n, _, top, _ in _imports(p) if _internal(n) and _internal(n) != m}
         for m, p in MODULES.items()}


def test_the_library_never_imports_the_offline_tools():
  bad = []
  for m, deps in GRAPH.items():
    if not m.startswith("bagpiper_jax"):
      continue
    allowed = ENTRY_POINT_IMPORTS.get(m, set())
    bad += [f"{m} -> {d}" for d, _ in deps if d.startswith(OFFLINE) and d not in allowed]
  assert not bad, bad


def test_model_files_import_only_the_model_and_the_batch_contract():
  bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("bagpiper_jax.model")
         for d, _ in deps if not (d.startswith("bagpiper_jax.model") or d == "bagpiper_jax.batch")]
  assert not bad, bad


def test_no_import_cycles():
  edges = {m: {d for d, top in deps if top} for m, deps in GRAPH.items()}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(edges.get(m, ())):
      if d == m.rpartition(".")[0]:
        continue  # a module importing its own package's __init__ is not a cycle of modules
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, cycles


# Modules whose imports are being reworked on another branch. Strict: once fixed, the xfail turns into a
# failure and the entry must go.
_IN_FLIGHT: set[str] = set()

# Private modules with no public counterpart, each used by ONE function with a comment naming the version
# and a test that fails on an upgrade: module -> (private module, that test).
# None now: flop_count's dead-code elimination, the one there was, is its own liveness pass over the public
# jaxpr API.
_ISOLATED_PRIVATE: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="imports reworked on another branch"))
    if m in _IN_FLIGHT else m for m in sorted(MODULES)])
def test_imports_are_public_and_at_the_top(module):
  bad = []
  for name, line, top, text in _imports(MODULES[module]):
    if _internal(name):
      if not top:
        bad.append(f"line {line}: function-level import of our own module {name}")
      continue
    parts = name.split(".")
    isolated = _ISOLATED_PRIVATE.get(module, ("",))[0] == name
    if any(p.startswith("_") for p in parts[1:]) and name != "__future__" and not isolated:
      bad.append(f"line {line}: private module {name}")
    if not top and not (name.startswith(LAZY_OK) and "#" in text):
      bad.append(f"line {line}: function-level import of {name} (only {LAZY_OK} may be lazy, with a "
                 "comment saying why)")
  assert not bad, f"{module}:\n  " + "\n  ".join(bad)


def test_isolated_private_imports_are_one_call_each_with_their_guard_test():
  for module, (private, guard) in _ISOLATED_PRIVATE.items():
    text = open(MODULES[module]).read()
    alias = [t for n, _, _, t in _imports(MODULES[module]) if n == private]
    assert len(alias) == 1, (module, private)
    short = alias[0].split(" as ")[-1].split("#")[0].strip() if " as " in alias[0] else private
    assert len(re.findall(rf"\b{re.escape(short)}\.", text)) == 1, f"{module}: {private} used more than once"
    path, _, test = guard.partition("::")
    assert f"def {test}(" in open(os.path.join(REPO, path)).read(), guard
