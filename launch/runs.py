"""Helpers shared by the launch scripts: arguments, one resumable eejax job, table cells and files."""
import json
import os
import signal
import sys
import types

import ml_collections
from absl import flags
from ml_collections import config_flags

import steps
from eejax import compare, latex
from eejax import run as eejax_run
from eejax.cli import parse_flags, split_names
from eejax.signals import wait_for_job


def parse_args(scales, name: str):
  """The launch scripts' common flags (absl, as every eejax command line); --root defaults to workdirs/<name>_<scale>.
  --help prints the script's docstring (absl reads it from __main__) and these flags.

  Anything after `--` is passed to every run as more --config.x=y overrides. Runs from any folder: the paths given
  are read from there, and the jobs then run from the repository root.
  """
  flags.DEFINE_enum("scale", "cpu", sorted(scales), "How big the runs are (the scales above).")
  flags.DEFINE_string("config", "configs/cifar10.py", "The config file of every run.")
  flags.DEFINE_string("data", "", "data.source of every run ('': the config's own, e.g. cifar10, downloaded).")
  flags.DEFINE_string("root", None, "Folder for the runs' workdirs and the table.")
  flags.DEFINE_integer("seeds", 1, "Runs of each variant, seeds 0 to N-1 (seed 0 in ROOT/<name>, seed S in "
                       "ROOT/<name>_seedS); above 1, ROOT/compare.md pools them (mean ± std, eejax.compare).",
                       lower_bound=1)
  for flag in ("scale", "config", "data", "root", "seeds"):  # the script's own, so that --help lists them
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag])
  extra = parse_flags(sys.argv, program=name)[1:]
  f = flags.FLAGS
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  root = os.path.abspath(f.root) if f.root else os.path.join(repo, "workdirs", f"{name}_{f.scale}")
  config = f.config  # a file here, else the repository's (configs/cifar10.py from anywhere)
  config = os.path.abspath(config) if os.path.exists(config.partition(":")[0]) else config
  data = steps.absolute_source(f.data)
  os.chdir(repo)  # the paths given were made absolute first: they name places from where the user is
  return types.SimpleNamespace(scale=f.scale, config=config, data=data, root=root, extra=list(extra), seeds=f.seeds)


def command_line(script: str, args) -> str:
  """The launcher's command as it can be typed again: its flags, then `--` and the config overrides it was given."""
  return " ".join([f"python launch/{script}", f"--scale {args.scale}", f"--config {args.config}",
                   f"--data {args.data}", f"--root {args.root}", f"--seeds {args.seeds}",
                   *(["--", *args.extra] if args.extra else [])])


def run_seeds(name: str, config: str, workdir: str, data: str, extra, seeds: int) -> list[tuple[str, dict]]:
  """[(workdir, report)] of `run` with seeds 0..seeds-1: seed 0 is the config's own run in `workdir`, as with one
  seed; seed S runs in workdir_seedS."""
  seeded = [(workdir, [])] + [(f"{workdir}_seed{s}", [f"--config.seed={s}"]) for s in range(1, seeds)]
  return [(w, run(name, config, w, data, list(extra) + seed)) for w, seed in seeded]


def write_seed_table(root: str, command: str, groups) -> None:
  """ROOT/compare.md, .json and .png: each group's runs pooled over seeds (`eejax.compare`)."""
  if all(len(workdirs) < 2 for _, workdirs in groups):
    return
  print(compare.write(compare.compare(groups), root, command))


def job_config(config: str, overrides) -> ml_collections.ConfigDict:
  """The config `python -m eejax.main --config CONFIG OVERRIDES` runs with, parsed as it parses it."""
  argv, values = ["eejax.main", f"--config={config}", *overrides], flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  split_names(values.config)
  return values.config


def finished(workdir: str, config: str, overrides) -> bool:
  """Whether `workdir` holds a finished run of this job: its report written, and its config.json that of the job
  in all that shapes the result and its report (`workdirs.shapes_result`: its length and evaluation included) and
  where its data is (the job itself checks the data's fingerprint). Any doubt runs the job, which goes on,
  evaluates again or refuses other settings with one line."""
  if not os.path.exists(os.path.join(workdir, "report.json")):
    return False
  try:
    wanted, saved = job_config(config, overrides), eejax_run.load_config(workdir)
  except Exception:  # pylint: disable=broad-except  # a config the job would refuse, a damaged config.json
    return False
  return not eejax_run.setting_differences(saved, wanted) and (  # a relative path read from the repository
      steps.absolute_source(saved.data.source) == steps.absolute_source(wanted.data.source))


def run(name: str, config: str, workdir: str, data: str, extra) -> dict:
  """Runs `python -m eejax.main` unless workdir holds its finished run (`finished`); returns the report."""
  report = os.path.join(workdir, "report.json")
  overrides = [*([f"--config.data.source={data}"] if data else []), *extra]
  if finished(workdir, config, overrides):
    print(f"[{name}] done already: {workdir}")
  else:
    command = [sys.executable, "-m", "eejax.main", "--config", config, f"--workdir={workdir}", *overrides]
    print(f"[{name}] {' '.join(command)}", flush=True)
    code, signum = wait_for_job(steps.with_parent(command))  # stopped with this launcher
    stop = signum or (code - 128 if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else None)
    if stop:
      print(f"[{name}] stopped by {signal.Signals(stop).name} (exit status {code}): run the same command again to "
            "resume it (finished runs are kept)", file=sys.stderr, flush=True)
      sys.exit(128 + stop)
    if code == 2:  # a mistake, named on the job's own error line: rerunning as it is would stop the same way
      sys.exit(f"[{name}] stopped with status 2: do what its error line above says, then run this command again "
               "(finished runs are kept)")
    if code:
      sys.exit(f"[{name}] failed with status {code}; rerun the same command to resume")
  with open(report, encoding="utf-8") as f:
    return json.load(f)


def pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}"


def report_row(report) -> dict:
  """What a launcher's table reads of a run's report: per-exit accuracy, the max-probability policy's budgets,
  and the val-fitted thresholds for 50% of the MACs."""
  fitted = {r["budget"]: r["per_exit"] for r in report["fitted_on_val"]["max_prob"]}.get(0.5)
  return {"model": report["model"], "exit_accuracy": [e["accuracy"] for e in report["exits"]],
          "max_prob_budget_accuracy": report["policies"]["max_prob"]["budgets"],
          "fitted_50_test_accuracy": fitted and fitted["test_accuracy"],
          "fitted_50_macs_fraction": fitted and fitted["test_macs_fraction"]}


def exit_table(rows, label: str, key: str) -> list[str]:
  """Markdown lines of a launcher's table: per-exit accuracy, the max-probability policy at each MACs budget, and
  val-fitted thresholds for 50% of the MACs; a row's `key` names it (a row with fewer exits is padded on the left)."""
  budgets = list(rows[-1]["max_prob_budget_accuracy"])
  num_exits = max(len(r["exit_accuracy"]) for r in rows)
  lines = [f"| {label} | " + " | ".join(f"exit {e + 1}" for e in range(num_exits)) + " | "
           + " | ".join(f"@{100 * float(b):.0f}% MACs" for b in budgets) + " | fitted 50%: accuracy (MACs %) |",
           "|---|" + "---:|" * (num_exits + len(budgets) + 1)]
  for r in rows:
    exits = [None] * (num_exits - len(r["exit_accuracy"])) + list(r["exit_accuracy"])
    macs = "" if r["fitted_50_macs_fraction"] is None else f" ({100 * r['fitted_50_macs_fraction']:.1f})"
    lines.append(f"| {r[key]} | " + " | ".join(pct(a) for a in exits) + " | "
                 + " | ".join(pct(r["max_prob_budget_accuracy"].get(b)) for b in budgets)
                 + f" | {pct(r['fitted_50_test_accuracy'])}{macs} |")
  return lines


def write_tables(root: str, command: str, rows, markdown: str) -> None:
  with open(os.path.join(root, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump({"command": command, "rows": rows}, f, indent=2)
  latex.write_markdown(os.path.join(root, "comparison.md"), markdown)
  print(markdown)
