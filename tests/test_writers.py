"""Metric files (JSONL, TensorBoard events readable without TensorFlow), the progress line and the count of long work."""
import io
import json
import os
import subprocess
import sys

from conftest import REPO, read_events
from eejax.writers import Count, MetricWriter, Progress


def test_jsonl_and_tensorboard(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(3, {"train/loss": 1.5, "train/accuracy_exit1": 0.25})
  writer.write(7, {"train/loss": 0.5})
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
  assert lines == [{"step": 3, "train/loss": 1.5, "train/accuracy_exit1": 0.25}, {"step": 7, "train/loss": 0.5}]
  assert sorted(read_events(tmp_path / "tb")) == [(3, "train/accuracy_exit1", 0.25), (3, "train/loss", 1.5),
                                                 (7, "train/loss", 0.5)]


def test_without_tensorboardx_metrics_still_go_to_jsonl_with_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as on a machine without it: import fails
  writer = MetricWriter(str(tmp_path))
  writer.write(1, {"train/loss": 2.0})
  writer.close()
  assert [json.loads(l) for l in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "train/loss": 2.0}]
  assert not os.path.exists(tmp_path / "tb")
  assert capsys.readouterr().err.strip() == ("tensorboardX is not installed: metrics go to metrics.jsonl only "
                                             "(pip install tensorboardX for TensorBoard files)")


def test_a_process_that_ends_at_once_still_writes_its_tensorboard_events(tmp_path):
  # How a multi-process job ends when a peer is lost (`eejax.distributed`): one line, then os._exit, which runs
  # no finally block; tensorboardX would have kept the events in memory for up to 30 s.
  code = ("import sys; from eejax import distributed, writers; w = writers.MetricWriter(sys.argv[1]); "
          "w.write(4, {'train/loss': 0.75}); distributed._exit_line(3, 'lost the rest of the job')")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode == 3 and r.stderr.strip().endswith("eejax: error: lost the rest of the job"), r.stderr
  assert read_events(tmp_path / "tb") == [(4, "train/loss", 0.75)]


def test_training_modules_do_not_import_tensorflow(tmp_path):
  code = ("import sys, eejax.train, eejax.writers, eejax.evaluate, eejax.data; "
          "eejax.writers.MetricWriter(sys.argv[1]).write(1, {'a': 1.0}); "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.stdout.strip() == "False"


def test_progress_reports_rate_and_eta_without_compile_time():
  stream = io.StringIO()
  progress = Progress(total_steps=100, batch_size=10, every_s=0.0, stream=stream)
  progress.update(10, 2.0)  # first chunk: includes compilation, starts the clock
  progress._start -= 2.0  # pretend 2 s passed since then  # pylint: disable=protected-access
  progress.update(30, 1.5)
  last = stream.getvalue().strip().splitlines()[-1]
  assert last.startswith("step 30/100 (30%) loss 1.5000")
  rate = float(last.split(" img/s")[0].split()[-1].replace(",", ""))
  assert 95 < rate < 101  # 20 steps x 10 images in ~2 s
  assert "ETA 0m" in last  # 70 steps at ~10 steps/s: about 7 s


def test_decoding_prints_progress_with_an_eta_and_a_total():
  out = io.StringIO()
  count = Count("decoding t/train", 12, every_s=0.0, stream=out)
  for i in range(12):
    assert count.tick(i) == i
  count.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("decoding t/train: 1 of 12 images (8%) ETA ")
  assert lines[-2].startswith("decoding t/train: 12 of 12 images (100%)")
  assert lines[-1].startswith("decoding t/train: 12 images in ")


def test_a_count_by_batches_is_silent_for_short_work_and_counts_every_image(tmp_path):
  quiet = io.StringIO()
  count = Count("evaluating", 100, stream=quiet)  # printed every 10 s: short work says nothing
  for n in (32, 32, 32, 4):
    count.add(n)
  count.close()
  assert quiet.getvalue() == "" and count.done == 100
  out = io.StringIO()
  count = Count("evaluating the test split", 100, every_s=0.0, stream=out)
  for n in (32, 32, 32, 4):
    count.add(n)
  count.close()
  assert [line.split(" images")[0] for line in out.getvalue().splitlines()] == [
      "evaluating the test split: 32 of 100", "evaluating the test split: 64 of 100",
      "evaluating the test split: 96 of 100", "evaluating the test split: 100 of 100",
      "evaluating the test split: 100"]


def test_progress_leaves_paused_time_out_of_the_rate_and_ends_with_its_note(monkeypatch):
  now = [100.0]
  monkeypatch.setattr("eejax.writers.time.perf_counter", lambda: now[0])
  out = io.StringIO()
  progress = Progress(total_steps=40, batch_size=8, every_s=0.0, stream=out)
  progress.update(0, 1.0)  # the rate counts from here
  now[0] += 1.0
  with progress.paused():  # validation: 4 s that are not training
    now[0] += 4.0
  now[0] += 1.0
  progress.note = "val 50.00%"
  progress.update(10, 0.5)
  assert progress.images_per_second(10) == 10 * 8 / 2.0
  assert out.getvalue().splitlines()[-1] == "step 10/40 (25%) loss 0.5000 40 img/s ETA 0m06s val 50.00%"
  progress.note, progress.every_s = "val 60.00%", 1e9  # a new validation: the same line again, at once, with it
  progress.refresh()
  assert out.getvalue().splitlines()[-1] == "step 10/40 (25%) loss 0.5000 40 img/s ETA 0m06s val 60.00%"


def test_tensorboard_files_without_importing_pytorch(tmp_path):
  """tensorboardX imports torch where it can; eejax's scalars do not need it, and torch still imports afterwards.

  A stand-in `torch` package on the path says whether it was imported (the real one need not be installed).
  """
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("import sys\nsys.stderr.write('torch imported\\n')\nTensor = object\n")
  code = ("import sys; from eejax import writers; w = writers.MetricWriter(sys.argv[1]); "
          "w.write(2, {'train/loss': 0.5}); w.close(); print('torch' in sys.modules); "
          "import torch; print(torch.Tensor is object)")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True,
                     timeout=120, check=False, env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}:{REPO}"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["False", "True"] and r.stderr.count("torch imported") == 1, (r.stdout, r.stderr)
  assert read_events(tmp_path / "w" / "tb") == [(2, "train/loss", 0.5)]
  # A tensorboardX that cannot do without torch is imported again, with it.
  needy = tmp_path / "site" / "tensorboardX"
  needy.mkdir()
  (needy / "__init__.py").write_text("import torch\nclass SummaryWriter:\n  def __init__(self, *a, **k):\n"
                                     "    print('needy writer', torch.Tensor is object)\n")
  code = "import sys; from eejax import writers; writers.MetricWriter(sys.argv[1])"
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "n")], cwd=REPO, capture_output=True, text=True,
                     timeout=120, check=False, env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}:{REPO}"))
  assert r.returncode == 0 and r.stdout.strip() == "needy writer True", (r.stdout, r.stderr)
