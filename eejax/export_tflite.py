"""The TFLite form of a batch-1 early-exit export (`eejax.export`): one model per stage, the decisions on the host.

Each stage (the blocks up to exit k and head k) is converted on its own through jax2tf; the cascade
(`eejax.cascade_runtime`, the standalone driver that ships beside the stages) runs them in turn and applies
the run's exit policy between them in numpy, passing the feature map on only while no exit has answered. A single graph with `lax.cond` converts to TFLite `IF` ops, but with
TensorFlow 2.21 its interpreter fails to prepare the convolutions inside them once an image passes exit 1
("filter->dims->size != 4"), hence the stages. Needs TensorFlow (the optional extra `eejax[tflite]`); never on a TPU runtime.

`export_tflite_int8` is the same cascade with post-training integer quantization: weights and activations in
int8 (TFLite's full-integer ops, float kept only where an op has no integer kernel), each stage's activation
ranges calibrated on the feature maps that the float model gives for a set of training images. The stages keep
float inputs and outputs, so the policy's test and the hand-over between stages are those of the float cascade.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from eejax import cascade_runtime, export_verify, inference, policies, workdirs


def available() -> str | None:
  """None where TensorFlow imports here, else why not."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return f"{e}"
  return None


def export_tflite(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob"):
  """The float32 cascade: (the stage files, cascade(x_1xHxWx3, t_ExC) -> (logits_1xC, exit index))."""
  return _export_cascade(model, variables, mean_C, std_C, image_shape, out_dir, policy, None)


def export_tflite_int8(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob",
                       calibration_NxHxWx3=None):
  """The int8 cascade, its activation ranges calibrated on `calibration_NxHxWx3` (uint8 training images)."""
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # a missing extra is reported as such
  if calibration_NxHxWx3 is None or len(calibration_NxHxWx3) == 0:
    raise ValueError("an int8 export needs calibration images (calibration_NxHxWx3)")
  return _export_cascade(model, variables, mean_C, std_C, image_shape, out_dir, policy,
                         np.asarray(calibration_NxHxWx3, np.uint8))


def _convert(fn, shape, dtype, calibration_inputs):
  """One stage's TFLite flatbuffer; int8 where `calibration_inputs` (the stage's own inputs) are given."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  tf_fn = tf.function(jax2tf.convert(fn), autograph=False)  # StableHLO inside; the converter lowers it
  concrete = tf_fn.get_concrete_function(tf.TensorSpec(shape, dtype))
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf_fn)
  if calibration_inputs is not None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x] for x in calibration_inputs)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def _export_cascade(model, variables, mean_C, std_C, image_shape, out_dir, policy, calibration_NxHxWx3):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  stages, paths = [], []
  shape, dtype = (1, *image_shape), tf.uint8
  inputs = None if calibration_NxHxWx3 is None else [x[None] for x in calibration_NxHxWx3]  # each 1xHxWx3
  suffix = "" if inputs is None else "_int8"
  for k, fn in enumerate(inference.stage_fns(model, variables, mean_C, std_C)):
    path = os.path.join(out_dir, f"stage_{k}{suffix}.tflite")
    workdirs.write_bytes(path, _convert(fn, shape, dtype, inputs))
    paths.append(path)
    stages.append(cascade_runtime.TFLiteStage(path))
    if inputs is not None:  # the next stage calibrates on what the float model hands it
      jitted = jax.jit(fn)
      inputs = [np.asarray(jitted(x)[0]) for x in inputs]
    shape = tuple(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.uint8 if k == 0 else jnp.float32))[0].shape)
    dtype = tf.float32

  cascade = cascade_runtime.Cascade(stages=stages, policy=policies.get(policy).name)  # the code that ships
  return paths, export_verify.batch_one(cascade, batched=False)  # batch-1 models: no batch form to time


def int8_share(path: str) -> float:
  """The share of a TFLite file's constant (weight) bytes held as int8: 0 for a float model."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  interpreter = tf.lite.Interpreter(model_path=path)
  int8 = total = 0
  for d in interpreter.get_tensor_details():
    try:
      nbytes = interpreter.get_tensor(d["index"]).nbytes  # constants only: activations are unallocated here
    except ValueError:
      continue
    total += nbytes
    int8 += nbytes if d["dtype"] == np.int8 else 0
  return int8 / max(total, 1)
