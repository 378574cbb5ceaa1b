"""The standalone cascade driver: its decisions against eejax's policies, and the shipped copy run without JAX."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from eejax import cascade_runtime, export, export_onnx, policies, thresholds
from test_export import small_model

E, C = 3, 5


def test_the_driver_knows_every_policy_and_its_direction():
  assert cascade_runtime.HIGHER_PASSES == {name: p.higher_passes for name, p in policies.POLICIES.items()}


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_a_cascade_of_made_up_stages_decides_as_the_policy_and_runs_only_images_in_play(policy):
  rng = np.random.default_rng(0)
  logits_ExNxC = rng.normal(size=(E, 40, C)).astype(np.float32) * 2
  logits_ExNxC[:, :8] = logits_ExNxC[:1, :8]  # agreeing exits
  seen = []

  def stage(k):
    def run(h_Bx):  # the "feature map" carries each image's index
      seen.append((k, len(h_Bx)))
      return h_Bx, logits_ExNxC[k, h_Bx[:, 0]]
    return run
  score_ExN, _ = policies.scores(logits_ExNxC, policy)
  threshold_ExC = (np.full((E, C), 2.0, np.float32) if policy == "patience" else
                   np.quantile(np.asarray(score_ExN), 0.5, axis=1)[:, None].repeat(C, 1).astype(np.float32))
  cascade = cascade_runtime.Cascade(stages=[stage(k) for k in range(E)], policy=policy, threshold_ExC=threshold_ExC)
  logits_NxC, exit_N = cascade(np.arange(40)[:, None])
  want_exit_N, want_pred_N = (np.asarray(a) for a in policies.decide(logits_ExNxC, threshold_ExC, policy))
  np.testing.assert_array_equal(exit_N, want_exit_N)
  np.testing.assert_array_equal(logits_NxC, logits_ExNxC[want_exit_N, np.arange(40)])
  np.testing.assert_array_equal(logits_NxC.argmax(-1), want_pred_N)
  assert [n for _, n in seen] == [40] + [int(np.sum(want_exit_N >= k)) for k in range(1, E)][:len(seen) - 1]
  assert len(set(exit_N.tolist())) > 1
  for bad in (threshold_ExC[:2], threshold_ExC[:, :2], threshold_ExC[0]):  # tracebacks from numpy, before
    with pytest.raises(ValueError, match=rf"^a threshold of shape \({', '.join(map(str, bad.shape))},?\); "):
      cascade(np.arange(40)[:, None], bad)


def test_the_command_answers_chunk_by_chunk_says_how_far_it_is_and_stops_on_ctrl_c(tmp_path, monkeypatch, capsys):
  """Lines come as each chunk of images is answered, so a long job shows them and Ctrl-C keeps what was answered."""
  images = np.random.default_rng(1).integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
  np.save(tmp_path / "many.npy", images)
  np.save(tmp_path / "one.npy", images[7])
  calls = []

  def stage(h_Bx):  # one exit: class = the image's first byte mod C
    calls.append(len(h_Bx))
    if stop_at is not None and len(calls) == stop_at:
      raise KeyboardInterrupt
    return h_Bx, np.eye(C, dtype=np.float32)[np.asarray(h_Bx)[:, 0, 0, 0] % C]
  real = cascade_runtime.Cascade

  def made_up(path):
    del path
    cascade = real(stages=[stage], policy="max_prob", threshold_ExC=np.zeros((1, C), np.float32))
    cascade.image_shape, cascade.class_names = (4, 4, 3), []
    return cascade
  monkeypatch.setattr(cascade_runtime, "Cascade", made_up)
  argv = ["cascade.py", "c.json", str(tmp_path / "many.npy"), str(tmp_path / "one.npy")]

  stop_at = None
  assert cascade_runtime.main(argv, every_s=0.0, chunk=256) == 0
  out, err = capsys.readouterr()
  assert calls == [256, 45]  # 301 images in chunks of 256
  want = [f"{tmp_path / 'many.npy'}[{i}]\tclass {x[0, 0, 0] % C}\texit 1" for i, x in enumerate(images)]
  assert out.splitlines() == want + [f"{tmp_path / 'one.npy'}\tclass {images[7, 0, 0, 0] % C}\texit 1"]
  assert re.fullmatch(r"cascade: 256 of 301 images, \d+ images/s", err.strip()), err

  calls.clear()
  stop_at = 2
  assert cascade_runtime.main(argv, every_s=60.0, chunk=256) == 130
  out, err = capsys.readouterr()
  assert out.splitlines() == want[:256]
  assert err.strip() == "cascade: stopped (Ctrl-C) after 256 images; the lines above are their answers"

  folder = tmp_path / "frames"  # a folder: its images and arrays in name order, subfolders too, nothing else
  (folder / "b").mkdir(parents=True)
  np.save(folder / "b" / "z.npy", images[3])
  np.save(folder / "a.npy", images[:2])
  (folder / "notes.txt").write_text("not an image")
  assert cascade_runtime.main(["cascade.py", "c.json", str(folder), str(tmp_path / "one.npy")]) == 0
  names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
  assert names == [f"{folder / 'a.npy'}[0]", f"{folder / 'a.npy'}[1]", str(folder / "b" / "z.npy"),
                   str(tmp_path / "one.npy")]
  (folder / "empty").mkdir()
  assert cascade_runtime.main(["cascade.py", "c.json", str(folder / "empty")]) == 2
  assert "empty is a folder without image files" in capsys.readouterr().err

  assert cascade_runtime.main(["cascade.py", "--help"]) == 0  # what it takes, not "no such file: '--help'"
  assert "IMAGE_NPY_OR_FOLDER" in capsys.readouterr().out

  np.save(tmp_path / "floats.npy", images / 255.0)  # a wrong array anywhere: refused before the first answer
  calls.clear()
  assert cascade_runtime.main([*argv, str(tmp_path / "floats.npy")]) == 2
  out, err = capsys.readouterr()
  assert not calls and not out and err.startswith("cascade: error: ") and "floats.npy holds float64" in err


def test_a_file_that_is_not_a_whole_cascade_is_one_line(tmp_path, capsys):
  image = tmp_path / "x.npy"
  np.save(image, np.zeros((4, 4, 3), np.uint8))
  whole = {"format": "onnx_stages", "stages": ["stage_0.onnx", "stage_1.onnx"], "policy": "max_prob",
           "threshold_ExC": [[0.5] * C, [None] * C], "image_shape": [4, 4, 3]}
  (tmp_path / "report.md").write_text("# Export\n")
  (tmp_path / "list.json").write_text("[1, 2]")
  (tmp_path / "partial.json").write_text(json.dumps({k: v for k, v in whole.items() if k != "policy"}))
  (tmp_path / "cascade.json").write_text(json.dumps(whole))  # its stages not copied beside it
  cases = [("report.md", "report.md is not a cascade file (not JSON: Expecting value: line 1 column 1 (char 0)); "
                         "give the DIR/cascade_FORMAT.json that eejax.export wrote beside the stage models"),
           ("list.json", "list.json is not a cascade file (it lacks format, stages, policy, threshold_ExC, "
                         "image_shape); give the DIR/cascade_FORMAT.json"),
           ("partial.json", "partial.json is not a cascade file (it lacks policy);"),
           ("cascade.json", f"cascade.json, {tmp_path / 'stage_0.onnx'}, is missing: keep the stage models beside "
                            f"the cascade file, as eejax.export wrote them")]
  for name, message in cases:
    assert cascade_runtime.main(["cascade.py", str(tmp_path / name), str(image)]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and err.startswith("cascade: error: ") and message in err, err
  if export_onnx.available() is None:  # a damaged stage needs the runtime to find out
    (tmp_path / "stage_0.onnx").write_bytes(b"not a model")
    assert cascade_runtime.main(["cascade.py", str(tmp_path / "cascade.json"), str(image)]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1, err
    assert err.startswith(f"cascade: error: stage 1 of {tmp_path / 'cascade.json'}, {tmp_path / 'stage_0.onnx'}, "
                          f"cannot be loaded (") and err.endswith(
                              "): it is damaged or not an ONNX model; copy it again from the export, or export "
                              "again\n"), err


def test_thresholds_read_back_as_eejax_reads_them():
  rows = [[0.5, None], [None, 0.25]]
  for policy in policies.POLICIES:
    np.testing.assert_array_equal(cascade_runtime.thresholds_from_json(rows, policy),
                                  thresholds.from_json(rows, policy))


def run_shipped(folder, *args):
  """DIR/cascade.py as a device runs it: JAX and eejax cannot be imported."""
  block = ("import runpy, sys; sys.modules.update({m: None for m in ('jax', 'jaxlib', 'eejax', 'flax')}); "
           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
  return subprocess.run([sys.executable, "-c", block, os.path.join(folder, "cascade.py"), *args], cwd=folder,
                        capture_output=True, text=True, check=False, timeout=300)


def check_shipped(fmt, tmp_path, **extra):
  model, variables, mean, std, images, reference = small_model("pool_conv")
  paths, runner = export.EXPORTERS[fmt](model, variables, mean, std, (16, 16, 3), str(tmp_path), "max_prob", **extra)
  score_ExN, _ = policies.scores(reference.transpose(1, 0, 2), "max_prob")
  threshold_ExC = thresholds.per_exit(np.quantile(np.asarray(score_ExN[:-1]), 0.5, axis=1), E, C, "max_prob")
  names = ("ant", "bee", "cat", "dog", "eel")
  config = export.write_driver(str(tmp_path), fmt, paths, policies.get("max_prob"), threshold_ExC, (16, 16, 3), "test",
                               names)
  want = [runner(x, threshold_ExC) for x in images]
  np.save(tmp_path / "images.npy", images[:, 0])
  r = run_shipped(str(tmp_path), config, "images.npy")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines == [f"images.npy[{i}]\tclass {np.argmax(logits)} ({names[np.argmax(logits)]})\texit {int(e) + 1}"
                   for i, (logits, e) in enumerate(want)]
  assert len({line.split("\t")[2] for line in lines}) > 1  # the thresholds split the images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(images[3, 0]).save(tmp_path / "three.png")  # an image file answers as its array does
  Image.fromarray(images[3, 0]).resize((40, 40)).save(tmp_path / "big.png")  # resized to the model's 16x16
  r = run_shipped(str(tmp_path), config, "three.png", "big.png")
  assert r.returncode == 0 and r.stdout.splitlines()[0] == lines[3].replace("images.npy[3]", "three.png"), r.stderr
  assert r.stdout.splitlines()[1].startswith("big.png\tclass ")
  np.save(tmp_path / "floats.npy", images[:, 0] / 255.0)  # [0, 1] floats: refused, never cast to zeros
  refused = run_shipped(str(tmp_path), config, "floats.npy")
  assert refused.returncode == 2 and "the model takes uint8 RGB images of [16, 16, 3]" in refused.stderr
  bad = run_shipped(str(tmp_path), config, "missing.png")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("cascade: error:") and "missing.png" in bad.stderr
  assert json.load(open(config))["stages"] == [os.path.basename(p) for p in paths]


def test_the_shipped_onnx_driver_runs_without_jax_and_answers_as_verified(tmp_path):
  if export_onnx.available() is not None:
    pytest.skip(f"ONNX export is not available here: {export_onnx.available()}")
  check_shipped("onnx_stages", tmp_path)


def test_the_shipped_tflite_int8_driver_runs_without_jax_and_answers_as_verified(tmp_path):
  pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra (TensorFlow), not installed here")
  calibration = np.random.default_rng(2).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
  check_shipped("tflite_int8", tmp_path, calibration_NxHxWx3=calibration)
