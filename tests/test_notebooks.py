"""The Colab notebooks: valid, thin, TPU-safe, and the quickstart runs top to bottom on CPU (smoke config)."""
import glob
import json
import os

import pytest

from conftest import REPO, make_tree

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat, nbclient and ipykernel ('.[test]')")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient and ipykernel ('.[test]')")

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def test_notebooks_are_valid_thin_and_tpu_safe():
  assert {os.path.basename(p) for p in NOTEBOOKS} >= {"quickstart.ipynb", "erde.ipynb", "self_distillation.ipynb",
                                                      "bts_ee.ipynb"}
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    params = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    data = next(line for line in params.splitlines() if line.startswith("DATA = "))
    assert data.startswith('DATA = "cifar10"'), path  # the built-in reader: no TensorFlow, a TPU runtime works
    assert "WORKDIR" in code and "drive.mount" in code, path  # a workdir the user picks, on Drive by default
    installs = [line for line in code.splitlines() if "pip" in line]
    assert installs and not any(w in line for line in installs for w in ("tensorflow", "[tfds]", "[tflite]")), path
    assert "import tensorflow" not in code, path  # TensorFlow on a TPU runtime breaks JAX's TPU start
    assert "def " not in code and "class " not in code, path  # cells call the package; nothing is built here
    assert "devices()[" not in code, path  # no assumption about how many devices there are
    # A training job runs through wait_for_job: interrupting the cell lets it save (subprocess.run killed it
    # 0.25 s after the kernel's KeyboardInterrupt, losing its steps since the last checkpoint).
    jobs = [c.source for c in nb.cells if c.cell_type == "code" and ("launch/" in c.source or "eejax.main" in c.source)]
    assert all("wait_for_job(" in s and "subprocess.run" not in s for s in jobs), path


def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path):
  tree = str(tmp_path / "tree")
  make_tree(tree, per_class=(32, 8), size=16)
  workdir = str(tmp_path / "work")
  nb = nbformat.read(os.path.join(REPO, "colab", "quickstart.ipynb"), as_version=4)
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  params.source = "\n".join([
      f"REPO_URL, REPO_DIR, INSTALL, MOUNT_DRIVE = '', {REPO!r}, False, False",
      f"WORKDIR = {workdir!r}", "PRESET = 'smoke'", f"DATA = 'folder:{tree}'",
      "OVERRIDES = {'data.cache_dir': '', 'data.val_size': 8, 'eval.real_inference': False}", "BUDGET = 0.5"])
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "backend: cpu" in text and "test images: accuracy" in text and "thresholds" in text
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["exits"] and os.path.exists(os.path.join(workdir, "curve.png"))
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert images >= 2 and os.path.exists(os.path.join(workdir, "training.png"))  # the curve and the training history
  exported = json.load(open(os.path.join(workdir, "export", "export_report.json")))
  assert exported["formats"]["stablehlo"]["status"] == "ok"
  assert all(e["answered_at_forced_exit"] and e["max_abs_diff"] < 1e-3 for e in exported["formats"]["stablehlo"]["exits"])
  for fmt in ("tflite", "tflite_int8"):  # where TensorFlow is installed, they export and verify
    status = exported["formats"][fmt]["status"]
    assert status == "ok" or status.startswith("not available here"), status
