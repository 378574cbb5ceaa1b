r"""BTS-EE grid: 64 configurations, each boosted and non-boosted from the same frozen backbone.

The axes (4 x 4 x 4 = 64):
  branch positions  4 sets, as fractions of the backbone's blocks, rounded to block numbers:
                    {1/4, 1/2, 3/4}, {1/2, 3/4}, {1/4, 1/2}, {1/3, 2/3}
                    (ResNet-18's 8 blocks: 2,4,6 / 4,6 / 2,4 / 3,5; ResNet-20's 9: 2,4,7 / 4,7 / 2,4 / 3,6)
  branch width      2, 4, 8, 16 filters of the 1D convolution
  CPM margin        0, 0.02, 0.05, 0.1
The backbone's pooled features are extracted once; branches trained on the
same images are shared (non-boosted branches across margins, the first
boosted branch with the non-boosted one). Every other setting is the
config's (config.bts), so any `--config.x=y` applies to all 128 runs.

Writes WORKDIR/grid.md and grid.json (per configuration: test accuracy and
MACs saved, boosted and non-boosted, and the differences) and grid.png
(accuracy against mean MACs, both modes). Finished configurations are kept
in WORKDIR/rows/ and skipped when the same command is run again; a grid of
other settings (bar the axes above), or whose backbone now holds other
weights (WORKDIR/backbone.json), is refused there with one line.

The ResNet-18 grid (GPU): first the backbone, then the grid:
  python -m eejax.main --config configs/cifar10.py --workdir /tmp/r18 \
    --config.data.source=folder:../shared/data/cifar10
  python launch/bts_grid.py --config configs/cifar10.py:bts --workdir /tmp/bts_grid \
    --config.bts.backbone=/tmp/r18 --config.data.source=folder:../shared/data/cifar10

The small setting (this 2-core CPU, minutes): a ResNet-20 at half width on 12,000 images, 10 epochs:
  python -m eejax.main --config configs/cifar10.py:cpu --workdir /tmp/tiny_backbone \
    --config.data.source=folder:../shared/data/cifar10 --config.model.name=resnet20 \
    --config.model.width=0.5 --config.data.max_images=12000 --config.data.val_size=2000 \
    --config.train.epochs=10 --config.eval.real_inference=False
  python launch/bts_grid.py --config configs/cifar10.py:bts --workdir /tmp/bts_grid_tiny \
    --config.bts.backbone=/tmp/tiny_backbone --config.data.source=folder:../shared/data/cifar10 \
    --config.data.max_images=12000 --config.data.val_size=2000 --config.bts.epochs=5
"""
import functools
import glob
import itertools
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from eejax import boosted, bts, latex, workdirs
from eejax.cli import config_value, fail, guarded, parse_flags
from eejax.run import check_frozen

POSITION_FRACTIONS = ((1 / 4, 1 / 2, 3 / 4), (1 / 2, 3 / 4), (1 / 4, 1 / 2), (1 / 3, 2 / 3))
WIDTHS = (2, 4, 8, 16)
MARGINS = (0.0, 0.02, 0.05, 0.1)
GRID_AXES = ("positions", "head_width", "margins", "baseline")  # bts settings the grid sets itself

_CONFIG = config_flags.DEFINE_config_file("config", None, "A BTS-EE config, e.g. configs/cifar10.py:bts.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the grid's rows, tables and plot.")


def position_sets(num_blocks: int) -> list[tuple[int, ...]]:
  """The 4 branch-position sets for a backbone of num_blocks blocks (1-based, below the last block).

  >>> position_sets(8)
  [(2, 4, 6), (4, 6), (2, 4), (3, 5)]
  """
  sets = []
  for fractions in POSITION_FRACTIONS:
    blocks = sorted({min(max(1, round(f * num_blocks)), num_blocks - 1) for f in fractions})
    sets.append(tuple(blocks))
  return sets


def grid_markdown(rows: list[dict], reference: dict, command: str) -> str:
  pairs = bts.paired(rows)
  better_acc = sum(p["accuracy_difference"] > 0 for p in pairs)
  better_both = sum(p["accuracy_difference"] >= 0 and p["macs_reduction_difference"] >= 0 for p in pairs)
  mean = lambda key: 100 * sum(p[key] for p in pairs) / max(len(pairs), 1)
  lines = ["# BTS-EE grid: boosted vs non-boosted", "", f"Command: `{command}`", "",
           f"Backbone alone: {100 * reference['accuracy']:.2f}% test accuracy at {reference['macs'] / 1e6:.2f} M MACs. "
           f"{len(pairs)} configurations; boosted more accurate in {better_acc}, at least as good on both accuracy "
           f"and MACs saved in {better_both}; mean difference {mean('accuracy_difference'):+.2f} accuracy points, "
           f"{mean('macs_reduction_difference'):+z.2f} MACs-saved points.", "",
           "| positions | width | margin | boosted acc | non-boosted acc | diff | boosted MACs saved | "
           "non-boosted MACs saved | diff |", "|---|---|---|---|---|---|---|---|---|"]
  for p in pairs:
    lines.append(f"| {','.join(map(str, p['positions']))} | {p['head_width']} | {p['margin']:g} | "
                 f"{100 * p['boosted_accuracy']:.2f} | {100 * p['nonboosted_accuracy']:.2f} | "
                 f"{100 * p['accuracy_difference']:+.2f} | {100 * p['boosted_macs_reduction']:z.1f} | "
                 f"{100 * p['nonboosted_macs_reduction']:z.1f} | {100 * p['macs_reduction_difference']:+z.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  config, workdir = config_value(_CONFIG, "bts_grid"), _WORKDIR.value
  if config is None or not workdir:
    fail("give --config=configs/FILE.py:bts and --workdir=DIR", "bts_grid")
  guarded(lambda: run_grid(config, workdir), "bts_grid", workdir)


def run_grid(config, workdir: str) -> None:
  """The grid in `workdir`, keeping the configurations a run of the same settings finished there."""
  workdirs.check_path(workdir, "workdir", "--workdir")
  with workdirs.lock(workdir):  # one grid at a time in a workdir
    bts.check_same_run(config, workdir, free=GRID_AXES)  # the rows kept are of these settings
    bb = bts.prepare(config)
    sets = [boosted.check_positions(s, bb.num_blocks) for s in position_sets(bb.num_blocks)]
    check_frozen(workdir, "backbone", bb.run, resuming=bool(glob.glob(os.path.join(workdir, "rows", "*.json"))))
    workdirs.save_config(workdir, config)
    grid(config, workdir, bb, sets)


def grid(config, workdir: str, bb: bts.Backbone, sets) -> None:
  """Every configuration not in WORKDIR/rows/ yet, then grid.md, grid.json and grid.png."""
  settings = boosted.Settings.from_config(config.bts, seed=config.seed)
  device_train, memo = boosted.device_arrays(bb.train), {}
  os.makedirs(os.path.join(workdir, "rows"), exist_ok=True)
  rows, t0 = [], time.perf_counter()
  configurations = list(itertools.product(sets, WIDTHS))
  for i, (positions, width) in enumerate(configurations):
    path = os.path.join(workdir, "rows", f"p{'-'.join(map(str, positions))}_w{width}.json")
    if os.path.exists(path):
      rows += workdirs.read_json(path)
      continue
    done = bts.run_configuration(bb, positions, width, MARGINS, bts.MODES, settings, device_train, memo,
                                 log=lambda s: None)
    for r in done:
      r.pop("stages", None)  # kept small: the per-stage log is in a single run's report
    workdirs.write_json(path, done, indent=None)  # whole or not at all: a stop mid-write leaves no half row file
    rows += done
    elapsed = time.perf_counter() - t0
    print(f"[{i + 1}/{len(configurations)}] positions {positions} width {width}: "
          + ", ".join(f"{r['mode'][0]}{r['margin']:g} {100 * r['accuracy']:.1f}%/{100 * r['macs_reduction']:.0f}%"
                      for r in done) + f" ({elapsed:.0f}s)", flush=True)
  command = "python launch/bts_grid.py " + " ".join(sys.argv[1:])
  reference = bb.reference()
  report = {"method": "bts-ee grid", "backbone": bb.run.workdir, "backbone_name": bb.run.config.model.name,
            "reference": reference, "rows": rows, "pairs": bts.paired(rows), "command": command}
  workdirs.write_json(os.path.join(workdir, "grid.json"), report)
  markdown = grid_markdown(rows, reference, command)
  latex.write_markdown(os.path.join(workdir, "grid.md"), markdown)
  bts.plot(report, os.path.join(workdir, "grid.png"))
  print(markdown)
  print(f"grid in {workdir}/grid.md, grid.json and grid.png")


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(parse_flags, program="bts_grid"))
