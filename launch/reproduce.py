"""Every headline table and figure of the README from one command, in resumable, time-boxed stages.

  python launch/reproduce.py --scale gpu --workdir R                 # a GPU; CIFAR-10 downloaded once
  python launch/reproduce.py --scale cpu --data folder:../shared/data/cifar10 --workdir R --minutes 30
  python launch/reproduce.py --scale smoke --data folder:TREE --workdir R   # every stage in minutes, on a CPU

Stages, in order of value (`--only` picks some; `bts` and the trained-run
steps of `main` need `main`'s run):
  throughput         bench/train_step.py (against PyTorch when it is installed), bench/early_exit.py on an
                     untrained network, bench/threshold_search.py (against the MSDNet/SDN loop)
  main               configs/cifar10.py (gpu: the GPU recipe; cpu: the :cpu preset; smoke: :smoke) with its
                     report, then real early exit and a StableHLO export of that run
  bts                launch/bts_grid.py: the BTS-EE 64-configuration grid on main's run as backbone
  erde               launch/erde.py: teacher, student alone, KD, ERDE
  self_distillation  launch/self_distillation.py: joint, BYOT, MATE
  sdn                launch/sdn.py: the network alone, IC-only, SDN training, joint (SDN's own recipe at
                     cpu and gpu scale: the GPU recipe's time box would cut SDN's step schedule short)

Each step is one command with its log in R/logs/; finished steps are kept and
the runs inside a step resume from their checkpoints, so the same command
continues where it stopped. `--minutes N` stops cleanly before N minutes (the
running step gets SIGTERM early enough to save its checkpoint), exits 0 and
says what is left; SIGTERM or Ctrl-C do the same at once. R/summary.md holds
every table and figure with its command, the hardware line and the date.
"""
import functools
import os
import subprocess
import sys
import time

from absl import app, flags

import steps
from eejax.cli import parse_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("throughput", "main", "bts", "erde", "self_distillation", "sdn")
NEEDS = {"main_early_exit": ("main",), "main_export": ("main",), "bts_grid": ("main",)}  # steps on main's run

# The GPU recipe for ResNet-18 with 4 exits: bfloat16 compute, batch 512, the learning rate scaled with it.
GPU_RECIPE = ["--config.model.dtype=bfloat16", "--config.train.batch_size=512", "--config.train.learning_rate=0.4",
              "--config.train.warmup_epochs=2", "--config.train.label_smoothing=0.1", "--config.eval.batch_size=1000"]
SMOKE = ["--config.model.name=resnet8", "--config.model.width=0.25", "--config.data.max_images=96",
         "--config.data.val_size=16", "--config.train.epochs=1", "--config.train.batch_size=16",
         "--config.train.steps_per_call=2", "--config.eval.batch_size=32", "--config.eval.num_thresholds=10",
         "--config.eval.real_inference=False", "--config.checkpoint.every_steps=4"]
SCALES = {
    "smoke": {"main": ("configs/cifar10.py:smoke", ["--config.eval.real_inference=False"]),
              "train_step": ["--models", "resnet8", "--batch", "16", "--steps", "2", "--steps-per-call", "1",
                             "--torch-compile", "off", "--dtypes", "float32"],
              "early_exit": ["--model", "resnet8", "--images", "128", "--batch-size", "64", "--repeats", "1"],
              "early_exit_main": ["--images", "32", "--batch-size", "16", "--repeats", "1"],
              "threshold_search": ["--settings", "5"],
              "bts": ("configs/cifar10.py:bts_cpu", ["--config.data.max_images=96", "--config.data.val_size=16",
                                                     "--config.bts.epochs=1", "--config.eval.batch_size=32"]),
              "launch_scale": "cpu", "runs": SMOKE},
    "cpu": {"main": ("configs/cifar10.py:cpu", []),
            "train_step": ["--models", "resnet20", "--batch", "64", "--steps", "6", "--steps-per-call", "1"],
            "early_exit": ["--model", "resnet20", "--images", "2000", "--batch-size", "500"],
            "early_exit_main": ["--images", "10000", "--batch-size", "1000"],
            "threshold_search": [],
            "bts": ("configs/cifar10.py:bts_cpu", ["--config.data.max_images=12000", "--config.data.val_size=2000",
                                                   "--config.bts.epochs=5"]),
            "launch_scale": "cpu", "runs": []},
    "gpu": {"main": ("configs/cifar10.py", GPU_RECIPE),
            "train_step": ["--models", "resnet18", "--width", "1", "--batch", "512", "--steps", "50",
                           "--steps-per-call", "10", "--sweep-batches", "256,1024,2048"],
            "early_exit": ["--model", "resnet18", "--images", "10000", "--batch-size", "1024"],
            "early_exit_main": ["--images", "10000", "--batch-size", "1024"],
            "threshold_search": [],
            "bts": ("configs/cifar10.py:bts", []),
            "launch_scale": "gpu", "runs": [*GPU_RECIPE, "--config.train.epochs=30", "--config.train.grad_clip=2.0"]},
}

flags.DEFINE_enum("scale", "smoke", sorted(SCALES), "smoke: minutes on a CPU; cpu: the CPU tables; gpu: full size.")
flags.DEFINE_string("data", "", "data.source of every run ('': the configs' own, CIFAR-10 downloaded once).")
flags.DEFINE_string("workdir", None, "Folder for every run, log and summary.md.")
flags.DEFINE_list("only", [], f"Stages to run (default all): {', '.join(STAGES)}.")
flags.DEFINE_float("minutes", 0.0, "Stop cleanly before this many minutes (0: no limit).", lower_bound=0.0)
FLAGS = flags.FLAGS


def plan(scale: str, data: str, root: str):
  """(stage, step name, command, artifacts) in order; artifacts are the tables (.md) and figures (.png)."""
  s, py, work = SCALES[scale], sys.executable, os.path.join(root, "work")
  source = [f"--config.data.source={data}"] if data else []
  main_wd = os.path.join(work, "main")
  yield ("throughput", "train_step", [py, "bench/train_step.py", *s["train_step"]], [])
  yield ("throughput", "early_exit", [py, "bench/early_exit.py", *s["early_exit"]], [])
  yield ("throughput", "threshold_search", [py, "bench/threshold_search.py", *s["threshold_search"]], [])
  config, extra = s["main"]
  yield ("main", "main", [py, "-m", "eejax.main", "--config", config, f"--workdir={main_wd}", *source, *extra],
         [os.path.join(main_wd, "report.md"), os.path.join(main_wd, "curve.png")])
  yield ("main", "main_early_exit", [py, "bench/early_exit.py", "--workdir", main_wd, *s["early_exit_main"]], [])
  yield ("main", "main_export", [py, "-m", "eejax.export", "--workdir", main_wd, "--out",
                                 os.path.join(work, "export"), "--formats", "stablehlo", "--images", "32"], [])
  config, extra = s["bts"]
  yield ("bts", "bts_grid", [py, "launch/bts_grid.py", "--config", config, f"--workdir={work}/bts_grid",
                             f"--config.bts.backbone={main_wd}", *source, *extra],
         [os.path.join(work, "bts_grid", "grid.md"), os.path.join(work, "bts_grid", "grid.png")])
  launch = lambda script, name: [py, f"launch/{script}", "--scale", s["launch_scale"], "--root", f"{work}/{name}",
                                 f"--data={data}", "--", *s["runs"]]
  yield ("erde", "erde", launch("erde.py", "erde"), [os.path.join(work, "erde", "comparison.md")])
  yield ("self_distillation", "self_distillation", launch("self_distillation.py", "self_distillation"),
         [os.path.join(work, "self_distillation", "comparison.md")])
  sdn = [py, "launch/sdn.py", "--scale", s["launch_scale"], "--root", f"{work}/sdn", f"--data={data}", "--",
         *(SMOKE if scale == "smoke" else [])]
  yield ("sdn", "sdn", sdn, [os.path.join(work, "sdn", "comparison.md")])


def hardware_line(env) -> str:
  code = ("import jax, platform; d = jax.devices(); print(f'{d[0].device_kind} x{len(d)} ({jax.default_backend()}), "
          "host {platform.machine()}, jax {jax.__version__}')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
  return out.stdout.strip() or f"unknown (probing jax failed: {out.stderr.strip()[-200:]})"


def write_summary(root: str, planned, hardware: str, command: str, left=()) -> None:
  lines = ["# eejax: reproduced tables and figures", "",
           f"Command: `{command}`", "", f"Hardware: {hardware}", "", f"Date: {time.strftime('%Y-%m-%d')}", ""]
  if left:
    lines += [f"Not finished yet: {', '.join(left)} (run the same command again to continue).", ""]
  stage = None
  for stage_name, name, command_of_step, artifacts in planned:
    if stage_name != stage:
      stage = stage_name
      lines += [f"## {stage}", ""]
    r = steps.record(root, name)
    if r is None:
      why = steps.blocked(root, name, NEEDS)
      lines += [f"### {name}: not run yet{f' ({why})' if why else ''}", ""]
      continue
    lines += [f"### {name}: {'done' if r['status'] == 0 else 'failed, exit status ' + str(r['status'])}, "
              f"{r['seconds']:.0f} s", "", "`" + " ".join(_short(c) for c in r["command"]) + "`", ""]
    tables = [a for a in artifacts if a.endswith(".md") and os.path.exists(a)]
    if r["status"] != 0 or not tables:  # a benchmark prints its table; a failure shows its last lines
      log = [l for l in steps.tail(steps.log_path(root, name), 40) if not l.startswith("$ ")]
      lines += ["```", *log[-(12 if r["status"] == 0 else 20):], "```", ""]
    for path in tables:
      with open(path, encoding="utf-8") as f:
        body = f.read().strip().splitlines()
      lines += ["###" + l if l.startswith("#") else l for l in body] + [""]  # below the step's heading
    lines += [f"![{name}]({os.path.relpath(a, root)})" for a in artifacts if a.endswith(".png") and os.path.exists(a)]
    lines += [""]
  with open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def _short(arg: str) -> str:
  return "python" if arg == sys.executable else arg


def main(argv):
  del argv
  if not FLAGS.workdir:
    sys.exit("reproduce: error: give --workdir=DIR")
  unknown = set(FLAGS.only) - set(STAGES)
  if unknown:
    sys.exit(f"reproduce: error: unknown stage(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGES)}")
  start = time.monotonic()
  steps.catch_signals()  # a stop asked for during start-up is honoured too
  root = os.path.abspath(FLAGS.workdir)
  os.makedirs(root, exist_ok=True)
  data = steps.absolute_source(FLAGS.data)  # from where the user is, before the move to the repository
  os.chdir(ROOT)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "bench"),
                                                     os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
  planned = list(plan(FLAGS.scale, data, root))
  command = "python launch/reproduce.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--minutes"))
  hardware = hardware_line(env)
  # The running step is asked to stop early enough to save its checkpoint and exit before the limit.
  deadline = steps.deadline(start, FLAGS.minutes)
  only = {name for stage, name, _, _ in planned if stage in FLAGS.only} if FLAGS.only else frozenset()
  summary = lambda left=(): write_summary(root, planned, hardware, command, left)
  left = steps.run_steps(root, [(name, cmd) for _, name, cmd, _ in planned], env, only, deadline, summary, NEEDS)
  summary(left)
  failed = [name for _, name, _, _ in planned if (not only or name in only) and
            (r := steps.record(root, name)) is not None and r["status"] != 0]
  print(f"summary: {os.path.join(root, 'summary.md')} ({time.monotonic() - start:.0f} s)")
  steps.end_if_left(left, FLAGS.minutes)
  skipped = [name for _, name, _, _ in planned if (not only or name in only) and steps.record(root, name) is None
             and steps.blocked(root, name, NEEDS)]
  if failed or skipped:
    sys.exit(f"failed: {', '.join(failed) or 'none'}" + (f"; skipped for want of them: {', '.join(skipped)}"
                                                         if skipped else "")
             + f" (logs in {root}/logs; the same command runs them again)")
  print("every stage finished")


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(parse_flags, program="reproduce"))
