"""The ONNX forms of a batch-1 early-exit export (`eejax.export`), each returning (files, runner).

  onnx         one graph, the decisions inside as ONNX `If` (from `lax.cond`).
  onnx_static  one graph without control flow that returns every exit's logits for a batch of any size;
               the decision is the caller's (here: the policy on the host). For runtimes that reject
               `If` (TensorRT, several mobile runtimes).
  onnx_stages  one graph per stage (the blocks up to exit k and head k, any batch size) and a small driver
               that passes the features of the images still in play to the next stage and applies the
               thresholds between stages, as the TFLite cascade does.

A runner maps (x_1xHxWx3 uint8, threshold_ExC) to (logits_1xC of the exit that answered, its index);
the two new forms also have `runner.batch(x_BxHxWx3, threshold_ExC) -> (logits_BxC, exit_B)`.
Everything needs the optional extra `eejax[export]` (jax2onnx, onnxruntime).
"""
import functools
import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np

from eejax import cascade_runtime, export_verify, inference, input_pipeline, policies, workdirs


@functools.lru_cache(maxsize=None)
def available() -> str | None:
  """None where ONNX export works here, else why not (a missing extra, or a jax2onnx that this jax breaks)."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
    from jax.extend.core import jaxpr_as_fun  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return f"{e}"
  _name_closed_jaxpr()
  try:
    spec = jax.ShapeDtypeStruct((1,), jnp.float32)
    probe = lambda x: jax.lax.cond(x[0] > 0, lambda: jax.jit(jax.nn.relu)(x), lambda: jax.nn.softmax(x))
    closed = jax.make_jaxpr(probe)(spec)
    jax2onnx.to_onnx(lambda x: jaxpr_as_fun(closed)(x)[0], [spec], return_mode="proto")  # what the exports do
  except Exception as e:  # pylint: disable=broad-except  # e.g. jax2onnx 0.17.1 on jax 0.12: ClosedJaxpr is gone
    return f"jax2onnx {importlib.metadata.version('jax2onnx')} does not run on jax {jax.__version__} " \
           f"({type(e).__name__}: {str(e)[:120]})"
  return None


def _name_closed_jaxpr() -> None:
  """jax2onnx (0.17.1, the newest) reads `jax._src.core.ClosedJaxpr`, a name jax 0.12 no longer has there since it
  merged ClosedJaxpr into Jaxpr; the public `jax.extend.core.ClosedJaxpr` still names the class. Where the private
  name is missing it is set to the public one. Every export is then verified against JAX all the same."""
  import jax._src.core as jax_core  # pylint: disable=g-import-not-at-top
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  if not hasattr(jax_core, "ClosedJaxpr") and hasattr(core, "ClosedJaxpr"):
    jax_core.ClosedJaxpr = core.ClosedJaxpr


def _convert(fn, specs, path: str) -> None:
  """fn to an ONNX file through a closed jaxpr, so jax2onnx converts JAX primitives only: its Flax-level
  BatchNorm and avg_pool plugins write graphs onnxruntime rejects (jax2onnx 0.17.1, measured)."""
  reason = available()
  if reason is not None:
    raise ImportError(reason)  # reported as "not available here" by eejax.export
  from jax.extend.core import jaxpr_as_fun  # pylint: disable=g-import-not-at-top
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  closed = jax.make_jaxpr(fn)(*specs)
  with workdirs.replacing(path) as tmp:
    to_onnx(lambda *args: tuple(jaxpr_as_fun(closed)(*args)), specs, return_mode="file", output_path=tmp)


def _convert_any_batch(fn, shape, dtype, path: str) -> None:
  """fn(x_Bx...) to ONNX with a symbolic batch B (one symbol for the jaxpr and the ONNX input)."""
  _convert(fn, [jax.ShapeDtypeStruct((jax.export.symbolic_shape("B")[0], *shape), dtype)], path)


def export_onnx(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob"):
  specs = [jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8),
           jax.ShapeDtypeStruct((model.num_exits, model.num_classes), jnp.float32)]
  variables = jax.device_put(variables, jax.devices()[0])  # one device: a mesh sharding traces to `reshard`
  path = os.path.join(out_dir, "model.onnx")
  _convert(inference.early_exit_fn(model, variables, mean_C, std_C, policy), specs, path)
  session = cascade_runtime.onnx_session(path)
  names = [i.name for i in session.get_inputs()]
  return [path], lambda x, t: tuple(session.run(None, {names[0]: np.asarray(x), names[1]: np.asarray(t)}))


@functools.partial(jax.jit, static_argnums=2)
def _first_exit_B(logits_ExBxC, threshold_ExC, policy):
  score_ExB, pred_ExB = policy.scores(logits_ExBxC)
  return policies.first_exit(score_ExB, pred_ExB, threshold_ExC[None], policy)[0]


def decide(logits_ExBxC, threshold_ExC, policy):
  """(logits_BxC of the answering exit, exit_B): the policy applied to every exit's logits (one jitted call)."""
  exit_B = np.asarray(_first_exit_B(logits_ExBxC, np.asarray(threshold_ExC, np.float32), policies.get(policy)))
  return np.asarray(logits_ExBxC)[exit_B, np.arange(exit_B.size)], exit_B


def export_onnx_static(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob"):
  policy = policies.get(policy)
  variables = jax.device_get(variables)
  all_exits = lambda x: model.apply(variables, input_pipeline.normalize(x, mean_C, std_C))[0]
  path = os.path.join(out_dir, "model_static.onnx")
  _convert_any_batch(all_exits, tuple(image_shape), jnp.uint8, path)
  session = cascade_runtime.onnx_session(path)
  name = session.get_inputs()[0].name

  def batch(x_BxHxWx3, threshold_ExC):
    logits_ExBxC = np.stack(session.run(None, {name: np.asarray(x_BxHxWx3)}))  # one output per exit, or one stack
    return decide(logits_ExBxC.reshape(-1, *logits_ExBxC.shape[-2:]), threshold_ExC, policy)
  return [path], export_verify.batch_one(batch)


def export_onnx_stages(model, variables, mean_C, std_C, image_shape, out_dir: str, policy="max_prob"):
  policy = policies.get(policy)
  variables = jax.device_get(variables)
  stages, paths = [], []
  spec = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
  for k, fn in enumerate(inference.stage_fns(model, variables, mean_C, std_C)):
    path = os.path.join(out_dir, f"stage_{k}.onnx")
    _convert_any_batch(fn, spec.shape[1:], spec.dtype, path)
    paths.append(path)
    stages.append(cascade_runtime.OnnxStage(path))
    h = jax.eval_shape(fn, spec)[0]
    spec = jax.ShapeDtypeStruct(h.shape, h.dtype)
  cascade = cascade_runtime.Cascade(stages=stages, policy=policy.name)  # the driver that ships, in numpy
  return paths, export_verify.batch_one(cascade)
