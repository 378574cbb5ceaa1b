"""Helpers shared by the launch scripts: arguments, one resumable eejax job, table cells and files."""
import argparse
import json
import os
import subprocess
import sys


def parse_args(doc: str, scales, name: str):
  """The launch scripts' common arguments; --root defaults to workdirs/<name>_<scale>. Works from the repo root."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--scale", choices=sorted(scales), default="cpu")
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--data", default="folder:../shared/data/cifar10", help="data.source ('' keeps the config's)")
  parser.add_argument("--root", default=None, help="folder for the runs' workdirs and the table")
  parser.add_argument("extra", nargs="*", help="more --config.x=y overrides for every run")
  args = parser.parse_args()
  args.root = args.root or os.path.join("workdirs", f"{name}_{args.scale}")
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return args


def run(name: str, config: str, workdir: str, data: str, extra) -> dict:
  """Runs `python -m eejax.main` unless workdir/report.json exists; returns the report."""
  report = os.path.join(workdir, "report.json")
  if os.path.exists(report):
    print(f"[{name}] done already: {workdir}")
  else:
    command = [sys.executable, "-m", "eejax.main", "--config", config, f"--workdir={workdir}",
               *([f"--config.data.source={data}"] if data else []), *extra]
    print(f"[{name}] {' '.join(command)}", flush=True)
    code = subprocess.call(command)
    if code:
      sys.exit(f"[{name}] failed with status {code}; rerun the same command to resume")
  with open(report, encoding="utf-8") as f:
    return json.load(f)


def pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}"


def write_tables(root: str, command: str, rows, markdown: str) -> None:
  with open(os.path.join(root, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump({"command": command, "rows": rows}, f, indent=2)
  with open(os.path.join(root, "comparison.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  print(markdown)
