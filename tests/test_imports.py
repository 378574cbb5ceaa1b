"""No import cycle: the package's import graph (function-level imports included) is acyclic, and every module
imports on its own in dependency order, each in a fresh interpreter state; the accelerator extras install JAX's
build for their accelerator."""
import ast
import os
import subprocess
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "eejax")


def modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
  return out


def imports_of(path: str, known) -> set[str]:
  """eejax modules `path` imports anywhere in its body (from eejax.x import y counts y if y is a module)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eejax"):
      subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
      found |= subs or ({node.module} & set(known))
  return found


def test_the_import_graph_has_no_cycle_and_every_module_imports_in_that_order():
  known = modules()
  graph = {m: imports_of(p, known) - {m} for m, p in known.items()}
  order, state = [], {}

  def visit(m, path):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
    state[m] = "open"
    for d in sorted(graph[m]):
      visit(d, path + [m])
    state[m] = "done"
    order.append(m)

  for m in sorted(graph):
    visit(m, [])
  assert {"eejax.run", "eejax.train", "eejax.bts", "eejax.schemes.erde", "eejax.api"} <= set(order)
  assert order.index("eejax.run") < order.index("eejax.train") and order.index("eejax.bts") < order.index("eejax.api")
  assert "eejax.train" not in graph["eejax.bts"] | graph["eejax.boosted"]  # BTS-EE never imports the loop back
  code = "import importlib, sys\nfor m in sys.argv[1:]:\n  importlib.import_module(m)\nprint('ok', len(sys.argv) - 1)"
  r = subprocess.run([sys.executable, "-c", code, *order], cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_the_accelerator_extras_name_extras_this_jax_declares():
  """`pip install -e '.[cuda13]'` (or cuda12, tpu) installs JAX's build for that accelerator: each is jax[NAME], and
  the installed jax declares NAME. pip only warns on an extra a package lacks and installs plain, CPU-only jax."""
  import tomllib  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  accelerators = {name: reqs for name, reqs in extras.items() if any(r.startswith("jax[") for r in reqs)}
  assert sorted(accelerators) == ["cuda12", "cuda13", "tpu"]
  declared = set(metadata.metadata("jax").get_all("Provides-Extra"))
  for name, reqs in accelerators.items():
    assert reqs == [f"jax[{name}]"] and name in declared, (name, reqs)
