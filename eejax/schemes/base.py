"""A training scheme as data: its loss, what else trains, an optional frozen teacher, extra report fields.

The training loop (`eejax.train`) reads a `Scheme` and never tests a scheme's
name. Adding one is one module that calls `register(Scheme(...))` plus, if it
has settings, a config section named after it (read as `LossInputs.section`).
"""
import dataclasses
from typing import Any, Callable, NamedTuple

from eejax.errors import unknown_name


class LossInputs(NamedTuple):
  """What a scheme's loss sees at every step (inside jit)."""
  logits_ExBxC: Any
  labels_B: Any
  weights_E: tuple  # train.exit_weights, one per exit
  label_smoothing: float
  section: Any  # config[scheme name], or None when the config has no such section
  teacher_logits_ExBxC: Any = None  # the frozen teacher's logits, paired with the exits (schemes with a teacher)
  aux: Any = None  # the model's aux outputs (features; MATE's ensemble_logits_JxE)
  epoch: Any = None  # the 1-based epoch of this step (a traced integer)
  num_epochs: int = 0  # train.epochs


class Teacher(NamedTuple):
  """A frozen network run in the same step: forward(variables, x_BxHxWx3) -> teacher_logits_ExBxC. Never saved;
  `source` (an `eejax.run.Run`) is the run it comes from, whose weights the student's workdir records."""
  forward: Callable
  variables: Any
  source: Any


@dataclasses.dataclass(frozen=True)
class Scheme:
  """loss(LossInputs) -> (loss, metrics: names ending in _E hold one value per exit).

  has_section: the config must have a section named after the scheme.
  ensemble_teachers: the model also trains MATE's ensemble weights (a parameter of `MultiExitNet`).
  teacher(config, model, spec, mesh) -> Teacher: a frozen network whose logits the loss reads.
  report(params) -> dict: extra fields for report.json.
  job(config, workdir) -> report: a scheme that is its own job instead of the training loop (BTS-EE).
  fixed(name, num_exits) -> bool: the top-level module `name` (`stem_conv`, `blocks_3`, `heads_0`, ...) does not
    train: its parameters and BatchNorm statistics stay as they were at step 0.
  init(config, state, spec, mesh) -> state: a fresh run's state (not a resumed one) made from another run.
  """
  name: str
  loss: Callable | None = None
  has_section: bool = False  # the loss reads config[name] (LossInputs.section)
  ensemble_teachers: bool = False
  teacher: Callable | None = None
  report: Callable | None = None
  job: Callable | None = None
  fixed: Callable | None = None
  init: Callable | None = None


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
  SCHEMES[scheme.name] = scheme
  return scheme


def get(name: str) -> Scheme:
  if name not in SCHEMES:
    raise unknown_name("scheme", name, SCHEMES)
  return SCHEMES[name]
