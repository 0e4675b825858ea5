"""The package's imports run one way: no cycle, and no arrow up the layers (ops < models < train; data beside
models, neither importing the other). Read from the source with `ast`, so a function-level import counts as an
arrow too: an import hidden in a function "because it imports us" is the cycle this test exists to catch."""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hico_jax"

# (importer's layer, imported layer) pairs that would point up or across: the layer is the subpackage.
FORBIDDEN = {("ops", "models"), ("ops", "train"), ("ops", "data"), ("models", "train"), ("models", "data"),
             ("data", "models"), ("data", "train")}

# Function-level imports of hico_jax modules that are there on purpose, each with the reason.
DELIBERATELY_LAZY = {
    # `import hico_jax` stays light (data workers import hico_jax.data): the public entry loads the model code
    # only when called.
    ("hico_jax", "hico_jax.api"),
    # Grain workers load their tokenizer in the worker, and a data module must not need jax until batches go
    # to devices.
    ("hico_jax.data.pipeline", "hico_jax.data.tokenizer"),
    ("hico_jax.data.pipeline", "hico_jax.sharding"),
    # Pillow and OpenCV only for prompts with images (api.py says so).
    ("hico_jax.api", "hico_jax.data.image"),
    ("hico_jax.api", "hico_jax.data.video"),
    # The stage sequence parses its flags before it loads the trainer.
    ("hico_jax.train.default", "hico_jax.train.evaluate"),
    ("hico_jax.train.default", "hico_jax.train.trainer"),
    # An evaluation from the downloads needs neither TFDS nor array_record (the GPU hosts have no array_record);
    # only --tfds_dir loads them.
    ("hico_jax.eval.sources", "hico_jax.eval.tfds_benchmarks"),
}


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
  """-> ({module: modules of hico_jax it imports}, {(module, imported) made inside a function})."""
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  edges, lazy = collections.defaultdict(set), set()
  for name, path in files.items():
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
      else:
        continue
      for target in targets:
        if target.split(".")[0] != "hico_jax":
          continue
        while target not in files:
          target = target.rpartition(".")[0]
        if target != name:
          edges[name].add(target)
          if id(node) not in top_level:
            lazy.add((name, target))
  return {name: edges.get(name, set()) for name in files}, lazy


def _cycles(edges):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def _layer(module: str) -> str:
  return module.split(".")[1] if module.count(".") else module


def test_import_graph_has_no_cycle():
  edges, _ = import_graph()
  assert _cycles(edges) == []        # the root's lazy import of api included: nothing under api imports the root


def test_imports_never_point_up_the_layers():
  edges, _ = import_graph()
  upward = sorted((m, t) for m, targets in edges.items() for t in targets if (_layer(m), _layer(t)) in FORBIDDEN)
  assert upward == []


def test_function_level_imports_of_the_package_are_only_the_deliberate_ones():
  """Besides the list, the command-line programs (hico_jax/cli) load the model stack after parsing their
  arguments, so that --help and argument errors answer at once."""
  _, lazy = import_graph()
  lazy = {(m, t) for m, t in lazy if _layer(m) != "cli"}
  assert lazy <= DELIBERATELY_LAZY, sorted(lazy - DELIBERATELY_LAZY)


def test_the_graph_sees_a_cycle_and_an_upward_arrow():
  """The checks above can fail: the reader finds the arrows a hand count gives on a known file."""
  edges, lazy = import_graph()
  assert {"hico_jax.ops.attention_blocks", "hico_jax.ops.ring_attention"} <= edges["hico_jax.ops.attention"]
  assert ("hico_jax", "hico_jax.api") in lazy
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _layer("hico_jax.models.qwen2") == "models" and ("models", "train") in FORBIDDEN
