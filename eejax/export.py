r"""Batch-1 deployment exports of a trained early-exit model, each verified against JAX.

  python -m eejax.export --workdir RUN --out DIR [--formats stablehlo,onnx,tflite] [--budget 0.5]

Every export computes f(image_1xHxWx3 uint8, threshold_ExC float32) ->
(logits_1xC of the exit that answered, that exit's 0-based index) with the
max-probability policy: exit e answers when its top softmax probability is at
least threshold[e, predicted class] (per-exit thresholds repeat over the
classes); the last exit always answers.

  stablehlo  `jax.export` of one function with a `lax.cond` after every exit:
             the decisions run inside the graph (DIR/model.stablehlo,
             reloadable with `jax.export.deserialize`).
  onnx       the same function through jax2onnx: `lax.cond` becomes ONNX `If`;
             run with onnxruntime (optional extra `eejax[export]`).
  tflite     a cascade, one TFLite model per stage (the blocks up to exit k and
             head k) with the threshold test in host code between them; a
             single-graph conversion of `lax.cond` is known to give wrong
             outputs (needs TensorFlow: `eejax[tflite]`).

Verify forces every exit in turn (thresholds +inf before it, -inf at it), and
reports per exit the max |logits - JAX's logits| over the images, whether the
expected exit answered, and the latency (mean over the images of each one's
fastest of 3 calls, so a mix of exits is weighted as the policy mixes them). A format whose optional
dependency is missing is reported as such. The thresholds are the run's: a
BTS-EE model's thresholds.json, else the max-probability per-exit thresholds
fitted on validation for `--budget` (report.json).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from eejax import evaluate, inference, input_pipeline, sharding
from eejax.errors import UserError

FORMATS = ("stablehlo", "onnx", "tflite")


def stage_fns(model, variables, mean_C, std_C):
  """[stage_k]: stage 0 maps x_1xHxWx3 uint8 to (h, logits_1xC); stage k > 0 maps h to (h, logits_1xC)."""
  def stage(k):
    def fn(inp):
      h = inp
      if k == 0:
        h = model.apply(variables, input_pipeline.normalize(inp, mean_C, std_C), method=lambda m, x: m.stem(x))
      return model.apply(variables, h, method=lambda m, h: m.segment(k, h))
    return fn
  return [stage(k) for k in range(model.num_exits)]


def forced_thresholds(k: int, num_exits: int, num_classes: int) -> np.ndarray:
  """threshold_ExC under which exit k answers every image: +inf before it, -inf at it."""
  threshold = np.full((num_exits, num_classes), np.inf, np.float32)
  threshold[k] = -np.inf
  return threshold


def as_threshold_ExC(threshold, num_exits: int, num_classes: int) -> np.ndarray:
  """Per-exit (a number per row) or per-class (C numbers per row) thresholds, E-1 or E rows, as threshold_ExC.

  None (a class that never exits there) becomes +inf; a missing last row is added (it is never read).
  """
  rows = []
  for row in threshold:
    values = [row] if row is None or np.isscalar(row) else list(row)
    rows.append(np.broadcast_to(np.asarray([np.inf if v is None else v for v in values], np.float32), (num_classes,)))
  t = np.stack(rows) if rows else np.zeros((0, num_classes), np.float32)
  if t.shape[0] == num_exits - 1:
    t = np.concatenate([t, np.zeros((1, num_classes), np.float32)])
  if t.shape[0] != num_exits:
    raise UserError(f"{t.shape[0]} rows of thresholds for a model with {num_exits} exits")
  return t


# ---------------------------------------------------------------- formats: export, then a runner (x, t) -> (logits, exit)


def export_stablehlo(model, variables, mean_C, std_C, image_shape, out_dir: str):
  fn = inference.early_exit_fn(model, variables, mean_C, std_C, "max_prob")
  exported = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8),
                                            jax.ShapeDtypeStruct((model.num_exits, model.num_classes), jnp.float32))
  path = os.path.join(out_dir, "model.stablehlo")
  with open(path, "wb") as f:
    f.write(exported.serialize())
  with open(path, "rb") as f:
    loaded = jax.export.deserialize(bytearray(f.read()))
  call = jax.jit(loaded.call)
  return [path], lambda x, t: tuple(np.asarray(a) for a in call(x, t))


def export_onnx(model, variables, mean_C, std_C, image_shape, out_dir: str):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  from jax.extend.core import jaxpr_as_fun  # pylint: disable=g-import-not-at-top
  specs = [jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8),
           jax.ShapeDtypeStruct((model.num_exits, model.num_classes), jnp.float32)]
  # Traced to a closed jaxpr first, so jax2onnx converts JAX primitives only: its Flax-level BatchNorm and
  # avg_pool plugins write graphs onnxruntime rejects inside `If` branches (jax2onnx 0.17.1, measured).
  closed = jax.make_jaxpr(inference.early_exit_fn(model, variables, mean_C, std_C, "max_prob"))(*specs)
  path = os.path.join(out_dir, "model.onnx")
  to_onnx(lambda x, t: tuple(jaxpr_as_fun(closed)(x, t)), specs, return_mode="file", output_path=path)
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  names = [i.name for i in session.get_inputs()]
  return [path], lambda x, t: tuple(session.run(None, {names[0]: np.asarray(x), names[1]: np.asarray(t)}))


def export_tflite(model, variables, mean_C, std_C, image_shape, out_dir: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  interpreters, paths = [], []
  shape = (1, *image_shape)
  dtype = tf.uint8
  for k, fn in enumerate(stage_fns(model, variables, mean_C, std_C)):
    tf_fn = tf.function(jax2tf.convert(fn, native_serialization=False, enable_xla=False), autograph=False)
    concrete = tf_fn.get_concrete_function(tf.TensorSpec(shape, dtype))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf_fn)
    path = os.path.join(out_dir, f"stage_{k}.tflite")
    with open(path, "wb") as f:
      f.write(converter.convert())
    paths.append(path)
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    interpreters.append(interpreter)
    shape = tuple(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.uint8 if k == 0 else jnp.float32))[0].shape)
    dtype = tf.float32

  def run_stage(interpreter, inp):
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], inp)
    interpreter.invoke()
    outs = sorted(interpreter.get_output_details(), key=lambda d: len(d["shape"]), reverse=True)
    return [interpreter.get_tensor(d["index"]) for d in outs]  # (h, logits): the feature map has more axes

  def cascade(x, t):
    h = np.asarray(x)
    for k, interpreter in enumerate(interpreters):
      h, logits = run_stage(interpreter, h)
      if k == len(interpreters) - 1:
        return logits, np.int32(k)
      probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      if probs.max() >= t[k, int(probs.argmax())]:  # the threshold test, on the host
        return logits, np.int32(k)
    raise AssertionError("unreachable")
  return paths, cascade


EXPORTERS = {"stablehlo": export_stablehlo, "onnx": export_onnx, "tflite": export_tflite}
MISSING = {"onnx": "pip install 'eejax[export]' (jax2onnx, onnxruntime)", "tflite": "pip install 'eejax[tflite]' "
           "(tensorflow; never on a TPU runtime)"}


def _latency_ms(fn, images, rounds: int = 3) -> float:
  """Mean over the images of each image's fastest of `rounds` calls (ms): the best-of is robust to a busy host."""
  best = np.full(len(images), np.inf)
  for _ in range(rounds):
    for i, x in enumerate(images):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x))
      best[i] = min(best[i], 1e3 * (time.perf_counter() - t0))
  return float(np.mean(best))


def verify(runner, reference_logits_NxExC, images_Nx1xHxWx3) -> list[dict]:
  """Per exit k (forced): max |logits - reference| over the images, exit check, latency (ms)."""
  num_exits, num_classes = reference_logits_NxExC.shape[1:]
  rows = []
  for k in range(num_exits):
    t = forced_thresholds(k, num_exits, num_classes)
    runner(images_Nx1xHxWx3[0], t)  # warm-up (compilation, allocation)
    diffs, right_exit = [], True
    for x, ref in zip(images_Nx1xHxWx3, reference_logits_NxExC):
      logits, exit_index = runner(x, t)
      diffs.append(float(np.max(np.abs(np.asarray(logits).reshape(-1) - ref[k]))))
      right_exit &= int(np.asarray(exit_index)) == k
    rows.append({"exit": k + 1, "max_abs_diff": max(diffs), "answered_at_forced_exit": bool(right_exit),
                 "latency_ms": _latency_ms(lambda x: runner(x, t), images_Nx1xHxWx3)})
  return rows


def policy_latency(runner, images_Nx1xHxWx3, threshold_ExC, cost_E) -> dict:
  """Mean batch-1 latency at the calibrated thresholds, the exits taken and the mean MACs they predict."""
  runner(images_Nx1xHxWx3[0], threshold_ExC)
  exits = np.array([int(np.asarray(runner(x, threshold_ExC)[1])) for x in images_Nx1xHxWx3])
  return {"latency_ms": _latency_ms(lambda x: runner(x, threshold_ExC), images_Nx1xHxWx3),
          "exit_share": (np.bincount(exits, minlength=len(cost_E)) / len(exits)).tolist(),
          "predicted_mean_macs": float(np.mean(np.asarray(cost_E)[exits]))}


def run_thresholds(workdir: str, budget: float):
  """The run's calibrated thresholds and where they came from."""
  path = os.path.join(workdir, "thresholds.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)["per_class_threshold_BxC"], "thresholds.json (per class)"
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no report.json or thresholds.json: finish the run (or evaluate it) first")
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  fitted = {round(r["budget"], 6): r for r in report.get("fitted_on_val", {}).get("max_prob", [])}
  if round(budget, 6) not in fitted:
    raise UserError(f"no max_prob thresholds fitted for budget {budget} in {path}; "
                    f"available: {sorted(fitted)} (config.eval.budgets)")
  return fitted[round(budget, 6)]["per_exit"]["thresholds"], f"report.json (per exit, fitted for {budget:g} of the MACs)"


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
                      log=print) -> dict:
  """Exports `workdir`'s model in every format, verifies each and times it; writes out_dir/export_report.json/.md."""
  from eejax import train  # pylint: disable=g-import-not-at-top
  from eejax.flops import exit_macs  # pylint: disable=g-import-not-at-top
  unknown = [f for f in formats if f not in EXPORTERS]
  if unknown:
    raise UserError(f"unknown export format(s) {unknown}; valid: {', '.join(FORMATS)}")
  config, model, variables = train.load_run(workdir)
  ds = train.load_dataset(config.data)
  mean_C, std_C = input_pipeline.channel_stats(ds.train.images_NxHxWx3)
  images = ds.test.images_NxHxWx3[:num_images]
  reference_NxExC = evaluate.predict(evaluate.make_predict_fn(model, sharding.make_mesh()), variables, images, mean_C,
                                     std_C, config.eval.batch_size).transpose(1, 0, 2)
  images = images[:, None]
  raw, source = run_thresholds(workdir, budget)
  threshold_ExC = as_threshold_ExC(raw, model.num_exits, model.num_classes)
  macs = exit_macs(model, ds.image_shape)
  os.makedirs(out_dir, exist_ok=True)
  plain = jax.jit(plain_fn(model, variables, mean_C, std_C))
  plain(images[0])
  report = {"workdir": workdir, "images": len(images), "thresholds": source, "device": jax.devices()[0].device_kind,
            "exit_macs": list(macs.cumulative), "full_macs": macs.full,
            "plain_network_jax_latency_ms": _latency_ms(plain, images), "formats": {}}
  for fmt in formats:
    log(f"{fmt}: exporting ...")
    try:
      paths, runner = EXPORTERS[fmt](model, variables, mean_C, std_C, ds.image_shape, out_dir)
    except ImportError as e:
      report["formats"][fmt] = {"status": f"not available here ({e}); {MISSING[fmt]}"}
      log(f"{fmt}: {report['formats'][fmt]['status']}")
      continue
    except Exception as e:  # pylint: disable=broad-except  # a converter's failure is a result to report
      report["formats"][fmt] = {"status": f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      log(f"{fmt}: {report['formats'][fmt]['status']}")
      continue
    exits = verify(runner, reference_NxExC, images)
    policy = policy_latency(runner, images, threshold_ExC, macs.cumulative)
    report["formats"][fmt] = {"status": "ok", "files": paths, "exits": exits, "policy": policy}
    log(f"{fmt}: " + "; ".join(f"exit {r['exit']}: max |diff| {r['max_abs_diff']:.2e}, "
                               f"{r['latency_ms']:.3f} ms" for r in exits)
        + f"; calibrated: {policy['latency_ms']:.3f} ms, {policy['predicted_mean_macs'] / 1e6:.2f} M MACs")
  with open(os.path.join(out_dir, "export_report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out_dir, "export_report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report))
  return report


def markdown(report: dict) -> str:
  lines = [f"# Export of `{report['workdir']}`", "",
           f"Batch 1 on {report['device']}, {report['images']} test images; thresholds from {report['thresholds']}. "
           f"Plain network (no early exits) in JAX: {report['plain_network_jax_latency_ms']:.3f} ms, "
           f"{report['full_macs'] / 1e6:.2f} M MACs.", "",
           "| format | exit | max abs diff vs JAX | forced exit answered | latency (ms) |", "|---|---|---|---|---|"]
  for fmt, r in report["formats"].items():
    if r["status"] != "ok":
      lines.append(f"| {fmt} | | {r['status']} | | |")
      continue
    for e in r["exits"]:
      lines.append(f"| {fmt} | {e['exit']} | {e['max_abs_diff']:.2e} | {e['answered_at_forced_exit']} | "
                   f"{e['latency_ms']:.3f} |")
    p = r["policy"]
    shares = " / ".join(f"{100 * s:.0f}" for s in p["exit_share"])
    lines.append(f"| {fmt} | calibrated (exits {shares}%) | | | {p['latency_ms']:.3f} "
                 f"(predicted {p['predicted_mean_macs'] / 1e6:.2f} M MACs) |")
  return "\n".join(lines) + "\n"


def main() -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Export a trained eejax run for batch-1 deployment and verify it.")
  parser.add_argument("--workdir", required=True, help="a finished run (or a BTS-EE models/NAME workdir)")
  parser.add_argument("--out", required=True, help="folder for the exported files and export_report.md/.json")
  parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated: {', '.join(FORMATS)}")
  parser.add_argument("--budget", type=float, default=0.5, help="fitted max_prob thresholds for this MACs fraction")
  parser.add_argument("--images", type=int, default=200, help="test images for verification and timing")
  args = parser.parse_args()
  try:
    report = export_and_verify(args.workdir, args.out, tuple(f for f in args.formats.split(",") if f), args.budget,
                               args.images)
  except UserError as e:
    print(f"eejax.export: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(markdown(report))


if __name__ == "__main__":
  main()
