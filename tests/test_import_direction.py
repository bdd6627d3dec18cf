"""Imports go downward: library modules never import a task module (``tasks``) or a CLI module.

Task modules are imported by the CLIs (``--tasks_module``) and CLI modules sit on top of the
library (docs/architecture.md). The check reads the source with ``ast`` (nothing is imported), so
it also sees imports inside functions and ``importlib.import_module("tasks...")`` calls.
"""

from __future__ import annotations

import ast
import collections
import pathlib

PACKAGE = "lifelong_moe_jax"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
TASK_PACKAGE = "tasks"
CLI_MODULES = frozenset(
  f"{PACKAGE}.{name}"
  for name in (
    "train",
    "infer",
    "surgery",
    "demo",
    "evaluate",
    "run_lifelong",
    "study",
    "model_info",
    "harness",
  )
)
IMPORT_FUNCTIONS = frozenset({"import_module", "__import__"})


def _module_name(path: pathlib.Path, package_dir: pathlib.Path = PACKAGE_DIR) -> str:
  parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _is_cli(module: str) -> bool:
  return module in CLI_MODULES or module.endswith(".__main__")


def _library_files() -> list[pathlib.Path]:
  return sorted(p for p in PACKAGE_DIR.rglob("*.py") if not _is_cli(_module_name(p)))


def _resolve_relative(module: str, path: pathlib.Path, level: int, target: str | None) -> str:
  """The absolute name of ``from <level dots><target> import ...`` inside ``module``."""
  package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
  base = package[: len(package) - (level - 1)]
  return ".".join(base + ([target] if target else []))


def _string_constants(tree: ast.Module) -> dict[str, list[str]]:
  """Module-level ``NAME = "str"`` / ``NAME = ("str", ...)`` assignments."""
  out: dict[str, list[str]] = {}
  for node in tree.body:
    if isinstance(node, ast.Assign):
      targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
      targets, value = [node.target], node.value
    else:
      continue
    strings = _strings(value, {})
    for target in targets:
      if isinstance(target, ast.Name) and strings:
        out[target.id] = strings
  return out


def _strings(node: ast.AST, constants: dict[str, list[str]]) -> list[str]:
  """The string values ``node`` can have: a literal, a tuple/list of them, or a known name."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return [node.value]
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return [s for elt in node.elts for s in _strings(elt, constants)]
  if isinstance(node, ast.Name):
    return constants.get(node.id, [])
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "tasks." + name
    return _strings(node.left, constants)
  if isinstance(node, ast.JoinedStr) and node.values:  # f"tasks.{name}"
    return _strings(node.values[0], constants)
  return []


def imported_modules(
  path: pathlib.Path, package_dir: pathlib.Path = PACKAGE_DIR
) -> list[tuple[int, str]]:
  """(line, absolute module name) of every import in ``path``, including ``from X import y``
  as ``X.y`` and ``importlib.import_module`` / ``__import__`` calls whose argument is a string
  literal or a module-level string constant (also through a ``for`` loop over one)."""
  module = _module_name(path, package_dir)
  tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
  constants = _string_constants(tree)
  for node in ast.walk(tree):  # loop variables over constant tuples: for m in TASK_MODULES
    if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
      strings = _strings(node.iter, constants)
      if strings:
        constants.setdefault(node.target.id, []).extend(strings)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = (
        _resolve_relative(module, path, node.level, node.module)
        if node.level
        else node.module or ""
      )
      found.append((node.lineno, base))
      found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    elif isinstance(node, ast.Call) and node.args:
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if name in IMPORT_FUNCTIONS:
        found += [(node.lineno, s) for s in _strings(node.args[0], constants)]
  return found


def _violation(name: str) -> str | None:
  if name == TASK_PACKAGE or name.startswith(TASK_PACKAGE + "."):
    return "a task module"
  if _is_cli(name):
    return "a CLI module"
  return None


def test_library_modules_import_neither_tasks_nor_cli_modules():
  problems = []
  for path in _library_files():
    for line, name in imported_modules(path):
      kind = _violation(name)
      if kind:
        problems.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {kind}: {name}")
  assert not problems, (
    "Library modules must not import task modules (the CLIs import them via --tasks_module) or "
    "CLI modules (move the shared code into the library):\n  " + "\n  ".join(problems)
  )


def test_no_two_modules_share_a_name():
  by_name = collections.defaultdict(list)
  for path in PACKAGE_DIR.rglob("*.py"):
    if path.name not in ("__init__.py", "__main__.py"):
      by_name[path.name].append(str(path.relative_to(PACKAGE_DIR.parent)))
  duplicates = {name: sorted(paths) for name, paths in by_name.items() if len(paths) > 1}
  assert not duplicates, f"Modules sharing a name (rename one of each): {duplicates}"


def test_the_checker_sees_every_import_form(tmp_path):
  """The AST scan catches plain, from, relative, function-level and importlib imports."""
  fake = tmp_path / PACKAGE
  (fake / "eval").mkdir(parents=True)
  (fake / "__init__.py").write_text("")
  (fake / "eval" / "__init__.py").write_text("")
  source = fake / "eval" / "bad.py"
  source.write_text(
    "import importlib\n"
    "import tasks.fewshot\n"
    "from tasks import corpora\n"
    "from .. import train\n"
    "from lifelong_moe_jax.eval import __main__\n"
    "MODULES = ('tasks.glam_suite', 'os')\n"
    "def f():\n"
    "  from lifelong_moe_jax import infer\n"
    "  importlib.import_module('tasks')\n"
    "  for m in MODULES:\n"
    "    importlib.import_module(m)\n"
    "  __import__('lifelong_moe_jax.demo')\n"
  )
  names = {name for _, name in imported_modules(source, fake)}
  flagged = sorted(n for n in names if _violation(n))
  assert flagged == [
    "lifelong_moe_jax.demo",
    "lifelong_moe_jax.eval.__main__",
    "lifelong_moe_jax.infer",
    "lifelong_moe_jax.train",
    "tasks",
    "tasks.corpora",
    "tasks.fewshot",
    "tasks.glam_suite",
  ]
  assert _violation("lifelong_moe_jax.data.registration") is None
  assert _violation("tasksets") is None
