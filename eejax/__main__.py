"""`python -m eejax`: eejax's commands, one line each (`python -m eejax.COMMAND --help` says more)."""
import sys

COMMANDS = (
    ("main", "train a run and write its report; the same command resumes it",
     "--config configs/cifar10.py[:preset] --workdir DIR [--config.x=y ...]"),
    ("export", "batch-1 exports of a finished run, each verified against JAX",
     "--workdir RUN --out DIR [--formats stablehlo,onnx,tflite,tflite_int8]"),
    ("certify", "thresholds certified by Learn then Test, from a run's saved logits",
     "--workdir RUN [--epsilons 0.01,0.05] [--delta 0.1]"),
    ("history", "a run's validation table so far and its training.png, while it trains or after",
     "--workdir RUN [--out DIR]"),
    ("compare", "finished runs side by side, pooled over seeds", "LABEL='R/label/seed*' ... [--out DIR]"),
    ("latex", "the tables of a Markdown report as LaTeX", "REPORT.md [...]"),
    ("cascade_runtime", "an exported cascade on images, without JAX (DIR/cascade.py is this file)",
     "DIR/cascade_FORMAT.json IMAGE_NPY_OR_FOLDER ..."),
)


def usage() -> str:
  lines = ["eejax: early-exit image classifiers. Commands:"]
  for name, what, args in COMMANDS:
    lines += [f"  python -m eejax.{name} {args}", f"      {what}"]
  return "\n".join(lines + ["`python -m eejax.COMMAND --help` lists a command's flags."])


def main(argv) -> int:
  if argv[1:] and argv[1] not in ("-h", "--help", "help"):
    known = ", ".join(name for name, _, _ in COMMANDS)
    print(f"eejax: error: run a command as python -m eejax.COMMAND ({known}); "
          f"python -m eejax lists them", file=sys.stderr)
    return 2
  print(usage())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
