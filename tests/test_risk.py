"""Learn then Test: p-values by hand, a tiny case checked by hand, and the guarantee over 200 random splits."""
import math

import numpy as np
import pytest

from eejax import risk


def test_hoeffding_bentkus_p_values_by_hand():
  p = risk.hb_p_values([0.0, 0.02], 1000, 0.01)
  # r = 0: min((1 - eps)^n, e P(Bin(n, eps) = 0)) = (1 - eps)^n; r > eps: the null is not rejected at all.
  assert p[0] == pytest.approx(0.99 ** 1000, rel=1e-9) and p[1] == 1.0
  n, eps, r = 200, 0.1, 0.05  # the binomial term: e * sum_{i <= 10} C(n, i) eps^i (1 - eps)^(n - i)
  cdf = sum(math.comb(n, i) * eps ** i * (1 - eps) ** (n - i) for i in range(11))
  h = r * math.log(r / eps) + (1 - r) * math.log((1 - r) / (1 - eps))
  assert risk.hb_p_values([r], n, eps)[0] == pytest.approx(min(math.exp(-n * h), math.e * cdf), rel=1e-9)
  assert risk.fixed_sequence([0.01, 0.05, 0.2, 0.01], 0.1) == 2  # stops at the first failure, never resumes


def tiny_case():
  """100 images, 2 exits, 3 classes: 50 confident (0.9) and agreeing with the last exit; 50 at 0.6, 10 disagreeing."""
  probs = np.zeros((2, 100, 3))
  probs[0, :50] = [0.9, 0.05, 0.05]
  probs[0, 50:] = [0.6, 0.2, 0.2]
  probs[1] = [0.1, 0.8, 0.1]
  probs[1, :90] = [0.8, 0.1, 0.1]  # the last exit says class 0, except on images 90..99
  return np.log(probs).astype(np.float32), np.zeros(100, np.int64), np.float32([1.0, 3.0])


def test_the_tiny_case_certifies_exactly_what_the_risk_allows():
  logits, labels, cost = tiny_case()
  out = risk.certify(logits, labels, cost, epsilon=0.05, delta=0.1, risk="disagreement")
  # Exiting the 50 confident images: risk 0, p = 0.95^100 = 0.006 <= 0.1. Exiting all 100: risk 0.1 > 0.05.
  assert out["certified"] and out["risk"] == 0.0 and out["macs"] == pytest.approx((50 * 1 + 50 * 3) / 100)
  assert out["p_value"] == pytest.approx(0.95 ** 100, rel=1e-6)
  assert 0.6 < out["threshold_ExC"][0, 0] <= 0.9
  # A tolerance of 10%: 10 losses in 100 give no evidence that the risk is below 10%, so still not cheaper.
  assert risk.certify(logits, labels, cost, epsilon=0.10, delta=0.1)["macs"] == pytest.approx(2.0)
  # With 5 images only, nothing can be certified at 5%: the conservative end, every image to the last exit.
  out = risk.certify(logits[:, :5], labels[:5], cost, epsilon=0.05, delta=0.1)
  assert not out["certified"] and out["macs"] == 3.0 and np.isposinf(out["threshold_ExC"]).all()


def population(n=20000, seed=0):
  """Synthetic 3-exit logits whose exits get better with depth; labels drawn so the last exit is ~85% right."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  logits = []
  for strength in (1.0, 2.0, 3.0):
    z = rng.normal(size=(n, 10))
    z[np.arange(n), labels] += strength + rng.normal(0, 1.0, n)
    logits.append(z)
  return np.stack(logits).astype(np.float32), labels, np.float32([10.0, 20.0, 30.0])


@pytest.mark.parametrize("policy", ["max_prob", "entropy"])
@pytest.mark.parametrize("risk_name", risk.RISKS)
def test_the_guarantee_holds_over_200_random_calibration_draws(policy, risk_name):
  logits, labels, cost = population()
  eps, delta, trials, n = 0.05, 0.1, 200, 500
  rng = np.random.default_rng(1)
  violations, saved = 0, []
  for _ in range(trials):
    idx = rng.choice(len(labels), n, replace=False)
    out = risk.certify(logits[:, idx], labels[idx], cost, eps, delta, risk_name, policy)
    true_risk, macs = risk.risk_of(out["threshold_ExC"], logits, labels, cost, risk_name, policy)  # the population's
    violations += true_risk > eps
    saved.append(1 - macs / cost[-1])
  # At most delta of the draws violate, within a 3-sigma binomial margin; and the certificate did save work.
  assert violations <= trials * delta + 3 * math.sqrt(trials * delta * (1 - delta)), violations
  assert np.mean(saved) > 0.05, np.mean(saved)


def test_the_per_exit_family_certifies_on_images_it_was_not_built_from():
  logits, labels, cost = population(4000, seed=2)
  out = risk.certify(logits, labels, cost, 0.05, 0.1, "disagreement", "max_prob", family="per_exit")
  assert out["n"] == 2000 and out["family"] == "per_exit"
  true_risk, macs = risk.risk_of(out["threshold_ExC"], *population(20000, seed=3)[:2], cost, "disagreement")
  assert out["certified"] and macs < cost[-1] and true_risk <= 0.05 + 0.01


def test_the_certify_command_on_a_finished_run(smoke_run, tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  _, _, workdir = smoke_run
  r = subprocess.run([sys.executable, "-m", "eejax.certify", f"--workdir={workdir}", "--epsilons=0.05,0.5"],
                     cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line for line in open(f"{workdir}/certified.md").read().splitlines() if line.startswith("| ")][1:]
  assert len(rows) == 4 and rows[0].startswith("| disagreement | 5 |")
  bad = subprocess.run([sys.executable, "-m", "eejax.certify", f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, check=False, timeout=300)
  assert bad.returncode == 2 and "is not an eejax workdir" in bad.stderr.splitlines()[-1]
  assert "Traceback" not in bad.stderr
  certified = open(f"{workdir}/certified.md").read()
  for flag, words in (("--epsilons=5", "risk tolerances 5 and delta 0.1: each must lie strictly between 0 and 1"),
                      ("--delta=1.5", "risk tolerances 0.005, 0.01, 0.02, 0.05 and delta 1.5: each must"),
                      # the three below were an internal error, and two empty reports written over this one
                      ("--epsilons=abc,0.1", "--epsilons=abc,0.1: give risk tolerances as fractions separated by "
                                             "commas (0.05 is 5%)"),
                      ("--epsilons=", "--epsilons is empty: give at least one risk tolerance (0.05 is 5%)"),
                      ("--risks=", "--risks is empty: give at least one risk (disagreement, accuracy_loss)")):
    # the first two were a math domain error, and a "guarantee"
    bad = subprocess.run([sys.executable, "-m", "eejax.certify", f"--workdir={workdir}", flag], cwd=REPO,
                         capture_output=True, text=True, check=False, timeout=300)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith(f"eejax.certify: error: {words}")
  assert open(f"{workdir}/certified.md").read() == certified  # nothing rewritten
