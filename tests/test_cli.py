"""Every way a command can end, as one line: `eejax.cli.guarded`."""
import argparse
import errno
import os
import signal
import time

import pytest

from eejax import cli, signals
from eejax.errors import UserError


def _raise_exit(code):
  raise SystemExit(code)


def ends(job, capsys, workdir=None, monkeypatch=None):
  if monkeypatch is not None:  # Ctrl-C ends the process at once (os._exit): here, as SystemExit
    monkeypatch.setattr(cli, "hard_exit", _raise_exit)
  with pytest.raises(SystemExit) as e:
    cli.guarded(job, "eejax", workdir)
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err, err
  return e.value.code, err


def _raise(e):
  def job():
    raise e
  return job


def test_each_expected_failure_is_one_line_with_its_status(capsys, monkeypatch):
  assert ends(_raise(UserError("fix this")), capsys) == (2, "eejax: error: fix this")
  code, err = ends(_raise(OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")), capsys)
  assert code == 2 and err.startswith("eejax: error: No space left on device: /w/metrics.jsonl. Free space")
  code, err = ends(_raise(OSError(errno.ENOENT, "No such file or directory", "r.md")), capsys)
  assert (code, err) == (2, "eejax: error: No such file or directory: r.md. Fix the path, then run the same command "
                            "again (what was saved stays whole)")
  code, err = ends(_raise(PermissionError(errno.EACCES, "Permission denied", "/w")), capsys)
  assert code == 2 and err.startswith("eejax: error: Permission denied: /w. Fix its permissions or choose a writable")
  code, err = ends(_raise(KeyboardInterrupt()), capsys, monkeypatch=monkeypatch)
  assert code == 130 and "interrupted (Ctrl-C)" in err
  code, err = ends(_raise(signals.Stopped(15, 40, "/w")), capsys)
  assert code == 143 and err == "eejax: stopped by SIGTERM at step 40; checkpoint saved in /w; run the same command again to resume"


def test_an_unforeseen_error_is_one_line_and_its_traceback_goes_to_a_file(tmp_path, capsys):
  code, err = ends(lambda: 1 / 0, capsys, str(tmp_path))
  assert code == 1 and err.startswith("eejax: internal error: ZeroDivisionError: division by zero; the full traceback")
  path = err.split("the full traceback is in ")[1].split(". Please")[0]
  assert path.startswith(str(tmp_path))
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert "Traceback" in text and "ZeroDivisionError" in text and "1 / 0" in text
  assert cli.guarded(lambda: 7) == 7  # a job that ends well returns its value


def test_a_bench_scripts_traceback_file_is_named_after_it_without_its_folder(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.guarded(lambda: 1 / 0, "bench/train_step.py", str(tmp_path))
  err = capsys.readouterr().err
  assert e.value.code == 1 and "could not be written" not in err, err
  (name,) = os.listdir(tmp_path)
  assert name.startswith("bench_train_step.py-traceback-") and f"{tmp_path}/{name}" in err


@pytest.mark.parametrize("kind, text, value", [(int, "512", 512), (float, "0.25", 0.25), (float, "1e-3", 1e-3)])
def test_positive_takes_a_positive_number(kind, text, value):
  assert cli.positive(kind)(text) == value and type(cli.positive(kind)(text)) is kind


@pytest.mark.parametrize("kind, text", [(int, "0"), (int, "-4"), (int, "0.5"), (int, "abc"), (float, "0"),
                                        (float, "-0.1"), (float, "nan"), (float, "")])
def test_positive_refuses_anything_else(kind, text):
  with pytest.raises(argparse.ArgumentTypeError, match=f"^{text!r} is not a positive {kind.__name__}$"):
    cli.positive(kind)(text)


def test_ctrl_c_at_start_up_ends_at_once_and_the_job_gets_a_keyboard_interrupt(capsys, monkeypatch):
  previous = signal.getsignal(signal.SIGINT)
  monkeypatch.setattr(cli, "hard_exit", _raise_exit)
  try:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.exit_on_interrupt("eejax.export")
    with pytest.raises(SystemExit) as e:  # while JAX loads: one line, the process ends
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    assert e.value.code == 130 and capsys.readouterr().err.startswith("eejax.export: interrupted (Ctrl-C)")
    # the job itself: Ctrl-C is a KeyboardInterrupt again, which the guard turns into the same line
    def job():
      assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
      raise KeyboardInterrupt
    code, err = ends(job, capsys, monkeypatch=monkeypatch)
    assert code == 130 and "interrupted (Ctrl-C)" in err
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # started with Ctrl-C ignored (in the background): still ignored
    cli.exit_on_interrupt("eejax.export")
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def test_sigterm_outside_training_is_one_line_and_the_callers_handler_comes_back(capsys, monkeypatch):
  previous = signal.getsignal(signal.SIGTERM)
  try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    def job():
      os.kill(os.getpid(), signal.SIGTERM)  # its default ended the process without a word
      time.sleep(5)
    code, err = ends(job, capsys, monkeypatch=monkeypatch)
    assert code == 143 and err == ("eejax: stopped by SIGTERM; every checkpoint and file already written stays "
                                   "whole: run the same command again to go on")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored (nohup-like): still ignored in the job
    assert cli.guarded(lambda: signal.getsignal(signal.SIGTERM)) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_python_m_eejax_lists_every_command_and_only_those():
  import glob, re, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from eejax import __main__ as commands  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(commands.__file__)
  runnable = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(folder, "*.py"))
              if p != commands.__file__ and 'if __name__ == "__main__":' in open(p, encoding="utf-8").read()}
  assert {name for name, _, _ in commands.COMMANDS} == runnable
  r = subprocess.run([sys.executable, "-m", "eejax"], capture_output=True, text=True, check=False, timeout=60)
  listed = re.findall(r"^  python -m eejax\.(\w+) ", r.stdout, re.M)
  assert r.returncode == 0 and listed == [name for name, _, _ in commands.COMMANDS]
  r = subprocess.run([sys.executable, "-m", "eejax", "train"], capture_output=True, text=True, check=False, timeout=60)
  assert r.returncode == 2 and r.stderr.startswith("eejax: error: run a command as python -m eejax.COMMAND (main, ")
  assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


def test_a_comma_separated_list_of_names_overrides_a_tuple_of_names():
  """ml_collections reads `--config.eval.policies=max_prob,entropy` as one name 'max_prob,entropy'."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  argv = ["eejax.main", f"--config={REPO}/configs/cifar10.py:smoke", "--config.eval.policies=entropy,patience",
          "--config.eval.fit_policies=max_prob, entropy", "--config.eval.risks=disagreement",
          "--config.eval.budgets=0.25,0.5", "--config.data.source=folder:/a,b"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  config = cli.config_value(values["config"])
  assert config.eval.policies == ("entropy", "patience") and config.eval.fit_policies == ("max_prob", "entropy")
  assert config.eval.risks == ("disagreement",) and config.eval.budgets == (0.25, 0.5)
  assert config.data.source == "folder:/a,b"  # a string setting keeps its commas


@pytest.mark.parametrize("command, flag", [(["launch/erde.py", "--help"], "--seeds"),
                                           (["launch/sdn.py", "-h"], "--scale"),
                                           (["-m", "eejax.certify", "-h"], "--epsilons")])
def test_help_lists_the_commands_flags(command, flag):
  """--help, and -h that absl does not know, print the command's own text and flags (the launchers that parse
  without absl's app.run had neither: 'Unknown command line flag')."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 1 and "Unknown command line flag" not in r.stderr, r.stderr  # absl's status for --help
  assert f"  {flag}: " in r.stdout and "Try --helpfull" in r.stdout, r.stdout

