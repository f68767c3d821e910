"""The package's import graph: no cycles, no import from a lower layer up.

The graph is read from the source (``ast``: every ``import`` statement,
module-level or inside a function), edges to the modules named; a package
is not taken to import its submodules unless its ``__init__`` says so.
"""

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "slkd_jax"


#: Modules a layer must not import (directly): each layer's uppers.
UPPER = {
    "slkd_jax.methods": ("slkd_jax.stage", "slkd_jax.train_step",
                         "slkd_jax.config", "slkd_jax.train", "slkd_jax.fit"),
    # The steps and the state know nothing of the loop that runs them.
    "slkd_jax.train_step": ("slkd_jax.fit", "slkd_jax.train",
                            "slkd_jax.studies", "slkd_jax.plan"),
    "slkd_jax.studies": ("slkd_jax.fit", "slkd_jax.train", "slkd_jax.plan"),
    "slkd_jax.step_parts": ("slkd_jax.methods", "slkd_jax.stage",
                            "slkd_jax.train_step"),
    "slkd_jax.state": ("slkd_jax.methods", "slkd_jax.stage",
                       "slkd_jax.train_step", "slkd_jax.step_parts"),
    "slkd_jax.losses": ("slkd_jax.methods", "slkd_jax.stage",
                        "slkd_jax.train_step", "slkd_jax.step_parts"),
    "slkd_jax.feature_losses": ("slkd_jax.methods", "slkd_jax.stage",
                                "slkd_jax.train_step", "slkd_jax.step_parts"),
    "slkd_jax.models": ("slkd_jax.methods", "slkd_jax.stage",
                        "slkd_jax.train_step", "slkd_jax.step_parts",
                        "slkd_jax.losses", "slkd_jax.feature_losses"),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
  """Module → the package modules it imports."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names if a.name in modules)
      elif isinstance(node, ast.ImportFrom) and node.module in modules:
        for alias in node.names:
          sub = f"{node.module}.{alias.name}"
          edges.add(sub if sub in modules else node.module)
    graph[name] = edges - {name}
  return graph


def cycles(graph: dict[str, set[str]], nodes) -> list[list[str]]:
  """The import cycles among ``nodes`` (one path per cycle found by DFS)."""
  nodes, found, state = set(nodes), [], {}

  def visit(n, path):
    state[n] = "open"
    for m in sorted(graph[n] & nodes):
      if state.get(m) == "open":
        found.append(path[path.index(m):] + [m])
      elif m not in state:
        visit(m, path + [m])
    state[n] = "done"

  for n in sorted(nodes):
    if n not in state:
      visit(n, [n])
  return found


def _in(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_every_module_imports():
  # Not the command-line entry points: each defines its absl flags on
  # import and runs alone in its process (python -m slkd_jax.<name>).
  for name, path in sorted(_modules().items()):
    if "flags.DEFINE" not in path.read_text():
      importlib.import_module(name)


def test_no_import_cycle():
  graph = import_graph()
  assert "slkd_jax.methods.base" in graph and "slkd_jax.fit" in graph
  assert cycles(graph, graph) == []


@pytest.mark.parametrize("layer", sorted(UPPER))
def test_no_import_from_a_lower_layer_up(layer):
  graph = import_graph()
  bad = {n: sorted(m for m in graph[n] if any(_in(m, u) for u in UPPER[layer]))
         for n in graph if _in(n, layer)}
  assert {n: m for n, m in bad.items() if m} == {}


def test_the_graph_sees_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "abc") == [
      ["a", "b", "c", "a"]]
