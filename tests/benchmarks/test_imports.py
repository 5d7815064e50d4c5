"""Every ``midms_jax`` / ``configs`` name a benchmark script imports exists (the scripts define absl flags when
imported, so they are read, not imported, here)."""

import ast
import importlib
import importlib.util
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
PACKAGES = ("midms_jax", "configs")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_the_names_a_benchmark_imports_exist(script):
  tree = ast.parse((BENCHMARKS / script).read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] in PACKAGES:
          importlib.import_module(alias.name)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
      module = importlib.import_module(node.module)
      for alias in node.names:
        found = hasattr(module, alias.name)
        found = found or importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
        assert found, f"benchmarks/{script}:{node.lineno}: {node.module} has no {alias.name}"
