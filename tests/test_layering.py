"""The package's import graph: no cycles, and the layers import downwards only.

Every `import` and `from ... import` statement counts, at module level or inside a
function: an import moved into a function to dodge a cycle is still a cycle here.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "decoder_jax"


def module_files() -> dict[str, pathlib.Path]:
  """'decoder_jax.train.loop' -> its file, for every module of the package."""
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  """module -> the package's modules it imports (the most specific module named: `from
  decoder_jax.model import Decoder` is an edge to decoder_jax.model)."""
  modules = module_files()

  def resolve(name: str) -> str | None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for module, path in modules.items():
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names += [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names += [f"{node.module}.{alias.name}" for alias in node.names]
    graph[module] = {target for name in names if name.startswith("decoder_jax")
                     if (target := resolve(name)) not in (None, module)}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (a depth-first search)."""
  done, on_path = set(), []

  def visit(node):
    if node in on_path:
      return on_path[on_path.index(node):] + [node]
    if node in done:
      return None
    on_path.append(node)
    for target in sorted(graph[node]):
      if (cycle := visit(target)) is not None:
        return cycle
    on_path.pop()
    done.add(node)
    return None

  for node in sorted(graph):
    if (cycle := visit(node)) is not None:
      return cycle
  return None


def reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo += graph[node]
  return seen


def test_the_import_graph_has_no_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
  graph = import_graph()
  graph["decoder_jax.model.config"] = graph["decoder_jax.model.config"] | {"decoder_jax.train.loop"}
  cycle = find_cycle(graph)
  assert cycle is not None and cycle[0] == cycle[-1]
  assert {"decoder_jax.model.config", "decoder_jax.train.loop"} <= set(cycle)


@pytest.mark.parametrize("lower", ["decoder_jax.inference", "decoder_jax.pretrained",
                                   "decoder_jax.evaluation.finetuned",
                                   "decoder_jax.evaluation.task_eval", "decoder_jax.workdir",
                                   "decoder_jax.serving.app"])
def test_inference_and_evaluation_import_nothing_from_train(lower):
  reached = reachable(import_graph(), lower)
  assert not [m for m in reached if m.startswith("decoder_jax.train")], sorted(reached)


def test_decoding_imports_no_model_code():
  graph = import_graph()
  for module in [m for m in graph if m.startswith("decoder_jax.decoding")]:
    reached = reachable(graph, module)
    assert not [m for m in reached if m.startswith("decoder_jax.model")], (module, reached)


def test_importing_inference_loads_no_training_module():
  """The same at run time: what `import decoder_jax.inference` puts in sys.modules."""
  code = ("import sys, decoder_jax.inference, decoder_jax.decoding\n"
          "print(' '.join(m for m in sys.modules if m.startswith('decoder_jax.')))")
  loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  assert "decoder_jax.inference" in loaded
  assert not [m for m in loaded if m.startswith("decoder_jax.train")], loaded
