"""Writes tests/data/old_run/: a small run of this release stopped part-way, kept so that every later release (and
every later jax, flax and orbax-checkpoint) is checked to load it, answer as it did, and resume it to the end
(tests/test_run.py).

    python tests/data/write_old_run.py   # from the repository root; replaces tests/data/old_run/

The run is the smoke preset on the tests' own tiny tree (conftest.make_tree, 3 classes, 16x16), two epochs. Kept:
config.json, run.json, identity.json and its first checkpoint, as a run stopped there leaves them; expected.npz
holds the logits its variables gave on that tree's test images when it was written, its step, the step the whole
run ended at and the tree's arguments, and versions.json what wrote it.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position
from eejax import checkpoint, evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from eejax.run import load_run  # pylint: disable=g-import-not-at-top,wrong-import-position

OUT = os.path.join(REPO, "tests", "data", "old_run")
TREE = {"per_class": (32, 8), "size": 16}  # conftest.make_tree's arguments, saved in expected.npz for the tests
ARGS = ["--config.eval.real_inference=False", "--config.log.tensorboard=False", "--config.train.epochs=2",
        "--config.checkpoint.every_steps=5"]  # a checkpoint part-way, the one kept


def versions() -> dict:
  import flax, jax, optax, orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,multiple-imports
  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
  return {"eejax_commit": commit.stdout.strip(), "python": sys.version.split()[0], "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__, "orbax-checkpoint": ocp.__version__}


def main() -> None:
  with tempfile.TemporaryDirectory() as tmp:
    tree, workdir = os.path.join(tmp, "tree"), os.path.join(tmp, "w")
    test_NxHxWx3 = conftest.make_tree(tree, **TREE)["test"][0]
    r = conftest.run_main(conftest.smoke_args(tree, workdir, "", *ARGS))
    if r.returncode:
      sys.exit(r.stderr)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(os.path.join(OUT, "checkpoints"))
    for name in ("config.json", "run.json", "identity.json"):
      shutil.copy(os.path.join(workdir, name), OUT)
    first, *_, end = checkpoint.steps(os.path.join(workdir, "checkpoints"))
    shutil.copytree(os.path.join(workdir, "checkpoints", str(first)), os.path.join(OUT, "checkpoints", str(first)))
  run = load_run(OUT)
  logits_ExNxC = evaluate.run_logits(run, test_NxHxWx3, batch_size=len(test_NxHxWx3))
  np.savez(os.path.join(OUT, "expected.npz"), logits_ExNxC=logits_ExNxC, step=run.step, end_step=end, **TREE)
  with open(os.path.join(OUT, "versions.json"), "w", encoding="utf-8") as f:
    json.dump(versions(), f, indent=1)
  print(f"{OUT}: step {run.step} of {end}, logits {logits_ExNxC.shape}, {versions()}")


if __name__ == "__main__":
  main()
