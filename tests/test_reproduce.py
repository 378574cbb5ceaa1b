"""launch/reproduce.py at smoke scale: every stage end to end, a time limit, a signal, and the same tables after."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, make_tree

STAGES = ("throughput", "main", "bts", "erde", "self_distillation", "sdn")


def reproduce(root, tree, *extra, wait=True):
  """The launcher run from the tree's folder, its paths relative to there, as a user types them in their own
  folder (it works from the repository root; a relative --data was once read from there)."""
  here = os.path.dirname(tree)
  command = [sys.executable, os.path.join(REPO, "launch", "reproduce.py"), "--scale=smoke",
             f"--data=folder:{os.path.relpath(tree, here)}", f"--workdir={os.path.relpath(root, here)}", *extra]
  if not wait:
    return subprocess.Popen(command, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(command, cwd=here, capture_output=True, text=True, timeout=900, check=False)


def erde_rows(root):
  """What the ERDE table says (its command line names the root, so the rows are compared)."""
  return json.load(open(os.path.join(root, "work", "erde", "comparison.json")))["rows"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("reproduce")
  make_tree(str(root / "tree"), per_class=(32, 8), size=16)
  return str(root / "tree")


@pytest.mark.parametrize("command, line", [
    (["launch/reproduce.py", "--scale=nope"], "reproduce: error: flag --scale=nope: value should be one of"),
    (["launch/reproduce.py", "--minutes=-1", "--workdir=w"], "reproduce: error: flag --minutes=-1: -1.0 is not a "
                                                              "non-negative number"),
    (["launch/bts_grid.py", "--nope"], "bts_grid: error: Unknown command line flag 'nope'"),
])
def test_a_launchers_bad_flag_is_one_line_in_its_own_name(command, line, tmp_path):
  r = subprocess.run([sys.executable, os.path.join(REPO, command[0]), *command[1:]], cwd=tmp_path,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 2 and r.stderr.strip().startswith(line), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("launcher", ["erde.py", "self_distillation.py", "sdn.py"])
def test_a_launchers_paths_are_read_from_where_it_is_run(launcher, tree, tmp_path):
  """--root, --data and a --config file of one's own name places from the user's folder, not the repository's."""
  (tmp_path / "mine.py").write_text(open(os.path.join(REPO, "configs", "cifar10.py")).read())
  command = [sys.executable, os.path.join(REPO, "launch", launcher), "--root=runs", f"--data=folder:{tree}",
             "--config=mine.py", "--", "--config.no_such_key=1"]  # the first job stops at once, naming its paths
  r = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
  assert "bad --config override: no_such_key" in r.stderr, r.stderr
  first = r.stdout.splitlines()[0]
  assert f"--config {tmp_path / 'mine.py'}:" in first and f"--workdir={tmp_path / 'runs'}/" in first, first
  assert f"--config.data.source=folder:{tree} " in first, first
  r = subprocess.run([c.replace(f"folder:{tree}", "folder:" + os.path.relpath(tree, tmp_path)) for c in command],
                     cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
  assert f"--config.data.source=folder:{tree} " in r.stdout.splitlines()[0], r.stdout


def test_ctrl_c_on_a_launcher_lets_its_job_save_and_is_one_line(tree, tmp_path):
  """A terminal's Ctrl-C reaches the launcher and its job: the job saves its checkpoint and stops, the launcher
  waits for it and says so. (subprocess.call killed the job on the launcher's KeyboardInterrupt, losing its steps
  since the last checkpoint, and the launcher ended with a traceback.)"""
  restore = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "  # as a terminal starts it,
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")  # though this suite may ignore Ctrl-C
  command = [sys.executable, "-c", restore, os.path.join(REPO, "launch", "erde.py"), f"--root={tmp_path / 'r'}",
             f"--data=folder:{tree}", "--", "--config.model.name=resnet8", "--config.model.width=0.25",
             "--config.data.max_images=0", "--config.data.val_size=16", "--config.train.batch_size=16",
             "--config.train.epochs=200", "--config.train.steps_per_call=1", "--config.checkpoint.every_steps=100000"]
  proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)  # a terminal's group of its own: the launcher and its job
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step "):  # training
      os.killpg(proc.pid, signal.SIGINT)
      break
  out = "".join(lines) + proc.stdout.read()
  assert proc.wait(timeout=300) == 130, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert out.strip().splitlines()[-1] == ("[teacher] stopped by SIGINT (exit status 130): run the same command "
                                          "again to resume it (finished runs are kept)"), out[-3000:]
  saved = os.listdir(tmp_path / "r" / "teacher" / "checkpoints")
  assert len(saved) == 1 and 0 < int(saved[0]) < 1000, saved  # the stop's own checkpoint


def test_every_stage_runs_and_writes_one_summary(tree, tmp_path):
  root = str(tmp_path / "r")
  r = reproduce(root, tree)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "every stage finished" in r.stdout
  summary = open(os.path.join(root, "summary.md")).read()
  for stage in STAGES:
    assert f"## {stage}\n" in summary
  assert "not run yet" not in summary and "failed" not in summary
  assert "Hardware: cpu x1 (cpu)" in summary and f"Date: {time.strftime('%Y-%m-%d')}" in summary
  assert "![main](work/main/curve.png)" in summary and "![bts_grid](work/bts_grid/grid.png)" in summary
  assert "#### ERDE comparison" in summary and "#### Multi-exit self-distillation" in summary
  assert "#### SDN: the network alone, IC-only, SDN training and joint training" in summary
  assert "ratio peer / eejax" in summary and "real early exit" in summary and "multi/plain cost" in summary
  # The BTS-EE grid: all 64 configurations, both modes, a table row each; a second call keeps every one.
  grid = json.load(open(os.path.join(root, "work", "bts_grid", "grid.json")))
  assert len(grid["pairs"]) == 64 and len(grid["rows"]) == 128
  table = [l for l in open(os.path.join(root, "work", "bts_grid", "grid.md")) if re.match(r"\| [\d,]+ \| \d", l)]
  assert len(table) == 64
  grid_tex = open(os.path.join(root, "work", "bts_grid", "grid.tex")).read()
  assert sum(bool(re.match(r"    [\d,]+ & \d", l)) for l in grid_tex.splitlines()) == 64
  for launcher in ("erde", "self_distillation", "sdn"):  # the launchers' comparison tables, in LaTeX too
    assert r"\begin{tabular}" in open(os.path.join(root, "work", launcher, "comparison.tex")).read()
  again = reproduce(root, tree)
  assert again.returncode == 0 and "every stage finished" in again.stdout
  assert "(exit status" not in again.stdout  # no step ran again
  assert json.load(open(os.path.join(root, "work", "bts_grid", "grid.json")))["pairs"] == grid["pairs"]

  # Another root: stopped by the time limit, then by SIGTERM, then finished; it ends with the same tables.
  other = str(tmp_path / "o")
  start = time.monotonic()
  limited = reproduce(other, tree, "--only=erde", "--minutes=0.3")
  took = time.monotonic() - start
  assert limited.returncode == 0, limited.stdout[-3000:]
  assert took < 0.3 * 60 + 3, took  # interpreter start and the probe included
  last = limited.stdout.strip().splitlines()[-1]
  assert last == "stopped at the 0.3-minute limit; left: erde; run the same command again to continue", last
  assert os.path.isdir(os.path.join(other, "work", "erde", "teacher", "checkpoints"))
  proc = reproduce(other, tree, "--only=erde", wait=False)
  time.sleep(4)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 143, out[-3000:]
  assert "stopped by SIGTERM; left: " in out.strip().splitlines()[-1]
  assert "Traceback" not in out
  finished = reproduce(other, tree, "--only=erde")
  assert finished.returncode == 0, finished.stdout[-3000:]
  assert erde_rows(other) == erde_rows(root)
  part = open(os.path.join(other, "summary.md")).read()
  assert "### main: not run yet" in part and "### erde: done" in part
