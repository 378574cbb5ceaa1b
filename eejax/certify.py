r"""Certified early-exit thresholds for a finished run, from its saved validation and test logits.

  python -m eejax.certify --workdir RUN [--risks disagreement,accuracy_loss] [--epsilons 0.005,0.01,0.02,0.05]
                          [--delta 0.1] [--family global] [--policy max_prob]

Prints the report's "Certified thresholds" table (`eejax.evaluate.risk_report`, `eejax.risk`) for a run
evaluated before the report had it, or for other settings; writes RUN/certified.md and .json.
"""
import os

from absl import app, flags, logging

from eejax import cli

if __name__ == "__main__":  # Ctrl-C while JAX loads below: one line, not a traceback from inside an import
  cli.exit_on_interrupt("eejax.certify")

# pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections

from eejax import evaluate, latex, report, risk, workdirs, xla_cache
from eejax.cli import fail, guarded, parse_flags
from eejax.flops import exit_macs
from eejax.run import load_run
# pylint: enable=g-import-not-at-top,wrong-import-position

def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  flags.DEFINE_string("workdir", None, "A finished run with logits.npz.")
  flags.DEFINE_list("risks", list(risk.RISKS), f"Any of: {', '.join(risk.RISKS)}.")
  flags.DEFINE_list("epsilons", ["0.005", "0.01", "0.02", "0.05"], "Risk tolerances (fractions).")
  flags.DEFINE_float("delta", 0.1, "1 - the confidence of the guarantee.")
  flags.DEFINE_enum("family", "global", list(risk.FAMILIES), "The ordered family of candidate thresholds.")
  flags.DEFINE_string("policy", "max_prob", "Exit policy.")


def epsilons_of(epsilons: list, risks: list) -> tuple:
  """--epsilons as numbers, or one line: a word there, or no tolerance or no risk, would certify nothing."""
  if not epsilons:
    fail("--epsilons is empty: give at least one risk tolerance (0.05 is 5%)", "eejax.certify")
  if not risks:
    fail(f"--risks is empty: give at least one risk ({', '.join(risk.RISKS)})", "eejax.certify")
  try:
    return tuple(float(e) for e in epsilons)
  except ValueError:
    fail(f"--epsilons={','.join(epsilons)}: give risk tolerances as fractions separated by commas (0.05 is 5%)",
         "eejax.certify")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if not f.workdir:
    fail("give --workdir=RUN", "eejax.certify")
  epsilons = epsilons_of(f.epsilons, f.risks)

  def job():
    run = load_run(f.workdir)
    xla_cache.enable_for_run(run.config)  # before the searches compile (loading compiles two tiny programs)
    saved = workdirs.read_npz(os.path.join(f.workdir, "logits.npz"),
                              ("val_logits", "val_labels", "test_logits", "test_labels"))
    cfg = ml_collections.ConfigDict({"risks": tuple(f.risks), "risk_epsilons": epsilons,
                                     "risk_delta": f.delta, "risk_family": f.family})
    return evaluate.risk_report((saved["val_logits"], saved["val_labels"]),
                                (saved["test_logits"], saved["test_labels"]),
                                exit_macs(run.model, run.spec.image_shape), cfg, f.policy)
  rows = guarded(job, "eejax.certify", f.workdir)
  text = "\n".join(report.certified_lines({"certified": rows})).strip() + "\n"
  latex.write_markdown(os.path.join(f.workdir, "certified.md"), text)
  workdirs.write_json(os.path.join(f.workdir, "certified.json"), rows)
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags(argv, "eejax.certify"))
