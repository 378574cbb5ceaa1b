"""The TFLite form of a batch-1 early-exit export (`eejax.export`): one model per stage, the decisions on the host.

Each stage (the blocks up to exit k and head k) is converted on its own through jax2tf; the cascade runs
them in turn and applies the run's exit policy between them, passing the feature map on to the next stage
only while no exit has answered. A single-graph conversion of `lax.cond` is known to give wrong outputs,
hence the stages. Needs TensorFlow (the optional extra `eejax[tflite]`); never on a TPU runtime.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from eejax import inference, policies


def export_tflite(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob"):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  interpreters, paths = [], []
  shape = (1, *image_shape)
  dtype = tf.uint8
  for k, fn in enumerate(inference.stage_fns(model, variables, mean_C, std_C)):
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

  policy = policies.get(policy)

  def cascade(x, t_ExC):
    h, run_1, prev_1 = np.asarray(x), np.zeros(1, np.int32), np.full(1, -1)
    for k, interpreter in enumerate(interpreters):
      h, logits_1xC = run_stage(interpreter, h)
      if k == len(interpreters) - 1:
        return logits_1xC, np.int32(k)
      score_1, pred_1, run_1 = policy.exit_score(logits_1xC, run_1, prev_1)  # the policy's test, on the host
      if policy.passes(float(score_1[0]), t_ExC[k, int(pred_1[0])]):
        return logits_1xC, np.int32(k)
      prev_1 = pred_1
    raise AssertionError("unreachable")
  return paths, cascade
