"""Exports: thresholds as ExC, and each format's verify step against JAX on a small random model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from eejax import export, policies
from eejax.models import MultiExitNet


def test_thresholds_as_ExC_from_per_exit_and_per_class_forms():
  np.testing.assert_array_equal(export.as_threshold_ExC([0.3, 0.7], 3, 2), np.float32([[0.3, 0.3], [0.7, 0.7], [0, 0]]))
  t = export.as_threshold_ExC([[0.5, None], [None, 0.9]], 3, 2)
  assert t[0, 0] == 0.5 and np.isinf(t[0, 1]) and np.isinf(t[1, 0]) and t.shape == (3, 2)
  with pytest.raises(Exception, match="rows of thresholds"):
    export.as_threshold_ExC([0.1], 3, 2)
  forced = export.forced_thresholds(1, 3, 4)
  assert np.isposinf(forced[0]).all() and np.isneginf(forced[1]).all()


@functools.lru_cache(maxsize=None)
def small_model(head="pool_conv"):
  """A 3-exit ResNet-8 at quarter width with random weights, its inputs and the JAX logits (reference)."""
  model = MultiExitNet("resnet8", 5, width=0.25, head=head, head_width=8)
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), variables)
  mean, std = np.full(3, 0.47, np.float32), np.full(3, 0.25, np.float32)
  reference = np.asarray(model.apply(variables, (images / 255.0 - mean) / std)[0]).transpose(1, 0, 2)
  return model, variables, mean, std, images[:, None], reference


def check_format(fmt, tmp_path, head="pool_conv"):
  model, variables, mean, std, images, reference = small_model(head)
  _, runner = export.EXPORTERS[fmt](model, variables, mean, std, (16, 16, 3), str(tmp_path))
  rows = export.verify(runner, reference, images)
  assert [r["exit"] for r in rows] == [1, 2, 3]
  for r in rows:
    assert r["answered_at_forced_exit"] and r["max_abs_diff"] < 1e-4, r
  # At real thresholds the exported decisions equal the policy's simulation on the JAX logits.
  conf_ExN, pred_ExN = policies.max_prob(jnp.asarray(reference.transpose(1, 0, 2)))
  threshold = np.quantile(np.asarray(conf_ExN[:-1]), 0.5, axis=1)
  want = np.asarray(policies.first_exit(conf_ExN, pred_ExN, np.append(threshold, 0.0)[None]))[0]
  t_ExC = export.as_threshold_ExC(threshold.tolist(), 3, 5)
  got = [int(np.asarray(runner(x, t_ExC)[1])) for x in images]
  np.testing.assert_array_equal(got, want)
  assert 0 < (want == 0).sum() < len(want)  # the thresholds did split the images


def test_stablehlo_export_verifies_every_exit(tmp_path):
  check_format("stablehlo", tmp_path)
  assert (tmp_path / "model.stablehlo").stat().st_size > 0


@pytest.mark.parametrize("head", ["pool_conv", "erde"])
def test_onnx_export_verifies_every_exit(tmp_path, head):
  pytest.importorskip("onnxruntime", reason="ONNX export needs the 'export' extra (jax2onnx, onnxruntime)")
  pytest.importorskip("jax2onnx", reason="ONNX export needs the 'export' extra (jax2onnx, onnxruntime)")
  check_format("onnx", tmp_path, head)  # heads with BatchNorm and avg_pool inside the `If` branches


def test_onnx_export_of_variables_on_a_mesh(tmp_path):
  """A restored run's variables are NamedSharding arrays on the device mesh; the export must not trace that."""
  pytest.importorskip("onnxruntime", reason="ONNX export needs the 'export' extra (jax2onnx, onnxruntime)")
  pytest.importorskip("jax2onnx", reason="ONNX export needs the 'export' extra (jax2onnx, onnxruntime)")
  from eejax import sharding  # pylint: disable=g-import-not-at-top
  model, variables, mean, std, images, reference = small_model("linear")
  placed = jax.device_put(variables, sharding.replicated(sharding.make_mesh()))
  _, runner = export.export_onnx(model, placed, mean, std, (16, 16, 3), str(tmp_path))
  assert all(r["max_abs_diff"] < 1e-4 for r in export.verify(runner, reference, images))
  import onnx  # pylint: disable=g-import-not-at-top
  graph = onnx.load(str(tmp_path / "model.onnx")).graph
  assert sum(node.op_type == "If" for node in graph.node) >= 1  # the exit decision is a real conditional


def test_tflite_cascade_verifies_every_exit(tmp_path):
  pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra (TensorFlow), not installed here")
  check_format("tflite", tmp_path)
  assert len(list(tmp_path.glob("stage_*.tflite"))) == 3


def test_cli_errors_are_one_line(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"],
                     cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 2 and "is not an eejax workdir" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr

