"""Real early exit: batched with compaction and batch-1 with lax.cond equal the simulated policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax import inference, input_pipeline, policies, thresholds
from eejax.flops import exit_macs
from eejax.models import MultiExitNet


@pytest.fixture(scope="module")
def setup():
  model = MultiExitNet("resnet8", 4, width=0.5, head="pool_conv", head_width=8)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  # Move the BatchNorm statistics away from their initial values so every layer matters.
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda s: s + 0.1 * jax.random.uniform(jax.random.key(1), s.shape),
                                           variables["batch_stats"])}
  mean, std = input_pipeline.channel_stats(images)
  cost = exit_macs(model, (16, 16, 3)).cumulative
  logits = model.apply(variables, input_pipeline.normalize(images, mean, std))[0]
  return model, variables, images, mean, std, np.asarray(cost), logits


def simulated(logits, threshold, policy):
  score, pred = policies.scores(logits, policy)
  exit_b = np.asarray(policies.first_exit(score, pred, jnp.asarray(threshold)[None], policy))[0]
  return np.asarray(pred)[exit_b, np.arange(exit_b.size)], exit_b


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_batched_and_single_equal_simulation(setup, policy):
  model, variables, images, mean, std, cost, logits = setup
  score, _ = policies.scores(logits, policy)
  # Per-exit thresholds at the exits' median scores: about half the images leave at each exit.
  threshold = thresholds.per_exit(np.median(np.asarray(score[:-1]), axis=1), 3, 4, policy)
  if policy == "patience":  # exit 1 can only answer with patience 1; exit 2 when it agrees with exit 1
    threshold = thresholds.per_exit([3, 2], 3, 4, policy)
  want_pred, want_exit = simulated(logits, threshold, policy)
  assert len(set(want_exit.tolist())) == (2 if policy == "patience" else 3)  # the exits share the work
  runner = inference.BatchedEarlyExit(model, variables, mean, std, cost, batch_size=32, smallest_bucket=4)
  preds, exits, costs = zip(*(runner(images[i:i + 32], threshold, policy) for i in (0, 32)))
  np.testing.assert_array_equal(np.concatenate(preds), want_pred)
  np.testing.assert_array_equal(np.concatenate(exits), want_exit)
  np.testing.assert_array_equal(np.concatenate(costs), cost[want_exit])
  # The whole set at once in chunks of 16: images regrouped across chunks after every exit.
  # And in windows of 2 chunks (16 + 16, then 8 images).
  for window_chunks in (8, 2):
    chunked = inference.BatchedEarlyExit(model, variables, mean, std, cost, batch_size=16, smallest_bucket=4,
                                         window_chunks=window_chunks)
    pred, exit_b, cost_b = chunked(images, threshold, policy)
    np.testing.assert_array_equal(pred, want_pred)
    np.testing.assert_array_equal(exit_b, want_exit)
    np.testing.assert_array_equal(cost_b, cost[want_exit])
  single = jax.jit(inference.single_image_fn(model, variables, mean, std, cost, threshold, policy))
  for i in range(0, 40, 3):
    pred, exit_i, cost_i = single(images[i:i + 1])
    assert (int(pred), int(exit_i)) == (want_pred[i], want_exit[i])
    assert float(cost_i) == pytest.approx(cost[want_exit[i]])


def test_per_class_thresholds(setup):
  model, variables, images, mean, std, cost, logits = setup
  threshold = np.random.default_rng(2).uniform(0.25, 0.5, (3, 4)).astype(np.float32)
  threshold[0, 1] = np.inf  # class 1 never answers at exit 1
  want_pred, want_exit = simulated(logits, threshold, "max_prob")
  runner = inference.BatchedEarlyExit(model, variables, mean, std, cost, batch_size=64)
  pred, exit_b, _ = runner(images, threshold)
  np.testing.assert_array_equal(pred, want_pred)
  np.testing.assert_array_equal(exit_b, want_exit)


def test_export_round_trip_has_real_conditionals(setup):
  model, variables, images, mean, std, cost, logits = setup
  threshold = thresholds.per_exit([0.4, 0.45], 3, 4, "max_prob")
  want_pred, want_exit = simulated(logits, threshold, "max_prob")
  fn = inference.single_image_fn(model, variables, mean, std, cost, threshold)
  exported = inference.export_single_image(fn, (16, 16, 3))
  assert "stablehlo.case" in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  for i in range(6):
    pred, exit_i, _ = restored.call(images[i:i + 1])
    assert (int(pred), int(exit_i)) == (want_pred[i], want_exit[i])


def test_chunks_are_dense_with_a_bucketed_tail(setup):
  model, variables, _, mean, std, cost, _ = setup
  runner = inference.BatchedEarlyExit(model, variables, mean, std, cost, batch_size=16, smallest_bucket=4)
  assert runner._chunks(40) == [(0, 16, 16), (16, 16, 16), (32, 8, 8)]
  assert runner._chunks(35) == [(0, 16, 16), (16, 16, 16), (32, 3, 4)]
  assert runner._chunks(5) == [(0, 5, 8)]


def test_bucket_sizes():
  assert inference.bucket_sizes(64) == [64, 32, 16, 8]
  assert inference.bucket_sizes(100, smallest=10) == [100, 50, 25]
  assert inference.bucket_sizes(4) == [4]


def test_a_threshold_of_another_shape_is_one_user_error(setup):
  from eejax.errors import UserError  # pylint: disable=g-import-not-at-top
  model, variables, images, mean, std, cost, _ = setup
  runner = inference.BatchedEarlyExit(model, variables, mean, std, cost, batch_size=8)
  for bad in (np.float32([0.5, 0.5, 0.0]), np.full((3, 1), 0.5), np.full((3, 9), 0.5), np.full((2, 4), 0.5)):
    with pytest.raises(UserError) as e:
      runner(images[:8], bad)
    assert str(e.value) == (f"a threshold of shape {bad.shape}; expected threshold_ExC of shape (3, 4): a row per "
                            f"exit, a column per class (eejax.thresholds.per_exit makes one from per-exit values)")
  single = inference.early_exit_fn(model, variables, mean, std)
  with pytest.raises(UserError, match=r"^a threshold of shape \(3, 3\);"):  # checked while tracing, too
    jax.jit(single)(images[:1], jnp.zeros((3, 3)))


def test_a_threshold_holding_nan_before_its_last_row_is_one_user_error(setup):
  from eejax.errors import UserError  # pylint: disable=g-import-not-at-top
  model, variables, images, mean, std, cost, _ = setup
  runner = inference.BatchedEarlyExit(model, variables, mean, std, cost, batch_size=8)
  t = np.full((3, 4), 0.5, np.float32)
  t[2] = np.nan  # the last exit always answers: its row is never read
  runner(images[:8], t)
  t[0, 3] = t[1, 0] = np.nan  # would never pass, so those exits would never answer
  with pytest.raises(UserError) as e:
    runner(images[:8], t)
  assert str(e.value) == ("threshold_ExC holds NaN at exit(s) 1, 2; give a number for every exit before the last "
                          "(+inf: the exit never answers)")
