"""Multi-process jobs for real: processes on this machine form one job over 127.0.0.1 with CPU collectives (Gloo).

What is checked: 2 processes (1 or 2 devices each) train what 1 process trains; the report is written once; a
signal to one process stops the whole job with a checkpoint, SIGKILL of one ends the other with one line within
seconds, a hung one (SIGSTOP) within the peer timeout, and the same command resumes each to the parameters of an
uninterrupted run; a workdir not shared or held by another job stops both; a damaged step is set aside once; export and the BTS-EE job
work on such a workdir (BTS-EE as a 2-process job too); bad settings are one line each.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, run_main, smoke_args
from eejax import distributed, workdirs, xla_cache
from test_faults import _flip_in_latest
from test_train import _wait_for_checkpoint, params_of

NO_INFERENCE = "--config.eval.real_inference=False"
LONG = ("--config.train.epochs=60", "--config.checkpoint.every_steps=20")  # 300 steps: time to interrupt
DEVICES = "--xla_force_host_platform_device_count={}"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_STARTED = []  # every Job's processes, killed after each test where still running


@pytest.fixture(autouse=True)
def _no_process_left():
  """A test that fails before its job ends (a hung job, say) leaves none of its processes running."""
  yield
  while _STARTED:
    for p in _STARTED.pop():
      if p.poll() is None:
        p.kill()
        p.wait()


class Job:
  """N processes of `python -m eejax.main ARGS` joined over 127.0.0.1, their output in files."""

  def __init__(self, args, logs, num_processes=2, devices=1, extra=None, own_compile_cache=False):
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if own_compile_cache:  # not the suite's (conftest): the job's config.compile_cache_dir is used
      env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DEVICES.format(devices)}".strip()
    port = free_port()
    self.paths = [(os.path.join(logs, f"{i}.out"), os.path.join(logs, f"{i}.err")) for i in range(num_processes)]
    self.procs = []
    _STARTED.append(self.procs)
    for i, (out, err) in enumerate(self.paths):
      with open(out, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as e:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "eejax.main", *args, f"--coordinator=127.0.0.1:{port}",
             f"--num_processes={num_processes}", f"--process_id={i}", *(extra[i] if extra else ())], cwd=REPO, env=env, stdout=o, stderr=e))

  def wait(self, timeout=400):
    """[(returncode, stdout, stderr)] of every process."""
    deadline = time.time() + timeout
    for p in self.procs:
      p.wait(timeout=max(deadline - time.time(), 1))
    return [(p.returncode, _read(out), _read(err)) for p, (out, err) in zip(self.procs, self.paths)]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def last_line(text):
  return text.strip().splitlines()[-1] if text.strip() else ""


def check_finished(results):
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i}: {err[-3000:]}"


@pytest.fixture(scope="module")
def two_process_run(smoke_master, tmp_path_factory):
  """(tree, workdir, results) of the session's smoke run trained again as a 2-process job (1 device each)."""
  _, tree, _, _ = smoke_master
  root = tmp_path_factory.mktemp("job")
  workdir = str(root / "w")
  results = Job(smoke_args(tree, workdir, "", NO_INFERENCE), str(root / "logs")).wait()
  check_finished(results)
  return tree, workdir, results


@pytest.fixture(scope="module")
def long_reference(smoke_master, tmp_path_factory):
  """The workdir of an uninterrupted LONG run: 1 process, 2 devices."""
  _, tree, _, _ = smoke_master
  workdir = str(tmp_path_factory.mktemp("long") / "w")
  r = run_main(smoke_args(tree, workdir, "", NO_INFERENCE, *LONG), env_extra={"XLA_FLAGS": DEVICES.format(2)})
  assert r.returncode == 0, r.stderr[-2000:]
  return workdir


def assert_same_params(a, b):
  for x, y in zip(params_of(a), params_of(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_two_processes_train_what_one_process_trains_and_report_once(smoke_master, two_process_run, tmp_path):
  _, tree, one_device, _ = smoke_master
  _, workdir, results = two_process_run
  (_, out0, err0), (_, out1, err1) = results
  assert "on 2 cpu device(s)" in out0 and "evaluation took" in out0
  # Only process 0 prints progress and writes; process 1 says nothing of its own.
  assert "step 10/10" in err0 and "step" not in err1 and "training" not in out1 and "evaluation" not in out1
  records = [json.loads(line) for line in _read(os.path.join(workdir, "metrics.jsonl")).splitlines()]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == [2, 4, 6, 8, 10], steps  # each chunk logged once
  assert sum("test/accuracy_exit1" in r for r in records) == 1
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    assert len(json.load(f)["exits"]) == 3
  two_devices = str(tmp_path / "d2")
  r = run_main(smoke_args(tree, two_devices, "", NO_INFERENCE), env_extra={"XLA_FLAGS": DEVICES.format(2)})
  assert r.returncode == 0, r.stderr
  assert_same_params(workdir, one_device)
  assert_same_params(workdir, two_devices)


FAKE_SRUN = """#!/usr/bin/env bash
# SLURM's srun on one machine: SLURM_NTASKS processes with the variables SLURM gives each task.
while [[ $1 == --* ]]; do shift; done
for i in $(seq 0 $((SLURM_NTASKS - 1))); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$LOGS/$i.out" 2> "$LOGS/$i.err" &
done
wait
"""


def test_slurm_job_of_two_processes_with_two_devices_each_matches(smoke_master, tmp_path):
  """launch/slurm.sh, one process per node, under SLURM's variables: JAX finds the job, 4 devices in all."""
  _, tree, one_device, _ = smoke_master
  bin_dir, logs, workdir = tmp_path / "bin", tmp_path / "logs", str(tmp_path / "w")
  bin_dir.mkdir()
  logs.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, LOGS=str(logs),
             EEJAX_TASK="node", SLURM_GPUS_ON_NODE="2", SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1",
             SLURM_NTASKS="2", JAX_COORDINATOR_PORT=str(free_port()), PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {DEVICES.format(2)}")
  r = subprocess.run(["bash", "launch/slurm.sh", *smoke_args(tree, workdir, "", NO_INFERENCE)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=400, check=False)
  assert r.returncode == 0, r.stderr
  out0, err0 = _read(str(logs / "0.out")), _read(str(logs / "0.err"))
  assert "on 4 cpu device(s)" in out0 and "evaluation took" in out0, err0[-2000:]
  assert os.path.exists(os.path.join(workdir, "report.json"))
  assert_same_params(workdir, one_device)


def test_export_and_bts_on_a_multi_process_workdir(two_process_run, tmp_path):
  tree, workdir, _ = two_process_run
  out = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={workdir}", f"--out={tmp_path / 'e'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.path.exists(tmp_path / "e" / "model.stablehlo")
  bts = ["--config", "configs/cifar10.py:bts", f"--config.bts.backbone={workdir}",
         f"--config.data.source=folder:{tree}", "--config.data.cache_dir=", "--config.data.val_size=8",
         "--config.data.max_images=96", "--config.bts.positions=1,2", "--config.bts.margins=0.0",
         "--config.bts.epochs=2", "--config.bts.batch_size=16", "--config.bts.steps_per_call=4",
         "--config.eval.batch_size=16"]
  one = run_main([*bts, f"--workdir={tmp_path / 'b1'}"])
  assert one.returncode == 0, one.stderr[-2000:]
  results = Job([*bts, f"--workdir={tmp_path / 'b2'}"], str(tmp_path / "logs")).wait()
  check_finished(results)
  assert "report in" in results[0][1] and "report in" not in results[1][1]
  rows = [json.loads(_read(str(tmp_path / b / "report.json")))["rows"] for b in ("b1", "b2")]
  for a, b in zip(*rows, strict=True):
    assert (a["accuracy"], a["macs"], a["threshold_ExC"]) == (b["accuracy"], b["macs"], b["threshold_ExC"])
  assert_same_params(str(tmp_path / "b1" / "models" / "boosted_m0"), str(tmp_path / "b2" / "models" / "boosted_m0"))


def test_sigterm_to_one_process_stops_the_job_and_it_resumes(smoke_master, long_reference, tmp_path):
  _, tree, _, _ = smoke_master
  workdir, args = str(tmp_path / "w"), smoke_args(tree, str(tmp_path / "w"), "", NO_INFERENCE, *LONG)
  job = Job(args, str(tmp_path / "logs1"))
  _wait_for_checkpoint(workdir, job.procs[0])
  job.procs[1].send_signal(signal.SIGTERM)
  results = job.wait()
  stopped = set()
  for code, _, err in results:
    assert code == 143 and "Traceback" not in err, err[-2000:]
    assert "checkpoint saved" in last_line(err) and "run the same command again" in last_line(err)
    stopped.add(int(last_line(err).split(" at step ")[1].split(";")[0]))
  assert len(stopped) == 1 and 0 < min(stopped) < 300  # both at the same step
  assert "sent to another process of the job" in last_line(results[0][2])
  resumed = Job(args, str(tmp_path / "logs2")).wait()
  check_finished(resumed)
  assert f"resuming from {workdir} at step {stopped.pop()}" in resumed[0][1]
  assert_same_params(workdir, long_reference)


def test_sigkill_of_one_process_ends_the_other_with_one_line_and_the_job_resumes(smoke_master, long_reference,
                                                                                 tmp_path):
  _, tree, _, _ = smoke_master
  # Checkpoints at steps 100, 200, 300 (the same run as LONG): the kill comes mid-chunk, between two saves.
  workdir = str(tmp_path / "w")
  args = smoke_args(tree, workdir, "", NO_INFERENCE, *LONG, "--config.checkpoint.every_steps=100")
  job = Job(args, str(tmp_path / "logs1"))
  _wait_for_checkpoint(workdir, job.procs[0])
  time.sleep(0.5)
  job.procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  job.procs[0].wait(timeout=150)
  took = time.time() - killed_at
  (code0, _, err0), (code1, _, _) = job.wait()
  assert code1 == -signal.SIGKILL
  assert code0 == 3 and took < 10, (code0, took, err0[-2000:])  # a dead peer is seen at the next collective
  assert "Traceback" not in err0 and "lost the rest of its job" in last_line(err0)
  saved = int(last_line(err0).split("resumes from step ")[1].split(",")[0])
  assert saved in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  resumed = Job(args, str(tmp_path / "logs2")).wait()
  check_finished(resumed)
  assert f"resuming from {workdir} at step {saved}" in resumed[0][1]
  assert_same_params(workdir, long_reference)


def test_the_watch_ends_a_job_on_silence_or_on_a_peer_that_ended_with_an_error():
  well = {1: ("7", 100.0), 2: ("9", 95.0)}
  assert distributed._lost(well, 120.0, 60) is None
  assert distributed._lost(well, 155.5, 60) == ("process 2 has not been heard from for 60 s: killed, stopped, hung or "
                                                "its host lost")
  assert distributed._lost({1: ("7", 0.0), 2: ("8", 0.0)}, 61.0, 60).startswith("processes 1, 2 have not been heard")
  ended = {1: ("ended: UserError: no data here", 100.0)}
  assert distributed._lost(ended, 100.0 + distributed.ENDED_GRACE_S - 1, 60) is None  # time to meet it too
  assert distributed._lost(ended, 100.0 + distributed.ENDED_GRACE_S + 1, 60) == (
      "process 1 ended with UserError: no data here")


def test_a_hung_process_ends_the_job_with_one_line_within_the_peer_timeout(smoke_master, long_reference, tmp_path):
  """A process that stops answering (SIGSTOP: alive, its connections open, like a hung host): the collectives of
  the other never return, and JAX's runtime would abort it after 100 s with a stack trace."""
  _, tree, _, _ = smoke_master
  workdir = str(tmp_path / "w")
  args = smoke_args(tree, workdir, "", NO_INFERENCE, *LONG, "--peer_timeout=8")
  job = Job(args, str(tmp_path / "logs1"))
  _wait_for_checkpoint(workdir, job.procs[0])
  job.procs[1].send_signal(signal.SIGSTOP)
  stopped_at = time.time()
  try:
    job.procs[0].wait(timeout=150)
  finally:
    job.procs[1].kill()
  took = time.time() - stopped_at
  (code0, _, err0), _ = job.wait()
  print(f"\n  exit {code0} after {took:.1f} s: {last_line(err0)}")
  assert code0 == 3 and 5 < took < 30, (code0, took, err0[-2000:])
  assert "Traceback" not in err0 and "process 1 has not been heard from for 8 s" in last_line(err0), err0[-2000:]
  saved = int(last_line(err0).split("resumes from step ")[1].split(",")[0])
  resumed = Job(args, str(tmp_path / "logs2")).wait()
  check_finished(resumed)
  assert f"resuming from {workdir} at step {saved}" in resumed[0][1]
  assert_same_params(workdir, long_reference)


def test_a_process_that_fails_alone_ends_the_others_within_seconds(tiny_tree, tmp_path):
  """A dataset missing on one host only: that process says why (status 2); the other, which would wait at its
  next collective, ends a few seconds later with a line naming the first one's error (status 3)."""
  start = time.time()
  results = Job(smoke_args(tiny_tree, str(tmp_path / "w"), "", NO_INFERENCE), str(tmp_path / "logs"),
                extra=[[], [f"--config.data.source=folder:{tmp_path / 'nowhere'}"]]).wait(timeout=150)
  took = time.time() - start
  (code0, _, err0), (code1, _, err1) = results
  print(f"\n  process 0: exit {code0}: {last_line(err0)}\n  process 1: exit {code1}: {last_line(err1)}")
  assert code1 == 2 and "Traceback" not in err1 and "nowhere" in last_line(err1), err1[-2000:]
  assert code0 == 3 and "Traceback" not in err0, err0[-2000:]
  assert "process 1 ended with UserError: " in last_line(err0) and "nowhere" in last_line(err0)
  assert took < 60


def test_a_damaged_step_in_a_multi_process_workdir_is_set_aside_once_and_trained_again(two_process_run, tmp_path):
  """Both processes check the steps before process 0 moves the damaged one; both resume from the same step."""
  tree, workdir, _ = two_process_run
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  _flip_in_latest(copy)
  results = Job(smoke_args(tree, copy, "", NO_INFERENCE), str(tmp_path / "logs")).wait()
  check_finished(results)
  (_, out0, err0), (_, out1, err1) = results
  assert "checkpoints/10 is damaged" in out0 and "resuming from" in out0 and "moved to" in out0
  assert "damaged" not in out1 + err1 and "Traceback" not in err0 + err1
  assert len(os.listdir(os.path.join(copy, "damaged-checkpoints"))) == 1
  for a, b in zip(params_of(copy), params_of(workdir), strict=True):  # step 10 trained again, bit for bit
    np.testing.assert_array_equal(a, b)


def test_a_workdir_not_shared_or_in_use_stops_every_process_with_one_line(tiny_tree, tmp_path):
  """Each process sees its own folder (each host its own /tmp), or another job holds the workdir: all processes
  end with status 2 and one line before anything is written, none waits for the other until JAX's heartbeat."""
  mine, theirs = str(tmp_path / "a" / "w"), str(tmp_path / "b" / "w")
  results = Job(smoke_args(tiny_tree, mine, "", NO_INFERENCE), str(tmp_path / "logs1"),
                extra=[[], [f"--workdir={theirs}"]]).wait(timeout=120)
  for i, (code, _, err) in enumerate(results):
    assert code == 2 and "Traceback" not in err, (i, err[-2000:])
    assert "is not one folder that every process shares" in last_line(err), err[-2000:]
  for folder in (mine, theirs):
    assert os.listdir(folder) == []  # the probe files are gone, and nothing else was written
  with workdirs.lock(mine):  # another job holds it
    results = Job(smoke_args(tiny_tree, mine, "", NO_INFERENCE), str(tmp_path / "logs2")).wait(timeout=120)
  (code0, _, err0), (code1, _, err1) = results
  assert (code0, code1) == (2, 2) and "Traceback" not in err0 + err1
  assert f"in use by another eejax job (process {os.getpid()}" in last_line(err0)
  assert last_line(err1).startswith("eejax: error: process 0 of this job: ") and "in use" in last_line(err1)
  assert sorted(os.listdir(mine)) == [".lock"]


def test_processes_that_share_a_compile_cache_trim_it_once_and_say_so_once(tiny_tree, tmp_path):
  """Processes 0 and 1 share a folder (one host), process 2 has its own (another host): process 0 trims the shared
  one and says so, process 1 finds it trimmed and says nothing, process 2 trims its own and names itself."""
  from test_xla_cache import touch  # pylint: disable=g-import-not-at-top
  shared, own = str(tmp_path / "shared"), str(tmp_path / "own")
  for folder in (shared, own):
    touch(os.path.join(folder, "jit_old-" + "0" * 64 + "-cache"), 3 * 2**20, 1000)  # 3 MB, used long ago
  results = Job(smoke_args(tiny_tree, str(tmp_path / "w"), "", NO_INFERENCE, "--config.compile_cache_max_gb=0.002",
                           "--config.train.batch_size=12", "--config.eval.batch_size=12"),
                str(tmp_path / "logs"), num_processes=3, own_compile_cache=True,
                extra=[[f"--config.compile_cache_dir={d}"] for d in (shared, shared, own)]).wait()
  check_finished(results)
  said = [[line for line in err.splitlines() if "compile cache" in line] for _, _, err in results]
  limit = "removed (3.0 MB), to keep it under config.compile_cache_max_gb=0.002"
  off = xla_cache.cached_collectives_hang(jax.__version__, "cpu", 3)  # trimmed all the same, then not used
  off_line = (f"compile cache off for this job: with jax {jax.__version__}, a multi-process job on CPUs hangs in "
              "the collectives of programs loaded from the cache; every process compiles its programs")
  assert said == [[off_line] * off + [f"compile cache {shared}: the 1 file(s) used longest ago {limit}"], [],
                  [f"process 2: compile cache {own}: the 1 file(s) used longest ago {limit}"]], said
  names = os.listdir(shared)
  assert not any(n.startswith("jit_old") for n in names) and any(n.startswith("jit_") for n in names) != off, names
  assert os.listdir(own) == []  # JAX writes compiled programs from process 0 only


@pytest.mark.parametrize("flags, expected", [
    (["--num_processes=2", "--process_id=2", "--coordinator=127.0.0.1:1234"], "out of range"),
    (["--num_processes=2", "--process_id=0"], "missing: --coordinator"),
    (["--coordinator=127.0.0.1:1234", "--num_processes=2"], "missing: --process_id"),
    (["--coordinator=localhost", "--num_processes=2", "--process_id=0"], "is not HOST:PORT"),
    (["--coordinator=127.0.0.1:1234", "--num_processes=0", "--process_id=0"], "--num_processes=0 must be"),
    (["--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=0", "--distributed_timeout=0"],
     "--distributed_timeout=0 must be"),
    (["--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=0", "--peer_timeout=1"],
     "--peer_timeout=1 must be 5 seconds or more"),
    (["--config.distributed=True"], "cannot start the multi-process job"),  # no SLURM, MPI or TPU pod here
    (["--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=1", "--distributed_timeout=3"],
     "could not join the job at 127.0.0.1:"),  # nobody hosts the coordinator
    (["--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=0", "--distributed_timeout=3"],
     "could not join the job at 127.0.0.1:"),  # process 1 never comes
])
def test_bad_multi_process_settings_are_one_line(tiny_tree, tmp_path, flags, expected):
  flags = [f.format(port=free_port()) for f in flags]
  start = time.time()
  r = run_main(smoke_args(tiny_tree, str(tmp_path / "w"), "", *flags), timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and expected in last_line(r.stderr), r.stderr[-2000:]
  assert last_line(r.stderr).startswith("eejax: error: ")
  assert time.time() - start < 60  # a bounded wait, never a hang
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
