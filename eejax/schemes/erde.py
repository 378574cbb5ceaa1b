"""erde: an early-exit teacher run distilled into a student, with an entropy term on the teacher's mistakes.

Guidez et al., arXiv 2510.04856; config.erde. The teacher is a finished eejax
run (`config.erde.teacher`), frozen, run in the same step on the same batch,
and never saved with the student: WORKDIR/teacher.json records the SHA-256 of
its weights, and a resumed student must find the same (`eejax.run.check_frozen`).
"""
import jax.numpy as jnp

from eejax import losses
from eejax.errors import UserError
from eejax.run import load_run
from eejax.schemes.base import Scheme, Teacher, register


def loss(b):
  s = b.section
  return losses.erde_loss(b.logits_ExBxC, b.teacher_logits_ExBxC, b.labels_B, b.weights_E,
                          temperature=s.temperature, kd_weight=s.kd_weight, entropy_weight=s.entropy_weight,
                          drop_kd_on_errors=s.drop_kd_on_errors, reference=s.reference,
                          label_smoothing=b.label_smoothing)


def teacher(config, model, spec, mesh) -> Teacher:
  """The frozen teacher run, its exits paired with the student's."""
  path = config.erde.teacher
  if not path:
    raise UserError("scheme=erde needs --config.erde.teacher=WORKDIR, the workdir of a trained teacher run")
  run = load_run(path, mesh)
  run.check_finished("teacher")
  run.spec.check_matches(spec.num_classes, spec.image_shape, "teacher", path)
  pairing = None if config.erde.pairing is None else tuple(config.erde.pairing)
  try:
    pairs_E = losses.pair_exits(model.num_exits, run.model.num_exits, pairing)
  except ValueError as e:
    raise UserError(f"erde.pairing: {e}") from None
  print(f"teacher: {run.config.model.name} ({run.model.num_exits} exits) from {path}; "
        f"student exit -> teacher exit: {[p + 1 for p in pairs_E]}")

  def forward(variables, x_BxHxWx3):
    logits_TxBxC, _ = run.model.apply(variables, x_BxHxWx3, train=False)
    return logits_TxBxC[jnp.asarray(pairs_E)]
  return Teacher(forward, run.variables, run)


SCHEME = register(Scheme("erde", loss=loss, has_section=True, teacher=teacher))
