"""The notebooks run top to bottom at tiny sizes, and are committed clean.

Dependency-free (no nbclient / ipykernel / papermill): each notebook's code cells are exec'd in one
namespace in a fresh Python process (this file run as a script) with 8 fake CPU devices. Papermill
style, the values in `TINY` are assigned right after the cell tagged "parameters". Shell and magic
lines (`!pip ...`, `%cd`) are replaced by `pass`: the notebooks guard them to run on Colab only.
Where IPython is not installed (the test environment has no Jupyter), `from IPython.display import
Image, display` is replaced by stand-ins that check the image file exists.

    python tests/test_notebooks.py notebooks/quickstart.ipynb '{"num_iterations": 2}'
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COLAB = "https://colab.research.google.com/github/real-jax/real_jax/blob/main/notebooks/"
INSTALL = '!pip install -q "git+https://github.com/real-jax/real_jax"'

# Parameter overrides per notebook (workdirs are added by the test, under tmp_path).
TINY = {
    "quickstart.ipynb": {"num_iterations": 2, "sft_warmup_steps": 0, "batch_size": 16, "search_budget_s": 1.0},
    "plan_search.ipynb": {"search_budget_s": 1.0},
    "hf_models.ipynb": {"new_tokens": 4},
}
OUT_DIRS = {"quickstart.ipynb": "workdir", "plan_search.ipynb": "outdir", "hf_models.ipynb": "export_dir"}


def load(path) -> dict:
  with open(path) as f:
    return json.load(f)


def source(cell: dict) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def runnable(src: str) -> str:
  """The cell's Python: IPython shell / magic lines become `pass` (same indentation)."""
  lines = []
  for line in src.splitlines():
    stripped = line.lstrip()
    lines.append(line[:len(line) - len(stripped)] + "pass" if stripped.startswith(("!", "%")) else line)
  return "\n".join(lines)


class _Image:
  """Stands in for IPython.display.Image where IPython is not installed: checks the file exists."""

  def __init__(self, filename=None, **kw):
    if filename is not None and not os.path.exists(filename):
      raise FileNotFoundError(filename)
    self.filename = filename


def _display(*objs, **kw) -> None:
  print("[display]", *(getattr(o, "filename", o) for o in objs))


def execute(path: str, params: dict) -> None:
  """Runs the notebook's code cells in order in one namespace; `params` after the parameters cell."""
  nb = load(path)
  ns: dict = {"__name__": "__main__"}
  try:
    import IPython.display  # noqa: F401
    stub = False
  except ImportError:  # Plain Python: `from IPython.display import Image, display` becomes stand-ins.
    stub = True
    ns.update(Image=_Image, display=_display)
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    t0 = time.perf_counter()
    src = runnable(source(cell))
    if stub:
      src = re.sub(r"(?m)^(\s*)from IPython\.display import .*$", r"\1pass", src)
    exec(compile(src, f"{os.path.basename(path)}[cell {i}]", "exec"), ns)
    if "parameters" in cell.get("metadata", {}).get("tags", []):
      ns.update(params)
    print(f"[notebook] cell {i}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


# -- tests ------------------------------------------------------------------------------------------

if __name__ != "__main__":
  import pytest
  from conftest import cache_env

  NAMES = sorted(TINY)

  def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES

  @pytest.mark.parametrize("name", NAMES)
  def test_committed_clean(name):
    """No outputs, no execution counts: notebooks are committed as source."""
    nb = load(NOTEBOOKS / name)
    for i, cell in enumerate(nb["cells"]):
      if cell["cell_type"] == "code":
        assert cell.get("outputs") == [], f"{name} cell {i} has outputs"
        assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"

  @pytest.mark.parametrize("name", NAMES)
  def test_badge_install_parameters(name):
    """Colab badge to this notebook, a Colab-only install cell, one parameters cell with the tested keys."""
    nb = load(NOTEBOOKS / name)
    assert COLAB + name in source(nb["cells"][0])
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    install = source(code[0])
    assert INSTALL in install and 'if "google.colab" in sys.modules:' in install
    assert all(not line.lstrip().startswith(("!", "%")) for c in code[1:] for line in source(c).splitlines())
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{name}: expected one cell tagged 'parameters'"
    ns: dict = {}
    exec(source(params[0]), ns)
    assert set(TINY[name]) | {OUT_DIRS[name]} <= set(ns), f"{name}: parameters cell lacks tested keys"

  @pytest.mark.parametrize("name", NAMES)
  def test_imports_never_defines(name):
    """Notebooks call the library (STYLE.md): no functions, lambdas or classes of their own."""
    import ast
    for i, cell in enumerate(load(NOTEBOOKS / name)["cells"]):
      if cell["cell_type"] == "code":
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        found = [type(n).__name__ for n in ast.walk(ast.parse(runnable(source(cell)))) if isinstance(n, kinds)]
        assert not found, f"{name} cell {i} defines {found}: move it into the library"

  @pytest.mark.slow
  @pytest.mark.parametrize("name", NAMES)
  def test_runs(name, tmp_path):
    params = dict(TINY[name], **{OUT_DIRS[name]: str(tmp_path / "out")})
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(cache_env())  # This run's compilation cache (tests/conftest.py): one process, 8 devices.
    proc = subprocess.run([sys.executable, __file__, str(NOTEBOOKS / name), json.dumps(params)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert list((tmp_path / "out").iterdir()), f"{name} wrote nothing into {params[OUT_DIRS[name]]}"


if __name__ == "__main__":
  execute(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
