r"""Batch-1 deployment exports of a trained early-exit model, each verified against JAX.

  python -m eejax.export --workdir RUN --out DIR [--formats stablehlo,onnx,tflite] [--policy max_prob]
                         [--budget 0.5]

Every export computes f(image_1xHxWx3 uint8, threshold_ExC float32) ->
(logits_1xC of the exit that answered, that exit's 0-based index) with the
run's exit policy (`eejax.policies`: max_prob, entropy or patience): exit e
answers when the policy's score passes threshold_ExC[e, predicted class]; the
last exit always answers.

  stablehlo  `jax.export` of one function with a `lax.cond` after every exit:
             the decisions run inside the graph (DIR/model.stablehlo,
             reloadable with `jax.export.deserialize`).
  onnx       the same function through jax2onnx: `lax.cond` becomes ONNX `If`;
             run with onnxruntime (optional extra `eejax[export]`).
  onnx_static  one ONNX graph without control flow returning every exit's logits
             for any batch size; the caller decides (`eejax.export_onnx`).
  onnx_stages  one ONNX graph per stage and a driver that applies the thresholds
             between them and passes on only the images still in play.
  tflite     a cascade, one TFLite model per stage (the blocks up to exit k and
             head k) with the policy's test in host code between them; a
             single graph with `lax.cond` converts to TFLite `IF` but fails
             to run past exit 1 (TensorFlow 2.21; needs `eejax[tflite]`).
  tflite_int8  the same cascade quantized to int8 after training, its
             activation ranges calibrated on `--calibration_images` training
             images (the one format that reads the training split).

Each cascade (onnx_stages, tflite, tflite_int8) also leaves DIR/cascade.py and
DIR/cascade_FORMAT.json: the standalone driver that runs it on a device
without JAX (`eejax.cascade_runtime`), with the thresholds it was measured at.

Verify forces every exit in turn (thresholds never before it, always at it),
and reports per exit the max |logits - JAX's logits| over the images, the
share whose top-1 class is JAX's, whether the expected exit answered, and the
latency (mean over the images of each
one's fastest of 3 calls, so a mix of exits is weighted as the policy mixes
them). A format whose optional dependency is missing is reported as such. The
thresholds are the run's (thresholds.json: fitted on validation for `--budget`,
or a BTS-EE model's CPM table), else fitted now on its validation logits.
At the calibrated thresholds it reports the exits taken and the share of
images where the format answers at JAX's exit with JAX's class. Apart from
tflite_int8's calibration, nothing here reads the training images: the
normalisation statistics come from the run (`eejax.run`), the images to verify
on from its evaluation split.
"""
import functools
import os

from absl import app, flags, logging

from eejax import cli

if __name__ == "__main__":  # Ctrl-C while JAX loads below: one line, not a traceback from inside an import
  cli.exit_on_interrupt("eejax.export")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from eejax import (calibration, cascade_runtime, data, evaluate, export_onnx, export_tflite, export_verify, inference,
                   input_pipeline, latex, policies, thresholds, workdirs, xla_cache)
from eejax.cli import fail, guarded, parse_flags
from eejax.errors import UserError
from eejax.flops import exit_macs
from eejax.run import load_run
from eejax.writers import Count
# pylint: enable=g-import-not-at-top,wrong-import-position

FORMATS = ("stablehlo", "onnx", "onnx_static", "onnx_stages", "tflite", "tflite_int8")
CALIBRATED = ("tflite_int8",)  # formats whose exporter takes calibration_NxHxWx3, training images
CASCADES = ("onnx_stages", "tflite", "tflite_int8")  # stage models run by the standalone driver DIR/cascade.py


# ---------------------------------------------------------------- formats: export, then a runner (x, t) -> (logits, exit)


def export_stablehlo(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob"):
  fn = inference.early_exit_fn(model, variables, mean_C, std_C, policy)
  exported = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8),
                                            jax.ShapeDtypeStruct((model.num_exits, model.num_classes), jnp.float32))
  path = os.path.join(out_dir, "model.stablehlo")
  workdirs.write_bytes(path, exported.serialize())
  with open(path, "rb") as f:
    loaded = jax.export.deserialize(bytearray(f.read()))
  call = jax.jit(loaded.call)
  return [path], lambda x, t: tuple(np.asarray(a) for a in call(x, t))


EXPORTERS = {"stablehlo": export_stablehlo, "onnx": export_onnx.export_onnx,
             "onnx_static": export_onnx.export_onnx_static, "onnx_stages": export_onnx.export_onnx_stages,
             "tflite": export_tflite.export_tflite, "tflite_int8": export_tflite.export_tflite_int8}
ONNX_EXTRA = "pip install 'eejax[export]' (jax2onnx, onnxruntime)"
TFLITE_EXTRA = "pip install 'eejax[tflite]' (tensorflow; never on a TPU runtime)"
MISSING = {"onnx": ONNX_EXTRA, "onnx_static": ONNX_EXTRA, "onnx_stages": ONNX_EXTRA,
           "tflite": TFLITE_EXTRA, "tflite_int8": TFLITE_EXTRA}


def run_threshold(run, policy, budget: float):
  """(threshold_ExC, where it came from): the run's setting for `policy` and `budget`, else fitted now on its
  validation logits for that budget."""
  saved = thresholds.load(run.workdir, run.model.num_exits, run.model.num_classes, step=run.step)
  try:
    chosen = thresholds.pick(saved, policy, budget)
    about = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in chosen.items() if k not in ("policy", "threshold_ExC"))
    return chosen["threshold_ExC"], f"thresholds.json ({policies.get(policy).name}; {about})"
  except UserError:
    pass
  macs = exit_macs(run.model, run.spec.image_shape)
  logits_ExNxC, labels_N = evaluate.val_logits(run)
  threshold_ExC, fit = calibration.fit(logits_ExNxC, labels_N, macs.cumulative, policy, budget_macs=budget * macs.full)
  return threshold_ExC, (f"fitted now on validation ({policies.get(policy).name}, budget {budget:g}: "
                         f"{calibration.fit_summary(fit, macs.full, budget)})")


def plain_fn(model, variables, mean_C, std_C):
  """The network without its early exits: stem, every block, the final classifier (the 'full network')."""
  def run(x_1xHxWx3):
    def body(m, x):
      h = m.stem(x)
      for block in m.blocks:
        h = block(h, False)
      return m.heads[-1](h, False)
    return model.apply(variables, input_pipeline.normalize(x_1xHxWx3, mean_C, std_C), method=body)
  return run


def export_and_verify(workdir: str, out_dir: str, formats=FORMATS, budget: float = 0.5, num_images: int = 200,
                      policy="max_prob", log=print, threshold_ExC=None, run=None,
                      calibration_images: int = 200) -> dict:
  """Exports `workdir`'s model in every format, verifies each and times it; writes out_dir/export_report.json/.md.
  An int8 format calibrates on `calibration_images` training images."""
  check_request(formats, num_images, calibration_images, budget)
  workdirs.check_path(out_dir, "export", "--out")  # before the run is loaded and its images read
  policy = policies.get(policy)
  run = run or load_run(workdir)
  model, variables, (mean_C, std_C) = run.model, run.variables, run.spec.stats
  if threshold_ExC is not None:  # the caller's, checked before anything is read or exported
    threshold_ExC = np.asarray(inference.check_threshold(threshold_ExC, model.num_exits, model.num_classes),
                               np.float32)
  images, labels_N = data.sample_split(run.config.data, num_images, "test", run.spec.class_names)
  calibration_NxHxWx3 = None  # read first, so a missing training split fails before any export
  if any(f in CALIBRATED for f in formats) and export_tflite.available() is None:
    calibration_NxHxWx3 = data.sample_images(run.config.data, calibration_images, "train")
  reference_NxExC = evaluate.run_logits(run, images).transpose(1, 0, 2)
  images = images[:, None]
  if threshold_ExC is None:
    threshold_ExC, source = run_threshold(run, policy, budget)
  else:
    source = "the caller"
  image_shape = run.spec.image_shape
  macs = exit_macs(model, image_shape)
  os.makedirs(out_dir, exist_ok=True)
  plain = jax.jit(plain_fn(model, variables, mean_C, std_C))
  plain(images[0])
  count = Count("the plain network in JAX: timing", 3 * len(images))
  plain_ms = export_verify.latency_ms(lambda x: count.tick(plain(x)), images)
  count.close()
  unfinished = run.unfinished()
  if unfinished:  # a checkpoint is the user's to export, but never taken for the finished run without a word
    log(f"warning: the run in {workdir} has not finished training ({unfinished}): exporting step {run.step}")
  report = {"workdir": workdir, "step": run.step, "unfinished": unfinished, "images": len(images),
            "data": run.config.data.source,
            "policy": policy.name, "thresholds": source,
            "device": jax.devices()[0].device_kind,
            "exit_macs": list(macs.cumulative), "full_macs": macs.full,
            "plain_network_jax_latency_ms": plain_ms, "labelled": labels_N is not None, "formats": {}}
  for fmt in formats:
    log(f"{fmt}: exporting ...")
    extra = {"calibration_NxHxWx3": calibration_NxHxWx3} if fmt in CALIBRATED else {}
    try:
      paths, runner = EXPORTERS[fmt](model, variables, mean_C, std_C, image_shape, out_dir, policy, **extra)
    except ImportError as e:
      report["formats"][fmt] = {"status": f"not available here ({e}); {MISSING[fmt]}"}
      log(f"{fmt}: {report['formats'][fmt]['status']}")
      continue
    except Exception as e:  # pylint: disable=broad-except  # a converter's failure is a result to report
      report["formats"][fmt] = {"status": f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      log(f"{fmt}: {report['formats'][fmt]['status']}")
      continue
    count = Count(f"{fmt}: verifying and timing",
                  export_verify.calls(model.num_exits, len(images), hasattr(runner, "batch")))
    runner = export_verify.counted(runner, count)
    exits = export_verify.verify(runner, reference_NxExC, images, policy)
    calibrated = export_verify.policy_latency(runner, images, threshold_ExC, macs.cumulative, reference_NxExC, policy,
                                              labels_N)
    report["formats"][fmt] = {"status": "ok", "files": paths, "bytes": sum(os.path.getsize(p) for p in paths),
                              "exits": exits, "policy": calibrated}
    if fmt in CASCADES:
      report["formats"][fmt]["driver"] = write_driver(out_dir, fmt, paths, policy, threshold_ExC, image_shape, source,
                                                      run.spec.class_names)
    if hasattr(runner, "batch"):
      report["formats"][fmt]["batch64"] = export_verify.batch_latency(runner, images, threshold_ExC)
    count.close()
    log(f"{fmt}: " + "; ".join(f"exit {r['exit']}: max |diff| {r['max_abs_diff']:.2e}, "
                               f"{r['latency_ms']:.3f} ms" for r in exits)
        + f"; calibrated: {calibrated['latency_ms']:.3f} ms, {calibrated['predicted_mean_macs'] / 1e6:.2f} M MACs, "
        f"{100 * calibrated['agrees_with_jax']:.1f}% answered as JAX does" + accuracy(calibrated))
  workdirs.write_json(os.path.join(out_dir, "export_report.json"), report)
  latex.write_markdown(os.path.join(out_dir, "export_report.md"), markdown(report))
  return report


def check_request(formats, num_images: int, calibration_images: int, budget: float = 0.5) -> None:
  """The formats, image counts and budget asked for, checked before anything is read."""
  calibration.check_goal(budget)
  unknown = [f for f in formats if f not in EXPORTERS]
  if not formats:  # would export nothing, and write a report of nothing over the folder's
    raise UserError(f"no export format given; give one or more of {', '.join(FORMATS)}")
  if unknown:
    raise UserError(f"unknown export format(s) {unknown}; valid: {', '.join(FORMATS)}")
  if num_images < 1 or (calibration_images < 1 and any(f in CALIBRATED for f in formats)):
    raise UserError(f"--images={num_images} and --calibration_images={calibration_images}: each must be at least 1 "
                    "(the evaluation images that verify, and the training images that calibrate an int8 format)")


def write_driver(out_dir: str, fmt: str, paths, policy, threshold_ExC, image_shape, about: str,
                 class_names=()) -> str:
  """DIR/cascade_FORMAT.json (the stages, the policy, the thresholds, the class names where the run recorded
  them) and DIR/cascade.py, the standalone driver that runs them (`eejax.cascade_runtime`, copied as it is);
  returns the JSON's path."""
  path = os.path.join(out_dir, f"cascade_{fmt}.json")
  workdirs.write_json(path, {"format": fmt, "stages": [os.path.basename(p) for p in paths], "policy": policy.name,
                             "threshold_ExC": thresholds.to_json(threshold_ExC), "thresholds": about,
                             "image_shape": list(image_shape), "input": "uint8 RGB images, NxHxWx3",
                             "class_names": list(class_names)})
  with open(cascade_runtime.__file__, encoding="utf-8") as f:
    workdirs.write_text(os.path.join(out_dir, "cascade.py"), f.read())
  return path


def accuracy(calibrated: dict) -> str:
  """", accuracy 60.03% (JAX 59.88%)" where the images were labelled, else ""."""
  if "accuracy" not in calibrated:
    return ""
  return f", accuracy {100 * calibrated['accuracy']:.2f}% (JAX {100 * calibrated['jax_accuracy']:.2f}%)"


def markdown(report: dict) -> str:
  weights = f"Weights of step {report.get('step')}" + (
      f" (**the run had not finished training**: {report['unfinished']})" if report.get("unfinished") else "")
  lines = [f"# Export of `{report['workdir']}`", "",
           f"{weights}. Batch 1 on {report['device']}, {report['images']} test images of `{report.get('data')}`; "
           f"policy `{report['policy']}`, "
           f"thresholds from {report['thresholds']}. "
           f"Plain network (no early exits) in JAX: {report['plain_network_jax_latency_ms']:.3f} ms, "
           f"{report['full_macs'] / 1e6:.2f} M MACs.", "",
           "| format | exit | max abs diff vs JAX | top-1 as JAX | forced exit answered | latency (ms) |",
           "|---|---|---|---|---|---|"]
  for fmt, r in report["formats"].items():
    if r["status"] != "ok":
      lines.append(f"| {fmt} | | {r['status']} | | | |")
      continue
    for e in r["exits"]:
      lines.append(f"| {fmt} | {e['exit']} | {e['max_abs_diff']:.2e} | {100 * e['top1_agreement']:.1f}% | "
                   f"{e['answered_at_forced_exit']} | {e['latency_ms']:.3f} |")
    p = r["policy"]
    shares = " / ".join(f"{100 * s:.0f}" for s in p["exit_share"])
    lines.append(f"| {fmt} | calibrated (exits {shares}%) | {r['bytes'] / 1e6:.3f} MB in {len(r['files'])} file(s) "
                 f"| exit and class as JAX: {100 * p['agrees_with_jax']:.1f}% | {accuracy(p).lstrip(', ')} "
                 f"| {p['latency_ms']:.3f} "
                 f"(predicted {p['predicted_mean_macs'] / 1e6:.2f} M MACs) |")
    if "batch64" in r:
      b = r["batch64"]
      lines.append(f"| {fmt} | calibrated, batch {b['batch']} | | | decisions as at batch 1: "
                   f"{b['exits_match_batch_1']} | {b['ms_per_batch']:.3f} per batch, {b['ms_per_image']:.4f} per image |")
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  flags.DEFINE_string("workdir", None, "A finished run (or a BTS-EE models/NAME workdir).")
  flags.DEFINE_string("out", None, "Folder for the exported files and export_report.md/.json.")
  flags.DEFINE_list("formats", list(FORMATS), f"Any of: {', '.join(FORMATS)}.")
  flags.DEFINE_string("policy", "max_prob", f"Exit policy: {', '.join(policies.POLICIES)}.")
  flags.DEFINE_float("budget", 0.5, "The thresholds fitted for this fraction of the full network's MACs.")
  flags.DEFINE_integer("images", 200, "Evaluation-split images for verification and timing.")
  flags.DEFINE_integer("calibration_images", 200, "Training images that calibrate tflite_int8's activation ranges.")
  flags.DEFINE_string("data", "", "data.source of the run's images where they moved since it trained ('': its own).")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if not f.workdir or not f.out:
    fail("give --workdir=RUN and --out=DIR", "eejax.export")
  def job():
    check_request(tuple(f.formats), f.images, f.calibration_images, f.budget)  # a wrong flag first, before the run
    run = load_run(f.workdir)
    if f.data:  # the images verify and calibrate
      run.use_data(f.data)
    xla_cache.enable_for_run(run.config)  # the programs of an export done before are loaded
    return export_and_verify(f.workdir, f.out, tuple(f.formats), f.budget, f.images, f.policy, run=run,
                             calibration_images=f.calibration_images)
  report = guarded(job, "eejax.export", f.out)
  print(markdown(report))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=functools.partial(parse_flags, program="eejax.export"))
