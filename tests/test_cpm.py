"""CPM: the absolute rule against a numpy loop, the paper's rule against a plain loop and by hand."""
import jax.numpy as jnp
import numpy as np

from eejax import cpm, policies


def np_cpm(conf_ExN, pred_ExN, reach_ExN, labels_N, ref_pred_N, candidates_K, margin, num_classes):
  """Class Precision Margin by plain loops: the lowest candidate whose precision >= reference - margin."""
  out = np.full((conf_ExN.shape[0], num_classes), np.inf)
  for e in range(conf_ExN.shape[0]):
    for c in range(num_classes):
      ref_mask = reach_ExN[e] & (ref_pred_N == c)
      ref = float(np.mean(labels_N[ref_mask] == c)) if ref_mask.any() else 1.0
      for t in sorted(candidates_K):
        mask = reach_ExN[e] & (pred_ExN[e] == c) & (conf_ExN[e] >= t)
        if mask.any() and np.mean(labels_N[mask] == c) >= ref - margin - 1e-6:
          out[e, c] = t
          break
  return out


def cpm_case(seed=0, e=3, n=600, c=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  right = rng.random((e, n)) < 0.6 + 0.1 * np.arange(e)[:, None]
  pred = np.where(right, labels[None], rng.integers(0, c, (e, n)))
  pred[0][pred[0] == 4] = 3  # exit 1 never predicts class 4: no image can pass there
  pred[1][pred[1] == 2] = (labels[pred[1] == 2] + 1) % c  # exit 2 is always wrong on class 2: precision 0
  conf = np.clip(np.where(pred == labels[None], 0.6, 0.35) + 0.3 * rng.random((e, n)), 0, 1).astype(np.float32)
  ref_pred = np.where(rng.random(n) < 0.9, labels, rng.integers(0, c, n))
  reach = rng.random((e, n)) < 0.8
  return conf, pred, reach, labels, ref_pred


def test_cpm_matches_numpy_including_classes_that_never_exit():
  conf, pred, reach, labels, ref_pred = cpm_case()
  candidates = np.linspace(0, 1, 51, dtype=np.float32)
  for margin in (0.0, 0.03, 0.1, 0.3):
    got = np.asarray(cpm.cpm_thresholds(conf, pred, reach, labels, ref_pred, candidates, margin, num_classes=5))
    want = np_cpm(conf, pred, reach, labels, ref_pred, candidates, margin, 5)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert np.isinf(got[0, 4]) and np.isinf(got[1, 2])  # never predicted / never right: never exits
    assert np.isfinite(got).sum() >= 8  # and most classes do get a threshold
  loose = np.asarray(cpm.cpm_thresholds(conf, pred, reach, labels, ref_pred, candidates, 0.3, num_classes=5))
  tight = np.asarray(cpm.cpm_thresholds(conf, pred, reach, labels, ref_pred, candidates, 0.0, num_classes=5))
  assert (loose[np.isfinite(tight)] <= tight[np.isfinite(tight)]).all()  # a wider margin never raises a threshold


def test_fit_cpm_calibrates_each_branch_on_the_images_earlier_branches_left():
  conf, pred, _, labels, ref_pred = cpm_case(seed=3, e=3)
  # logits whose softmax gives exactly conf at pred (other classes share the rest)
  c = 5
  probs = np.repeat(((1 - conf) / (c - 1))[..., None], c, axis=-1)
  np.put_along_axis(probs, pred[..., None], conf[..., None], axis=-1)
  probs[-1] = np.eye(c)[ref_pred] * 0.9 + 0.02
  logits = np.log(probs).astype(np.float32)
  conf, pred = (np.asarray(a) for a in policies.max_prob(jnp.asarray(logits)))
  candidates = np.linspace(0, 1, 41, dtype=np.float32)
  got = np.asarray(cpm.fit_cpm(logits, labels, candidates, 0.05))
  reach = np.ones(len(labels), bool)
  for b in range(2):
    want = np_cpm(conf[b:b + 1], pred[b:b + 1], reach[None], labels, pred[-1], candidates, 0.05, c)[0]
    np.testing.assert_array_equal(got[b], want.astype(np.float32))
    reach &= ~(conf[b] >= want[pred[b]])
  assert reach.sum() < len(labels)  # branches did answer some images


def loop_paper(conf, pred, reach, labels, ref_pred, margin, c_count, min_support):
  """The paper's rule, written as plainly as possible: try every distinct confidence as the threshold."""
  out = np.full(c_count, np.inf)
  for c in range(c_count):
    ref = [labels[i] == c for i in range(len(labels)) if reach[i] and ref_pred[i] == c]
    bar = (1 - margin) * (np.mean(ref) if ref else 1.0)
    mine = [i for i in range(len(labels)) if reach[i] and pred[i] == c]
    for t in sorted({conf[i] for i in mine}):  # lowest first: the largest prefix wins
      passing = [i for i in mine if conf[i] >= t]
      if len(passing) >= max(min_support, 1) and np.mean([labels[i] == c for i in passing]) >= bar - 1e-9:
        out[c] = t
        break
  return out


def test_paper_rule_matches_a_plain_loop():
  conf, pred, reach, labels, ref_pred = cpm_case(seed=5, e=2, n=400, c=5)
  conf = np.round(conf, 2)  # ties in confidence
  for margin in (0.0, 0.05, 0.2):
    for support in (1, 10, 30):
      got = cpm.cpm_paper_thresholds(conf[0], pred[0], reach[0], labels, ref_pred, margin, 5, support)
      want = loop_paper(conf[0], pred[0], reach[0], labels, ref_pred, margin, 5, support)
      np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.isfinite(got).any()


def test_paper_rule_by_hand():
  """Class 0: 4 images, confidences .9 .8 .7 .6, right, right, wrong, right. Reference precision 1."""
  conf = np.float32([0.9, 0.8, 0.7, 0.6])
  pred, labels, ref_pred, reach = np.zeros(4, int), np.array([0, 0, 1, 0]), np.zeros(4, int), np.ones(4, bool)
  labels_ref = labels.copy()
  ref_pred = labels_ref  # the reference is always right: precision 1 on class 0
  # margin 0: bar 1, the largest all-right prefix is 2 images -> threshold 0.8; support 3 -> none.
  assert cpm.cpm_paper_thresholds(conf, pred, reach, labels, ref_pred, 0.0, 2, 1)[0] == np.float32(0.8)
  assert np.isinf(cpm.cpm_paper_thresholds(conf, pred, reach, labels, ref_pred, 0.0, 2, 3)[0])
  # relative margin 0.25: bar 0.75; all 4 (precision 3/4) clear it -> threshold 0.6.
  assert cpm.cpm_paper_thresholds(conf, pred, reach, labels, ref_pred, 0.25, 2, 3)[0] == np.float32(0.6)
