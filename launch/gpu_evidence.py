"""The accelerator evidence, one step after another: the main job's accuracy, benchmarks, the papers' tables.

  python launch/gpu_evidence.py --root R --data DIR             # a GPU: every step at full size
  python launch/gpu_evidence.py --root R --data DIR --minutes 9  # the same, stopping cleanly within 9 minutes
  python launch/gpu_evidence.py --root R --data DIR --scale cpu  # the same steps, tiny: checks the plumbing

DIR is the class-per-folder CIFAR-10 tree. Each step is one command whose
output goes to R/logs/<step>.log; a finished step leaves R/steps/<step>.json
(command, exit status, seconds) and is skipped when the script runs again, so
a stopped run continues where it was. Workdirs go under R/work/.

The steps that answer the largest open question, the main job's accuracy,
come first. Short ablations (single exit, heads, loss weights, the share of
the early exits' gradient that reaches the backbone) show what the final exit
loses to the early ones; the main job (--main-epochs) takes the multi-exit
variant whose final exit is best on validation. Then `bench/accuracy_parity.py`
trains the same recipe again in PyTorch, on the single-exit ablation and on
the main job (or, where the peer lacks the main job's heads, on the
linear-head ablation): is a shortfall eejax's, or the recipe's and the data's?
The speed benchmarks, early exit and export on the main run, and the papers'
tables follow. R/summary.md lists every step's command, status, time and last lines.
"""
import argparse
import json
import os
import sys
import time

import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The GPU recipe for ResNet-18 with 4 exits: bfloat16 compute, batch 512, the learning rate scaled with it.
RECIPE = ["--config.model.dtype=bfloat16", "--config.train.batch_size=512", "--config.train.learning_rate=0.4",
          "--config.train.warmup_epochs=2", "--config.train.label_smoothing=0.1", "--config.eval.batch_size=1000"]
TINY = ["--config.model.name=resnet8", "--config.model.width=0.25", "--config.data.max_images=600",
        "--config.data.val_size=100", "--config.train.batch_size=32", "--config.train.steps_per_call=2",
        "--config.eval.batch_size=100", "--config.eval.real_inference=False"]


COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"


# Ablations of the main job at a shorter budget (same recipe otherwise): what the final exit loses to the
# early exits, to their heads, to their loss weights and to the gradient they send into the backbone.
def ablations(cpu):
  last, weights = ("3", "0.33,0.67,1.0") if cpu else ("8", "0.25,0.5,0.75,1.0")  # ResNet-8 / ResNet-18
  return {"single": [f"--config.model.exit_after={last}"],
          "linear": [],
          "pool_conv": ["--config.model.head=pool_conv"],
          "weighted": [f"--config.train.exit_weights={weights}"],
          "scaled": ["--config.model.exit_grad_scale=0.25"],
          "detached": ["--config.model.exit_grad_scale=0.0"],
          "init_pytorch": ["--config.train.init=pytorch"],  # PyTorch's first kernels, not flax's (README, VGG-16)
          "float32": ["--config.model.dtype=float32"]}  # every CPU parity check ran float32, the GPU job bfloat16
# The main job takes the best of these on validation. float32 is reported, never chosen: it answers whether
# bfloat16 costs accuracy, and the recipe stays bfloat16 unless a person reads the table and decides otherwise.
MULTI_EXIT_VARIANTS = ("linear", "pool_conv", "weighted", "scaled", "detached", "init_pytorch")


def final_exit_val_accuracy(workdir):
  import numpy as np  # pylint: disable=g-import-not-at-top
  logits = np.load(os.path.join(workdir, "logits.npz"))
  return float(np.mean(np.argmax(logits["val_logits"][-1], -1) == logits["val_labels"]))


def main_variant(work, cpu):
  """The multi-exit ablation whose final exit is most accurate on validation (never test): its overrides.

  Also writes work/ablation.md: every ablation's per-exit test accuracy and final-exit validation accuracy, at
  the end and at its best during training.
  """
  lines = ["| ablation | overrides | test accuracy per exit (%) | final exit, validation (%) "
           "| final exit, best validation during training (%) |", "|---|---|---|---:|---:|"]
  scored = []
  for name, extra in ablations(cpu).items():
    workdir = os.path.join(work, f"ablate_{name}")
    if not os.path.exists(os.path.join(workdir, "report.json")):
      continue
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
      report = json.load(f)
    exits = [100 * e["accuracy"] for e in report["exits"]]
    val = final_exit_val_accuracy(workdir)
    during = report.get("history") or []  # is the final exit past its best?
    best = f"{100 * during[-1]['best_val_accuracy']:.2f} at epoch {during[-1]['best_epoch']:.1f}" if during else "n/a"
    lines.append(f"| {name} | {' '.join(extra) or '(none)'} | {' / '.join(f'{a:.2f}' for a in exits)} "
                 f"| {100 * val:.2f} | {best} |")
    if name in MULTI_EXIT_VARIANTS:
      scored.append((val, name))
  best = max(scored)[1] if scored else "linear"
  lines += ["", f"The main job takes `{best}`: the multi-exit variant with the best final exit on validation."]
  with open(os.path.join(work, "ablation.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)
  return ablations(cpu)[best]


def parity_workdir(work):
  """The run the PyTorch peer trains again: the main job, or the linear-head ablation where the peer lacks its heads."""
  with open(os.path.join(work, "main", "config.json"), encoding="utf-8") as f:
    head = json.load(f)["model"]["head"]
  return os.path.join(work, "main" if head == "linear" else "ablate_linear")


def peer_init(workdir):
  """accuracy_parity.py's flags that start the peer where eejax started `workdir`'s run: its zero BatchNorm scales,
  and flax's kernel draw unless the run drew PyTorch's."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    init = json.load(f)["train"].get("init", "flax")
  return ["--peer-zero-init", *(["--peer-flax-init"] if init == "flax" else [])]


def evidence_steps(args):
  py, data = sys.executable, f"folder:{args.data}"
  work = os.path.join(args.root, "work")
  main_wd = os.path.join(work, "main")
  cpu = args.scale == "cpu"
  size = TINY if cpu else RECIPE
  short = [f"--config.train.epochs={1 if cpu else args.short_epochs}"]
  # The main job's accuracy first: the ablations, the main job, and the same recipe trained by the PyTorch peer.
  # The peer retrains the single-exit ablation right after it: eejax's or the recipe's and the data's, the one
  # question a lease cut short should still answer.
  parity = lambda workdir, name: [py, "bench/accuracy_parity.py", "--workdir", workdir, *peer_init(workdir),
                                  "--json", os.path.join(args.root, f"{name}.out.json")]
  for name, extra in ablations(cpu).items():
    yield f"ablate_{name}", [py, "-m", "eejax.main", "--config", "configs/cifar10.py", f"--workdir={work}/ablate_{name}",
                             f"--config.data.source={data}", *size, *extra, "--config.eval.real_inference=False",
                             f"--config.train.epochs={1 if cpu else args.ablation_epochs}"]
    if name == "single":
      yield "parity_single", lambda: parity(os.path.join(work, "ablate_single"), "parity_single")
  yield "main", lambda: [py, "-m", "eejax.main", "--config", "configs/cifar10.py", f"--workdir={main_wd}",
                         f"--config.data.source={data}", *size, *main_variant(work, cpu),
                         f"--config.train.epochs={1 if cpu else args.main_epochs}"]
  yield "parity_main", lambda: parity(parity_workdir(work), "parity_main")
  # Then the speed benchmarks, early exit and export on the main job's run, and the papers' tables.
  bench = (["--models", "resnet20", "--batch", "32", "--steps", "2", "--steps-per-call", "1",
            "--torch-compile", "off", "--sweep-batches", "64"] if cpu else
           ["--models", "resnet18", "--batch", "512", "--steps", "50", "--steps-per-call", "10",
            "--sweep-batches", "1024"])
  yield "train_step", [py, "bench/train_step.py", *bench, "--json", os.path.join(args.root, "train_step.out.json")]
  breakdown = ["--model", "resnet8", "--width", "1"] if cpu else []
  yield "step_breakdown", [py, "bench/step_breakdown.py", *breakdown, "--trace", os.path.join(work, "trace")]
  if not cpu:  # the scan's loop and the cascade's conditionals recorded into CUDA graphs (XLA command buffers)
    yield "step_breakdown_graphs", ["env", f"XLA_FLAGS={COMMAND_BUFFERS}", py, "bench/step_breakdown.py"]
  erde = (["--teacher", "resnet20", "--student", "resnet20"] if cpu else
          ["--teacher", "resnet34", "--student", "resnet18", "--student-width", "1", "--batch", "512"])
  yield "erde_step_f32", [py, "bench/erde_step.py", *erde]
  yield "erde_step_bf16", [py, "bench/erde_step.py", *erde, "--dtype", "bfloat16"]
  yield "threshold_search", [py, "bench/threshold_search.py"]
  n, batch = ("200", "100") if cpu else ("10000", "1024")
  yield "early_exit", [py, "bench/early_exit.py", "--workdir", main_wd, "--images", n, "--batch-size", batch]
  if not cpu:
    yield "early_exit_2500", [py, "bench/early_exit.py", "--workdir", main_wd, "--batch-size", "2500"]
  yield "threshold_search_main", [py, "bench/threshold_search.py", "--logits", os.path.join(main_wd, "logits.npz")]
  yield "export", [py, "-m", "eejax.export", "--workdir", main_wd, "--out", os.path.join(args.root, "export"),
                   "--formats", "stablehlo", "--images", "200"]
  if not cpu:
    yield "export_graphs", ["env", f"XLA_FLAGS={COMMAND_BUFFERS}", py, "-m", "eejax.export", "--workdir", main_wd,
                            "--out", os.path.join(args.root, "export_graphs"), "--formats", "stablehlo",
                            "--images", "200"]
  bts_common = [f"--config.bts.backbone={main_wd}", f"--config.data.source={data}",
                *(["--config.data.max_images=600", "--config.data.val_size=100", "--config.bts.epochs=1",
                   "--config.bts.positions=1,2"] if cpu
                  else [])]
  yield "bts", [py, "-m", "eejax.main", "--config", "configs/cifar10.py:bts", f"--workdir={work}/bts", *bts_common,
                "--config.bts.margins=-0.05,0,0.02,0.05,0.1"]
  yield "self_distillation", [py, "launch/self_distillation.py", "--scale", "gpu", "--root", f"{work}/sd",
                              "--data", data, "--", *size, *short]
  yield "erde", [py, "launch/erde.py", "--scale", "gpu", "--root", f"{work}/erde", "--data", data, "--",
                 *size, *short, f"--config.train.grad_clip={args.erde_grad_clip}",
                 *(["--config.model.name=resnet20"] if cpu else [])]
  yield "bts_grid", [py, "launch/bts_grid.py", "--config", "configs/cifar10.py:bts", f"--workdir={work}/bts_grid",
                     *bts_common, *(["--config.bts.epochs=5"] if not cpu else [])]
  # Last: MobileNet's training step against the same model in PyTorch, and its depthwise layer alone (on the
  # 2-core CPU: 0.22x PyTorch's step, 0.02x its depthwise layer; BENCHMARKS.md).
  mobile = (["--width", "0.25", "--batch", "32", "--steps", "2", "--steps-per-call", "1", "--torch-compile", "off"]
            if cpu else ["--batch", "512", "--steps", "50", "--steps-per-call", "10"])
  yield "train_step_mobilenet", [py, "bench/train_step.py", "--models", "mobilenet", *mobile,
                                 "--json", os.path.join(args.root, "train_step_mobilenet.out.json")]
  yield "depthwise", [py, "bench/depthwise.py", *(["--batch", "8", "--repeats", "2"] if cpu else ["--batch", "512"])]
  # And SDN's other two backbones, VGG-16 and WideResNet-32-4, against the same models in PyTorch.
  yield "train_step_sdn", [py, "bench/train_step.py", "--models", "vgg16,wrn32_4", *mobile,
                           "--json", os.path.join(args.root, "train_step_sdn.out.json")]
  # A short job of the main recipe started cold, again with the compilation cache filled (a resumed run), and
  # without the cache: on a GPU the cache also keeps XLA's convolution autotuning.
  yield "compile_cache", [py, "bench/compile_cache.py", "--data", data, "--config", "configs/cifar10.py", "--",
                          *size, "--config.data.max_images=2000"]


# The steps on the main job's run wait for it: on a lease, failing each in turn on a workdir without a run costs
# a start-up apiece and buries the one cause.
ON_MAIN = ("parity_main", "early_exit", "early_exit_2500", "threshold_search_main", "export", "export_graphs", "bts",
           "bts_grid")
NEEDS = {name: ("main",) for name in ON_MAIN}


def write_summary(root, names):
  lines = ["# Accelerator evidence: steps", ""]
  for name in names:
    info = steps.record(root, name)
    if info is not None:
      lines += [f"## {name}: exit status {info['status']}, {info['seconds']:.0f} s", "",
                "`" + " ".join(info["command"]) + "`", "", "```", *steps.tail(steps.log_path(root, name), 25),
                "```", ""]
    else:
      why = steps.blocked(root, name, NEEDS)
      lines += [f"## {name}: not run{f' ({why})' if why else ''}", ""]
  with open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--data", required=True, help="the class-per-folder CIFAR-10 tree")
  parser.add_argument("--scale", choices=("gpu", "cpu"), default="gpu")
  parser.add_argument("--main-epochs", type=int, default=120, help="epochs of the main job (ResNet-18, 4 exits)")
  parser.add_argument("--short-epochs", type=int, default=30, help="epochs of each self-distillation/ERDE run")
  parser.add_argument("--ablation-epochs", type=int, default=20, help="epochs of each ablation of the main job")
  parser.add_argument("--erde-grad-clip", type=float, default=2.0,
                      help="global-norm gradient clip of the four ERDE runs (unclipped KD exits collapsed at lr 0.4)")
  parser.add_argument("--only", default="", help="comma-separated step names; '' runs them all")
  parser.add_argument("--minutes", type=float, default=0.0,
                      help="stop cleanly before this many minutes (the running step saves its checkpoint); 0: no limit")
  args = parser.parse_args()
  start = time.monotonic()
  args.root, args.data = os.path.abspath(args.root), os.path.abspath(args.data)
  if not all(os.path.isdir(os.path.join(args.data, split)) for split in ("train", "test")):
    parser.error(f"--data {args.data}: not a class-per-folder tree (no train/ and test/ in it); every step reads it")
  os.makedirs(os.path.join(args.root, "work"), exist_ok=True)
  os.chdir(ROOT)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "bench"),
                                                     os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
  deadline = steps.deadline(start, args.minutes)
  named = list(evidence_steps(args))
  only = set(filter(None, args.only.split(",")))
  if only - {name for name, _ in named}:
    parser.error(f"--only: no step named {', '.join(sorted(only - {n for n, _ in named}))}; the steps: "
                 f"{', '.join(n for n, _ in named)}")
  left = run_steps(args.root, named, env, only, deadline)
  steps.end_if_left(left, args.minutes)


def run_steps(root, named_commands, env, only=frozenset(), deadline=None):
  """Runs each (name, command or callable giving one) in order, skipping finished ones; a failure goes on.

  Returns the names left undone (the deadline or a signal came first)."""
  names = [n for n, _ in named_commands]
  left = steps.run_steps(root, named_commands, env, only, deadline, after_each=lambda: write_summary(root, names),
                         needs=NEEDS)
  write_summary(root, names)
  return left


if __name__ == "__main__":
  main()
