"""Exports: thresholds as ExC, and each format's verify step against JAX on a small random model."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from eejax import export, export_onnx, export_verify, policies, thresholds
from eejax.errors import UserError
from eejax.models import MultiExitNet
from eejax.run import load_run


def require_onnx():
  reason = export_onnx.available()
  if reason is not None:
    pytest.skip(f"ONNX export is not available here: {reason}")


@functools.lru_cache(maxsize=None)
def small_model(head="pool_conv", arch="resnet8"):
  """A 3-exit ResNet-8 (or MobileNet: depthwise convolutions; VGG-16: max-pools and a three-layer classifier, on
  32x32 images; WRN-32-4) at quarter width with random weights, its inputs and the JAX logits (reference)."""
  model = MultiExitNet(arch, 5, width=0.25, head=head, head_width=8,
                       exit_after={"mobilenet": (1, 3), "vgg16": (3, 9), "wrn32_4": (5, 10)}.get(arch))
  hw = 32 if arch == "vgg16" else 16
  images = np.random.default_rng(0).integers(0, 256, (6, hw, hw, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, hw, hw, 3)))
  variables = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), variables)
  mean, std = np.full(3, 0.47, np.float32), np.full(3, 0.25, np.float32)
  reference = np.asarray(model.apply(variables, (images / 255.0 - mean) / std)[0]).transpose(1, 0, 2)
  return model, variables, mean, std, images[:, None], reference


def check_format(fmt, tmp_path, head="pool_conv", policy="max_prob", arch="resnet8"):
  model, variables, mean, std, images, reference = small_model(head, arch)
  _, runner = export.EXPORTERS[fmt](model, variables, mean, std, images.shape[2:], str(tmp_path), policy)
  rows = export_verify.verify(runner, reference, images, policy)
  assert [r["exit"] for r in rows] == [1, 2, 3]
  for r in rows:
    assert r["answered_at_forced_exit"] and r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0, r
  # At real thresholds the exported decisions equal the policy's simulation on the JAX logits.
  score_ExN, pred_ExN = policies.scores(jnp.asarray(reference.transpose(1, 0, 2)), policy)
  threshold = np.quantile(np.asarray(score_ExN[:-1]), 0.5, axis=1)
  if policy == "patience":  # exit 2 answers where it agrees with exit 1
    threshold = np.float32([2, 2])
  t_ExC = thresholds.per_exit(threshold, 3, 5, policy)
  want = np.asarray(policies.first_exit(score_ExN, pred_ExN, t_ExC[None], policy))[0]
  got = [int(np.asarray(runner(x, t_ExC)[1])) for x in images]
  np.testing.assert_array_equal(got, want)
  assert len(set(want.tolist())) > 1  # the thresholds did split the images


@pytest.mark.parametrize("policy", ["max_prob", "entropy", "patience"])
def test_stablehlo_export_verifies_every_exit(tmp_path, policy):
  check_format("stablehlo", tmp_path, "erde" if policy == "patience" else "pool_conv", policy)  # exits that agree
  assert (tmp_path / "model.stablehlo").stat().st_size > 0


@pytest.mark.parametrize("head,policy", [("pool_conv", "max_prob"), ("erde", "max_prob"), ("linear", "entropy"),
                                         ("erde", "patience")])
def test_onnx_export_verifies_every_exit(tmp_path, head, policy):
  require_onnx()
  check_format("onnx", tmp_path, head, policy)  # heads with BatchNorm and avg_pool inside the `If` branches


def test_onnx_export_of_variables_on_a_mesh(tmp_path):
  """A restored run's variables are NamedSharding arrays on the device mesh; the export must not trace that."""
  require_onnx()
  from eejax import sharding  # pylint: disable=g-import-not-at-top
  model, variables, mean, std, images, reference = small_model("linear")
  placed = jax.device_put(variables, sharding.replicated(sharding.make_mesh()))
  _, runner = export.EXPORTERS["onnx"](model, placed, mean, std, (16, 16, 3), str(tmp_path))
  assert all(r["max_abs_diff"] < 1e-4 for r in export_verify.verify(runner, reference, images))
  import onnx  # pylint: disable=g-import-not-at-top
  graph = onnx.load(str(tmp_path / "model.onnx")).graph
  assert sum(node.op_type == "If" for node in graph.node) >= 1  # the exit decision is a real conditional


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx", "tflite"])
@pytest.mark.parametrize("arch", ["mobilenet", "vgg16", "wrn32_4"])
def test_mobilenet_vgg_and_wide_resnet_export(tmp_path, fmt, arch):
  # MobileNet's depthwise convolutions; VGG's max-pools and its three dense layers in the last stage; the Wide
  # ResNet's pre-activation blocks (dropout left out at inference) and the BatchNorm of its final classifier.
  if fmt == "onnx":
    require_onnx()
  if fmt == "tflite":
    pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra (TensorFlow), not installed here")
  check_format(fmt, tmp_path, "linear", arch=arch)


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx", "tflite"])
def test_sdn_head_export(tmp_path, fmt):
  # SDN's internal classifier: its max-pool as pairwise maxima, its reshaped mean, the learned mixing weight.
  if fmt == "onnx":
    require_onnx()
  if fmt == "tflite":
    pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra (TensorFlow), not installed here")
  check_format(fmt, tmp_path, "sdn")


def test_tflite_cascade_verifies_every_exit(tmp_path):
  pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra (TensorFlow), not installed here")
  check_format("tflite", tmp_path)
  assert len(list(tmp_path.glob("stage_*.tflite"))) == 3


def test_tflite_int8_cascade_holds_int8_weights_and_stays_near_jax(tmp_path):
  pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra (TensorFlow), not installed here")
  from eejax import export_tflite  # pylint: disable=g-import-not-at-top
  model, variables, mean, std, images, reference = small_model("pool_conv")
  calibration = np.random.default_rng(2).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
  paths, runner = export.EXPORTERS["tflite_int8"](model, variables, mean, std, (16, 16, 3), str(tmp_path),
                                                  calibration_NxHxWx3=calibration)
  float_paths, _ = export.EXPORTERS["tflite"](model, variables, mean, std, (16, 16, 3), str(tmp_path))
  assert [os.path.basename(p) for p in paths] == [f"stage_{k}_int8.tflite" for k in range(3)]
  assert all(export_tflite.int8_share(p) > 0.8 for p in paths)  # the weights are int8 ...
  assert all(export_tflite.int8_share(p) == 0 for p in float_paths)  # ... where the float cascade's are not
  assert sum(map(os.path.getsize, paths)) < sum(map(os.path.getsize, float_paths))
  rows = export_verify.verify(runner, reference, images)
  scale_E = np.abs(reference).max(axis=(0, 2))
  for r, scale in zip(rows, scale_E):  # quantized: near JAX's logits, not equal to them
    assert r["answered_at_forced_exit"] and 0 < r["max_abs_diff"] < 0.15 * scale, (r, scale)
  with pytest.raises(ValueError, match="calibration images"):
    export.EXPORTERS["tflite_int8"](model, variables, mean, std, (16, 16, 3), str(tmp_path))


def test_cli_errors_are_one_line(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"],
                     cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 2 and "is not an eejax workdir" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
  for bad in ("--images=0", "--formats=stablehlo,tflite_int8 --calibration_images=0"):
    r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}",
                        *bad.split()], cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "must be at least 1" in r.stderr.splitlines()[-1], r.stderr
  r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}",
                      "--formats="], cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 2 and r.stderr.splitlines()[-1] == (  # it exported nothing, with status 0
      f"eejax.export: error: no export format given; give one or more of {', '.join(export.FORMATS)}"), r.stderr
  for bad in ("--budget=0", "--budget=1.5"):
    r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}",
                        bad], cwd=REPO, capture_output=True, text=True, check=False)
    value = bad.split("=")[1]
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        f"eejax.export: error: budget={float(value)} must be a fraction of the full network's MACs, above 0 and at "
        "most 1"), r.stderr


def test_a_budget_no_setting_fits_is_exported_at_the_cheapest_and_says_so(smoke_run):
  _, _, workdir = smoke_run
  run = load_run(workdir)
  tiny, about = export.run_threshold(run, policies.get("max_prob"), 1e-6)
  assert about.endswith("; no setting is within the budget of 0.0001%: this is the cheapest)"), about
  half, about = export.run_threshold(run, policies.get("max_prob"), 0.5)
  assert "no setting" not in about and about.startswith("thresholds.json")
  assert tiny.shape == half.shape == (run.model.num_exits, run.model.num_classes)



def test_exporting_a_finished_run_never_reads_its_training_images(smoke_master, tmp_path):
  """The statistics come from run.json; the training tree (and any decoded cache) is gone before the export."""
  import shutil, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO, copy_run  # pylint: disable=g-import-not-at-top
  tree, workdir = copy_run(smoke_master, str(tmp_path), own_tree=True)  # trained without a cache
  shutil.rmtree(os.path.join(tree, "train"))
  for policy in ("entropy", "patience"):
    out = tmp_path / f"export_{policy}"
    r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={workdir}", f"--out={out}",
                        "--formats=stablehlo,onnx", f"--policy={policy}", "--images=6"],
                       cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "computing them once" not in r.stdout  # the statistics were in run.json
    assert "W:onnxruntime" not in r.stderr  # dozens of lines of onnxruntime's warnings, each export, before
    report = json.load(open(out / "export_report.json"))
    assert report["policy"] == policy
    for fmt in ("stablehlo", "onnx") if export_onnx.available() is None else ("stablehlo",):
      assert report["formats"][fmt]["status"] == "ok", report["formats"][fmt]
      assert all(e["answered_at_forced_exit"] and e["max_abs_diff"] < 1e-4 and e["top1_agreement"] == 1.0
                 for e in report["formats"][fmt]["exits"])
      assert report["formats"][fmt]["policy"]["agrees_with_jax"] == 1.0
      calibrated = report["formats"][fmt]["policy"]  # the run named its classes: the test images are labelled
      assert report["labelled"] and 0 <= calibrated["accuracy"] == calibrated["jax_accuracy"] <= 1
      assert report["formats"][fmt]["bytes"] == sum(os.path.getsize(p) for p in report["formats"][fmt]["files"])
  # Only an int8 export reads training images (to calibrate), and says so where they are gone.
  out = tmp_path / "export_int8"
  r = subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={workdir}", f"--out={out}",
                      "--formats=stablehlo,tflite_int8", "--images=4"],
                     cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:  # reported as a format this machine lacks; the training split is never looked for
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not available here" in json.load(open(out / "export_report.json"))["formats"]["tflite_int8"]["status"]
  else:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "tflite_int8" in r.stderr.splitlines()[-1] and "train" in r.stderr.splitlines()[-1], r.stderr


@pytest.mark.parametrize("fmt", ["onnx_static", "onnx_stages"])
@pytest.mark.parametrize("policy", ["max_prob", "patience"])
def test_onnx_forms_without_control_flow_verify_and_batch(tmp_path, fmt, policy):
  require_onnx()
  check_format(fmt, tmp_path, "erde", policy)
  import onnx  # pylint: disable=g-import-not-at-top
  for path in tmp_path.glob("*.onnx"):
    graph = onnx.load(str(path)).graph
    assert not any(node.op_type in ("If", "Loop") for node in graph.node), path  # no control flow at all
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any batch size
  assert len(list(tmp_path.glob("stage_*.onnx"))) == (3 if fmt == "onnx_stages" else 0)
  model, variables, mean, std, images, reference = small_model("erde")
  (tmp_path / "again").mkdir()
  _, runner = export.EXPORTERS[fmt](model, variables, mean, std, (16, 16, 3), str(tmp_path / "again"), policy)
  t_ExC = thresholds.per_exit([2, 2] if policy == "patience" else [0.3, 0.3], 3, 5, policy)
  timing = export_verify.batch_latency(runner, images, t_ExC, batch=8)
  assert timing["exits_match_batch_1"] and timing["ms_per_batch"] > 0


def test_an_unfinished_run_exports_its_checkpoint_and_the_report_says_so(smoke_master, tmp_path):
  """A run stopped part-way (or still training) has no report of its latest step: its export says which step it
  holds and that the run had not finished, where before nothing told it from the finished run."""
  from conftest import copy_run  # pylint: disable=g-import-not-at-top
  _, workdir = copy_run(smoke_master, str(tmp_path))
  lines = []
  finished = export.export_and_verify(workdir, str(tmp_path / "a"), ("stablehlo",), num_images=4, log=lines.append)
  step = finished["step"]
  assert finished["unfinished"] is None and not any("warning" in l for l in lines)
  assert f"Weights of step {step}. Batch 1" in (tmp_path / "a" / "export_report.md").read_text()
  report = json.load(open(os.path.join(workdir, "report.json")))
  report["step"] = step - 1  # the report of an earlier step: the run went on training after it
  json.dump(report, open(os.path.join(workdir, "report.json"), "w"))
  lines = []
  partway = export.export_and_verify(workdir, str(tmp_path / "b"), ("stablehlo",), num_images=4, log=lines.append)
  why = f"its latest checkpoint is step {step}, its report of step {step - 1}"
  assert partway["unfinished"] == why and partway["step"] == step
  assert lines[0] == f"warning: the run in {workdir} has not finished training ({why}): exporting step {step}"
  assert (f"Weights of step {step} (**the run had not finished training**: {why}). Batch 1"
          in (tmp_path / "b" / "export_report.md").read_text())


def test_an_out_that_is_a_file_is_one_line_before_the_run_is_read(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError, match=r"^--out=.*/a_file is a file, not a folder: give the export a folder's path"):
    export.export_and_verify(str(tmp_path / "no_run"), str(tmp_path / "a_file"), ("stablehlo",))


def test_a_run_whose_dataset_moved_exports_with_data(smoke_master, tmp_path):
  import shutil, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO, copy_run  # pylint: disable=g-import-not-at-top
  tree, workdir = copy_run(smoke_master, str(tmp_path), own_tree=True)
  moved = str(tmp_path / "moved")
  shutil.move(tree, moved)
  export_ = lambda out, *extra: subprocess.run(
      [sys.executable, "-m", "eejax.export", f"--workdir={workdir}", f"--out={tmp_path / out}", "--formats=stablehlo",
       "--images=4", *extra], cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
  r = export_("a")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
      "where the dataset moved, give its place now (eejax.export --data=folder:PATH)"), r.stderr[-2000:]
  r = export_("b", f"--data=folder:{moved}")
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.load(open(tmp_path / "b" / "export_report.json"))
  assert report["data"] == f"folder:{moved}" and report["formats"]["stablehlo"]["status"] == "ok"
  assert f"4 test images of `folder:{moved}`" in (tmp_path / "b" / "export_report.md").read_text()
