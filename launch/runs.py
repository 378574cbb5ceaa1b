"""Helpers shared by the launch scripts: run one resumable eejax job, format table cells."""
import json
import os
import subprocess
import sys


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
