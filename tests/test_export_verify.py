"""An export's measurements on a made-up runner whose deviations from JAX are known: agreement, differences,
decisions, and the progress count matching the calls made."""
import io

import numpy as np
import pytest

from eejax import export_verify, policies
from eejax.writers import Count

E, N, C = 3, 8, 4


def made_up(flip_exit: int, flip_images, shift: float = 0.01):
  """JAX's logits (reference_NxExC) and a runner that returns them plus `shift`, except at `flip_exit` on
  `flip_images`, where the two top classes swap. Image n is the uint8 image filled with n."""
  rng = np.random.default_rng(0)
  reference_NxExC = rng.normal(size=(N, E, C)).astype(np.float32) * 3
  served_NxExC = reference_NxExC + shift
  for n in flip_images:
    top2 = np.argsort(reference_NxExC[n, flip_exit])[-2:]
    served_NxExC[n, flip_exit, top2] = served_NxExC[n, flip_exit, top2[::-1]]

  def runner(x_1xHxWx3, threshold_ExC):
    logits_ExC = served_NxExC[int(x_1xHxWx3.flat[0])]
    exit_B, _ = policies.decide(logits_ExC[:, None], threshold_ExC)
    k = int(exit_B[0])
    return logits_ExC[k][None], np.int32(k)

  def batch(x_BxHxWx3, threshold_ExC):
    answers = [runner(x[None], threshold_ExC) for x in x_BxHxWx3]
    return np.concatenate([a for a, _ in answers]), np.array([e for _, e in answers])
  runner.batch = batch
  images = np.arange(N, dtype=np.uint8)[:, None, None, None, None] * np.ones((1, 1, 2, 2, 3), np.uint8)
  return reference_NxExC, served_NxExC, runner, images


def test_verify_counts_what_differs_from_jax():
  reference, served, runner, images = made_up(flip_exit=1, flip_images=[2, 5, 7])
  rows = export_verify.verify(runner, reference, images)
  assert [r["exit"] for r in rows] == [1, 2, 3] and all(r["answered_at_forced_exit"] for r in rows)
  assert [r["top1_agreement"] for r in rows] == [1.0, 5 / 8, 1.0]
  want_diff_E = np.abs(served - reference).max(axis=(0, 2))
  np.testing.assert_allclose([r["max_abs_diff"] for r in rows], want_diff_E, rtol=1e-6)
  assert want_diff_E[0] == pytest.approx(0.01, rel=1e-3) and want_diff_E[1] > 0.1  # the swap shows


def test_calibrated_agreement_is_exit_and_class_as_jax():
  reference, served, runner, images = made_up(flip_exit=0, flip_images=[0, 1, 2, 3])
  threshold_ExC = np.full((E, C), 0.0, np.float32)  # every image answers at exit 1
  cost_E = [10.0, 20.0, 30.0]
  out = export_verify.policy_latency(runner, images, threshold_ExC, cost_E, reference)
  assert out["exit_share"] == [1.0, 0.0, 0.0] and out["predicted_mean_macs"] == 10.0
  assert out["agrees_with_jax"] == 0.5  # four of eight answer another class at the same exit
  assert "accuracy" not in out
  labels_N = reference[:, 0].argmax(-1)  # JAX's exit-1 answers as the labels: JAX right on all eight
  labelled = export_verify.policy_latency(runner, images, threshold_ExC, cost_E, reference, labels_N=labels_N)
  assert labelled["jax_accuracy"] == 1.0 and labelled["accuracy"] == 0.5  # the four swapped answers are wrong
  threshold_ExC[0] = 1.1  # no probability passes: exit 2 answers, where nothing was swapped
  assert export_verify.policy_latency(runner, images, threshold_ExC, cost_E, reference)["agrees_with_jax"] == 1.0


def test_the_progress_total_is_the_number_of_calls():
  reference, _, runner, images = made_up(flip_exit=0, flip_images=[])
  for batched in (True, False):
    if not batched:
      del runner.batch
    count = Count("verifying", 1, stream=io.StringIO())
    wrapped = export_verify.counted(runner, count)
    export_verify.verify(wrapped, reference, images)
    export_verify.policy_latency(wrapped, images, np.zeros((E, C), np.float32), [1.0, 2.0, 3.0], reference)
    if batched:
      timing = export_verify.batch_latency(wrapped, images, np.zeros((E, C), np.float32), batch=16)
      assert timing["exits_match_batch_1"]
    assert count.done == export_verify.calls(E, N, batched, batch=16)
    assert hasattr(wrapped, "batch") == batched
