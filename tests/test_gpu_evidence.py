"""The evidence pipeline's bookkeeping: resumable steps, the summary, and the main job's variant choice."""
import json
import os
import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "launch"))
import gpu_evidence  # pylint: disable=wrong-import-position


def test_steps_resume_rerun_failures_and_summarise(tmp_path):
  root = str(tmp_path)
  counter = tmp_path / "calls.txt"
  append = lambda word, code: [sys.executable, "-c", f"open({str(counter)!r}, 'a').write({word!r}); print('did {word}');"
                               f" raise SystemExit({code})"]
  gpu_evidence.run_steps(root, [("ok", append("a", 0)), ("bad", append("b", 3))], dict(os.environ))
  assert counter.read_text() == "ab"
  assert json.load(open(tmp_path / "steps" / "bad.json"))["status"] == 3
  summary = (tmp_path / "summary.md").read_text()
  assert "## ok: exit status 0" in summary and "## bad: exit status 3" in summary and "did b" in summary
  # Run again: the finished step is kept, the failed one runs again (and now succeeds), a new one runs.
  gpu_evidence.run_steps(root, [("ok", append("a", 0)), ("bad", append("b", 0)), ("new", lambda: append("c", 0))],
                         dict(os.environ))
  assert counter.read_text() == "abbc"
  assert "## new: exit status 0" in (tmp_path / "summary.md").read_text()
  # A finished step given another command runs again (it was skipped by its name); another interpreter is the same.
  other_python = lambda word, code: ["/another/python", *append(word, code)[1:]]
  gpu_evidence.run_steps(root, [("ok", other_python("a", 0)), ("bad", append("B", 0)), ("new", lambda: append("C", 0))],
                         dict(os.environ))
  assert counter.read_text() == "abbcB"
  assert json.load(open(tmp_path / "steps" / "ok.json"))["command"][0] == sys.executable  # not run again
  assert json.load(open(tmp_path / "steps" / "bad.json"))["command"] == append("B", 0)


def test_the_main_job_takes_the_multi_exit_variant_best_on_validation(tmp_path):
  rng = np.random.default_rng(0)
  val_labels = rng.integers(0, 10, 50)

  def ablation(name, val_right, num_exits):
    workdir = tmp_path / f"ablate_{name}"
    workdir.mkdir()
    logits = rng.normal(size=(num_exits, 50, 10)).astype(np.float32)
    logits[-1, :val_right, :] = 0
    logits[-1, np.arange(val_right), val_labels[:val_right]] = 10  # the first val_right images are right
    logits[-1, val_right:, :] = 0
    logits[-1, np.arange(val_right, 50), (val_labels[val_right:] + 1) % 10] = 10  # the rest wrong
    np.savez(workdir / "logits.npz", val_logits=logits, val_labels=val_labels)
    history = [{"best_val_accuracy": 0.9, "best_epoch": 12.5}] if name == "linear" else []
    (workdir / "report.json").write_text(json.dumps({"exits": [{"accuracy": 0.5}] * num_exits, "history": history}))

  ablation("single", 50, 1)  # best of all, but not a multi-exit variant: never chosen
  ablation("linear", 30, 4)
  ablation("detached", 41, 4)
  ablation("pool_conv", 35, 4)
  ablation("float32", 45, 4)  # better than every variant, but reported only: the recipe's precision stays
  assert gpu_evidence.final_exit_val_accuracy(str(tmp_path / "ablate_detached")) == 41 / 50
  assert gpu_evidence.main_variant(str(tmp_path), cpu=False) == ["--config.model.exit_grad_scale=0.0"]
  table = (tmp_path / "ablation.md").read_text()
  assert "| single | --config.model.exit_after=8 | 50.00 | 100.00 | n/a |" in table
  assert "| linear | (none) | 50.00 / 50.00 / 50.00 / 50.00 | 60.00 | 90.00 at epoch 12.5 |" in table
  assert "| float32 | --config.model.dtype=float32 | 50.00 / 50.00 / 50.00 / 50.00 | 90.00 | n/a |" in table
  assert "The main job takes `detached`" in table


def test_the_peer_trains_the_main_job_again_unless_it_lacks_the_heads(tmp_path):
  for name in ("main", "ablate_linear"):
    (tmp_path / name).mkdir()
  write = lambda head: (tmp_path / "main" / "config.json").write_text(json.dumps({"model": {"head": head}}))
  write("linear")
  assert gpu_evidence.parity_workdir(str(tmp_path)) == str(tmp_path / "main")
  write("pool_conv")  # bench/torch_peer.py has linear heads only
  assert gpu_evidence.parity_workdir(str(tmp_path)) == str(tmp_path / "ablate_linear")


def test_the_peer_starts_where_eejax_started_the_run(tmp_path):
  write = lambda train: (tmp_path / "config.json").write_text(json.dumps({"train": train}))
  write({"init": "flax"})
  assert gpu_evidence.peer_init(str(tmp_path)) == ["--peer-zero-init", "--peer-flax-init"]
  write({"init": "pytorch"})
  assert gpu_evidence.peer_init(str(tmp_path)) == ["--peer-zero-init"]
  write({})  # a run from before train.init drew flax's
  assert gpu_evidence.peer_init(str(tmp_path)) == ["--peer-zero-init", "--peer-flax-init"]


def test_the_accuracy_steps_come_first_and_every_name_is_unique():
  import argparse  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(root="/r", data="/d", scale="gpu", main_epochs=120, short_epochs=30, ablation_epochs=20,
                            erde_grad_clip=2.0)
  names = [name for name, _ in gpu_evidence.evidence_steps(args)]
  ablated = [f"ablate_{a}" for a in gpu_evidence.ablations(cpu=False)]
  first = ablated[:1] + ["parity_single"] + ablated[1:] + ["main", "parity_main"]
  assert names[:len(first)] == first and ablated[0] == "ablate_single"
  assert {"ablate_init_pytorch", "ablate_float32"} <= set(first)
  assert len(set(names)) == len(names) and "train_step" in names and "bts_grid" in names
  # The steps on the main job's run wait for it; each is a step of the plan (a misspelt name would never wait).
  assert set(gpu_evidence.NEEDS) <= set(names) and all(names.index(n) > names.index("main") for n in gpu_evidence.NEEDS)
  assert {"early_exit", "export", "bts_grid"} <= set(gpu_evidence.NEEDS) and "train_step" not in gpu_evidence.NEEDS
