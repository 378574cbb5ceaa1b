"""Losses as small pure array functions with per-example outputs.

Shapes: E exits, B batch, C classes.
"""
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_ExBxC, labels_B, label_smoothing: float = 0.0):
  """Per-exit, per-example cross-entropy ce_ExB.

  ce[e, b] = -sum_c q[b, c] log softmax(logits[e, b])[c], with the smoothed
  target q = (1 - s) onehot(label) + s / C.
  """
  num_classes = logits_ExBxC.shape[-1]
  targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits_ExBxC.astype(jnp.float32), targets_BxC[None])


def joint_loss(logits_ExBxC, labels_B, exit_weights_E, label_smoothing: float = 0.0):
  """Weighted sum over exits of the batch-mean cross-entropy.

  loss = sum_e w[e] * mean_b ce[e, b]. Returns (loss, ce_E).
  """
  ce_E = cross_entropy(logits_ExBxC, labels_B, label_smoothing).mean(axis=1)
  return jnp.dot(jnp.asarray(exit_weights_E, jnp.float32), ce_E), ce_E


def kd(student_logits_ExBxC, teacher_logits_ExBxC, temperature: float):
  """Per-exit, per-example distillation loss kd_ExB = t^2 KL(softmax(z_t / t) || softmax(z_s / t)).

  The t^2 factor keeps the gradient scale independent of t (Hinton et al., 2015).
  """
  t = temperature
  teacher_logp = jax.nn.log_softmax(teacher_logits_ExBxC.astype(jnp.float32) / t, axis=-1)
  student_logp = jax.nn.log_softmax(student_logits_ExBxC.astype(jnp.float32) / t, axis=-1)
  return t**2 * jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)


def entropy(logits_ExBxC):
  """Per-exit, per-example entropy H_ExB = -sum_c p log p of softmax(logits), in nats."""
  logp = jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


TEACHER_REFERENCES = ("own", "final")  # erde.reference: which teacher exit judges an image wrong


def teacher_errors(teacher_logits_ExBxC, labels_B, reference: str = "own"):
  """wrong_ExB: whether the reference teacher exit misclassifies image b.

  reference='own': each teacher exit judges its own pairing; 'final': the
  teacher's last exit judges for every exit.
  """
  wrong_ExB = jnp.argmax(teacher_logits_ExBxC, -1) != labels_B[None]
  if reference == "final":
    return jnp.broadcast_to(wrong_ExB[-1:], wrong_ExB.shape)
  if reference != "own":
    raise ValueError(f"unknown teacher-error reference {reference!r}; valid: {', '.join(TEACHER_REFERENCES)}")
  return wrong_ExB


def erde_loss(student_logits_ExBxC, teacher_logits_ExBxC, labels_B, exit_weights_E, *, temperature: float = 4.0,
              kd_weight: float = 1.0, entropy_weight: float = 0.1, drop_kd_on_errors: bool = True,
              reference: str = "own", label_smoothing: float = 0.0):
  """ERDE: distillation plus an entropy term on the images the teacher gets wrong.

  Per exit e and image b, with wrong[e, b] from `teacher_errors`:
    l[e, b] = ce[e, b] + kd_weight * kd[e, b] * (1 - wrong[e, b] * drop_kd_on_errors)
              - entropy_weight * H(student[e, b]) / log C * wrong[e, b]
  loss = sum_e w[e] * mean_b l[e, b]. The teacher exits are already paired
  with the student's (teacher_logits_ExBxC has the student's E). With
  entropy_weight=0 and drop_kd_on_errors=False this is plain KD.
  Returns (loss, {"ce_E", "kd_E", "entropy_E", "teacher_error_E"}).
  """
  wrong_ExB = teacher_errors(teacher_logits_ExBxC, labels_B, reference).astype(jnp.float32)
  ce_ExB = cross_entropy(student_logits_ExBxC, labels_B, label_smoothing)
  kd_ExB = kd(student_logits_ExBxC, jax.lax.stop_gradient(teacher_logits_ExBxC), temperature)
  ent_ExB = entropy(student_logits_ExBxC) / jnp.log(student_logits_ExBxC.shape[-1])
  kd_mask_ExB = 1.0 - wrong_ExB if drop_kd_on_errors else jnp.ones_like(wrong_ExB)
  per_ExB = ce_ExB + kd_weight * kd_ExB * kd_mask_ExB - entropy_weight * ent_ExB * wrong_ExB
  loss = jnp.dot(jnp.asarray(exit_weights_E, jnp.float32), per_ExB.mean(axis=1))
  return loss, {"ce_E": ce_ExB.mean(1), "kd_E": kd_ExB.mean(1), "entropy_E": ent_ExB.mean(1),
                "teacher_error_E": wrong_ExB.mean(1)}


def pair_exits(num_student: int, num_teacher: int, pairing=None) -> tuple[int, ...]:
  """For each student exit, the teacher exit it learns from (0-based).

  Default: by relative depth, student exit i (of E_s) -> teacher exit
  ceil((i + 1) E_t / E_s) - 1, so last pairs with last.

  >>> pair_exits(3, 4)
  (1, 2, 3)
  >>> pair_exits(4, 4)
  (0, 1, 2, 3)
  """
  if pairing is not None:
    pairing = tuple(int(p) for p in pairing)
    if len(pairing) != num_student or not all(0 <= p < num_teacher for p in pairing):
      raise ValueError(f"pairing {pairing} must give one teacher exit in 0..{num_teacher - 1} per student exit "
                       f"({num_student})")
    return pairing
  return tuple(-(-(i + 1) * num_teacher // num_student) - 1 for i in range(num_student))


def ensemble_teachers(logits_ExBxC, ensemble_logits_JxE):
  """Teacher logits_JxBxC: teacher j combines all exits with weights softmax(a_j) over exits.

  T[j] = sum_e softmax(a_j)[e] * logits[e].
  """
  weights_JxE = jax.nn.softmax(ensemble_logits_JxE.astype(jnp.float32), axis=-1)
  return jnp.einsum("je,ebc->jbc", weights_JxE, logits_ExBxC.astype(jnp.float32))


def mate_targets(teacher_logits_ExBxC, temperature: float, primary_weight: float):
  """target_ExBxC: exit i's distillation target, primary_weight on teacher i, the rest spread evenly.

  target[i] = l softmax(T_i / t) + (1 - l) / (E - 1) sum_{j != i} softmax(T_j / t)
  (with one exit, target[0] = softmax(T_0 / t)).
  """
  probs_ExBxC = jax.nn.softmax(teacher_logits_ExBxC / temperature, axis=-1)
  num = probs_ExBxC.shape[0]
  if num == 1:
    return probs_ExBxC
  mix_ExE = jnp.full((num, num), (1.0 - primary_weight) / (num - 1)).at[jnp.diag_indices(num)].set(primary_weight)
  return jnp.einsum("ij,jbc->ibc", mix_ExE, probs_ExBxC)


def kl_to_target(student_logits_ExBxC, target_ExBxC, temperature: float):
  """t^2 KL(target || softmax(z / t)) per exit and example, kl_ExB (the target is not differentiated)."""
  target = jax.lax.stop_gradient(target_ExBxC)
  logq = jax.nn.log_softmax(student_logits_ExBxC.astype(jnp.float32) / temperature, axis=-1)
  return temperature**2 * jnp.sum(target * (jnp.log(jnp.clip(target, 1e-12)) - logq), axis=-1)


def mate_loss(logits_ExBxC, labels_B, ensemble_logits_ExE, exit_weights_E, *, temperature: float = 3.0,
              primary_weight: float = 0.7, kd_weight: float = 1.0, label_smoothing: float = 0.0):
  """MATE: every exit learns from all ensemble teachers, mainly from its own (our reading of the paper).

  loss = sum_i w_i [ce(z_i) + kd_weight t^2 KL(target_i || softmax(z_i / t))] + sum_j ce(T_j), with
  T = `ensemble_teachers` (one teacher per exit) and target = `mate_targets`. The KL targets are
  stop-gradient: an exit's KL never flows into the teachers (neither their weights a_j nor the exits
  that make them); each teacher trains through its own cross-entropy.
  Returns (loss, {"ce_E", "kd_E", "teacher_ce_E"}).
  """
  teachers_ExBxC = ensemble_teachers(logits_ExBxC, ensemble_logits_ExE)
  ce_ExB = cross_entropy(logits_ExBxC, labels_B, label_smoothing)
  kd_ExB = kl_to_target(logits_ExBxC, mate_targets(teachers_ExBxC, temperature, primary_weight), temperature)
  teacher_ce_E = cross_entropy(teachers_ExBxC, labels_B, label_smoothing).mean(1)
  w = jnp.asarray(exit_weights_E, jnp.float32)
  loss = jnp.dot(w, ce_ExB.mean(1) + kd_weight * kd_ExB.mean(1)) + teacher_ce_E.sum()
  return loss, {"ce_E": ce_ExB.mean(1), "kd_E": kd_ExB.mean(1), "teacher_ce_E": teacher_ce_E}


def byot_loss(logits_ExBxC, labels_B, exit_weights_E, *, temperature: float = 3.0, kd_weight: float = 1.0,
              label_smoothing: float = 0.0):
  """Be Your Own Teacher: every exit but the last distils from the deepest exit (stop-gradient).

  loss = sum_i w_i [ce(z_i) + kd_weight t^2 KL(softmax(z_E / t) || softmax(z_i / t)) [i < E]].
  BYOT's feature-hint (L2) term is not included. Returns (loss, {"ce_E", "kd_E"}).
  """
  ce_ExB = cross_entropy(logits_ExBxC, labels_B, label_smoothing)
  target = jax.nn.softmax(logits_ExBxC[-1:].astype(jnp.float32) / temperature, axis=-1)
  kd_ExB = kl_to_target(logits_ExBxC, jnp.broadcast_to(target, logits_ExBxC.shape), temperature)
  kd_ExB = kd_ExB.at[-1].set(0.0)
  w = jnp.asarray(exit_weights_E, jnp.float32)
  return jnp.dot(w, ce_ExB.mean(1) + kd_weight * kd_ExB.mean(1)), {"ce_E": ce_ExB.mean(1), "kd_E": kd_ExB.mean(1)}
