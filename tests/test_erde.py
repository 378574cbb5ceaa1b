"""ERDE losses against hand-computed values, the head, and a teacher -> student run."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eejax import losses, run
from eejax.errors import UserError
from eejax.flops import exit_macs
from eejax.models import MultiExitNet


def softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_kd_is_t_squared_kl_by_hand():
  s, t = np.array([[[1.0, 0.0]]]), np.array([[[0.0, 2.0]]])
  for temp in (1.0, 4.0):
    p, q = softmax(t / temp), softmax(s / temp)
    ref = temp**2 * (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(losses.kd(s, t, temp), ref, rtol=1e-6)
  np.testing.assert_allclose(losses.kd(t, t, 3.0), 0.0, atol=1e-6)


def test_entropy_by_hand():
  np.testing.assert_allclose(losses.entropy(np.zeros((1, 1, 4))), np.log(4), rtol=1e-6)
  np.testing.assert_allclose(losses.entropy(np.array([[[0.0, np.log(3.0)]]])),
                             -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), rtol=1e-6)


def test_entropy_term_only_on_teacher_errors_and_kd_only_elsewhere():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 6, 3)).astype(np.float32)
  teacher = rng.normal(size=(2, 6, 3)).astype(np.float32) * 3
  labels = np.argmax(teacher[1], -1)
  labels[:2] = (labels[:2] + 1) % 3  # the final teacher exit is wrong on images 0 and 1 only
  wrong = np.argmax(teacher, -1) != labels[None]
  t, a, b = 2.0, 0.7, 0.3
  ce = -np.log(softmax(student)[np.arange(2)[:, None], np.arange(6)[None], labels[None]])
  p, q = softmax(teacher / t), softmax(student / t)
  kd = t**2 * (p * np.log(p / q)).sum(-1)
  ent = -(softmax(student) * np.log(softmax(student))).sum(-1) / np.log(3)
  for reference, mask in (("own", wrong), ("final", np.broadcast_to(wrong[1:], wrong.shape))):
    per = ce + a * kd * (1 - mask) - b * ent * mask
    loss, metrics = losses.erde_loss(student, teacher, labels, (1.0, 2.0), temperature=t, kd_weight=a,
                                     entropy_weight=b, reference=reference)
    np.testing.assert_allclose(loss, per[0].mean() + 2 * per[1].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["teacher_error_E"], mask.mean(1))
  plain, _ = losses.erde_loss(student, teacher, labels, (1.0, 1.0), temperature=t, kd_weight=a, entropy_weight=0.0,
                              drop_kd_on_errors=False)
  np.testing.assert_allclose(plain, (ce + a * kd).mean(1).sum(), rtol=1e-5)  # plain KD


def test_gradients_finite_and_push_entropy_up_on_errors():
  teacher = jnp.array([[[5.0, 0.0, 0.0]]])
  labels = jnp.array([1])  # the teacher is confidently wrong
  grad_fn = jax.grad(lambda s: losses.erde_loss(s, teacher, labels, (1.0,), entropy_weight=1.0, kd_weight=1.0)[0])
  student = jnp.array([[[2.0, 0.0, -1.0]]])
  g = grad_fn(student)
  assert np.isfinite(np.asarray(g)).all()
  no_ce = jax.grad(lambda s: -losses.entropy(s).sum() / jnp.log(3.0))(student)
  # On an error the KD term is dropped, so the gradient is CE's plus the entropy push, nothing towards the teacher.
  ce_grad = jax.grad(lambda s: losses.cross_entropy(s, labels).sum())(student)
  np.testing.assert_allclose(g, ce_grad + no_ce, rtol=1e-5, atol=1e-6)


def test_pair_exits():
  assert losses.pair_exits(3, 4) == (1, 2, 3)
  assert losses.pair_exits(4, 3) == (0, 1, 2, 2)
  assert losses.pair_exits(2, 4, (0, 3)) == (0, 3)
  with pytest.raises(ValueError, match="one teacher exit"):
    losses.pair_exits(2, 4, (0, 4))


def test_erde_head_shapes_and_macs():
  model = MultiExitNet("resnet8", 10, head="erde", head_dropout=0.5)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  logits, _ = model.apply(variables, x)
  assert logits.shape == (3, 2, 10)
  train_a, _ = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
  train_b, _ = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train_a[0][0], train_b[0][0])  # dropout acts while training
  assert exit_macs(model, (32, 32, 3)).head[:2] == (16 * 16 * 16 * 10, 8 * 8 * 32 * 10)


def test_teacher_to_student_run(tiny_tree, tmp_path):
  from test_train import smoke_config  # pylint: disable=g-import-not-at-top
  from test_faults import tree_digest  # pylint: disable=g-import-not-at-top
  from eejax import train  # pylint: disable=g-import-not-at-top
  teacher = str(tmp_path / "teacher")
  train.train_and_evaluate(smoke_config(tiny_tree, str(tmp_path / "c"), **{"model.name": "resnet20"}), teacher)
  config = smoke_config(tiny_tree, str(tmp_path / "c"), **{"scheme": "erde", "erde.teacher": teacher,
                                                           "model.head": "erde", "model.head_dropout": 0.2})
  student = str(tmp_path / "student")
  result = train.train_and_evaluate(config, student)
  assert result["method"] == "erde"
  # The checkpoint holds the student's state and nothing of the teacher.
  saved = ocp.CheckpointManager(os.path.join(student, "checkpoints")).restore(10)
  student_run, teacher_run = run.load_run(student), run.load_run(teacher)
  student_vars, teacher_vars = student_run.variables, teacher_run.variables
  assert set(saved) == {"step", "params", "batch_stats", "opt_state"}
  n_leaves = lambda tree: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
  assert n_leaves(saved["params"]) == n_leaves(student_vars["params"]) != n_leaves(teacher_vars["params"])
  lines = [json.loads(l) for l in open(os.path.join(student, "metrics.jsonl"), encoding="utf-8")]
  assert "train/teacher_error_exit1" in lines[0] and "train/kd_exit3" in lines[0]
  # The student keeps its teacher: a copy elsewhere may teach it on, a teacher with other weights may not.
  assert json.load(open(os.path.join(student, "teacher.json")))["weights_sha256"] == run.weights_sha256(teacher_vars)
  moved = str(shutil.copytree(teacher, tmp_path / "moved"))
  config.erde.teacher = moved
  assert train.train_and_evaluate(config, student)["exits"] == result["exits"]  # finished: trains nothing
  other = str(tmp_path / "other")
  train.train_and_evaluate(smoke_config(tiny_tree, str(tmp_path / "c"), **{"model.name": "resnet20", "seed": 1}),
                           other)
  config.erde.teacher = other
  before = tree_digest(student)
  with pytest.raises(UserError, match=f"{student} was trained so far with the teacher in {teacher} \\(step 10\\), "
                                      f"and the teacher in {other} \\(step 10\\) holds other weights"):
    train.train_and_evaluate(config, student)
  assert tree_digest(student) == before
  config.erde.teacher = ""
  with pytest.raises(UserError, match="needs --config.erde.teacher"):
    train.train_and_evaluate(config, str(tmp_path / "s2"))
