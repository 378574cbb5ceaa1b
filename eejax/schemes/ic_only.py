"""ic_only: SDN's IC-only training (Kaya et al. 2019), the internal classifiers trained on a frozen, trained network.

The backbone and its final classifier come from the run in config.ic_only.backbone: the same model.name and
width, with any exits of its own, of which only the last is kept. Neither they nor their BatchNorm statistics
change (`Scheme.fixed`), so the final exit is that run's, to the last digit. The loss is the sum of the other
exits' cross-entropies. The backbone runs in training mode, as in SDN's code (batch statistics in the forward
pass), but its running statistics stay the trained run's.
"""
import jax
import jax.numpy as jnp

from eejax import losses
from eejax.errors import UserError
from eejax.run import load_run
from eejax.schemes.base import Scheme, register
from eejax.writers import say


def loss(b):
  total, ce_I = losses.joint_loss(b.logits_ExBxC[:-1], b.labels_B, b.weights_E[:-1], b.label_smoothing)
  final_ce = losses.cross_entropy(jax.lax.stop_gradient(b.logits_ExBxC[-1:]), b.labels_B, b.label_smoothing)
  return total, {"ce_E": jnp.concatenate([ce_I, final_ce.mean(axis=1)])}


def fixed(name: str, num_exits: int) -> bool:
  """Everything but the internal classifiers (heads_0 .. heads_{E-2})."""
  return not name.startswith("heads_") or name == f"heads_{num_exits - 1}"


def copy_backbone(source, target, source_exits: int, target_exits: int, path: str) -> dict:
  """`target`'s variables with the backbone and the final classifier taken from `source` (another run's)."""
  rename = {f"heads_{target_exits - 1}": f"heads_{source_exits - 1}"}
  out = {}
  for collection, tree in target.items():
    theirs = source.get(collection, {})
    mine = {k: rename.get(k, k) for k in tree if fixed(k, target_exits)}
    missing = sorted(k for k, s in mine.items() if s not in theirs)
    extra = sorted(k for k in theirs if not k.startswith("heads_") and k not in mine)
    bad = [k for k, s in mine.items() if s in theirs
           and jax.tree.map(jnp.shape, theirs[s]) != jax.tree.map(jnp.shape, tree[k])]
    if missing or extra or bad:
      raise UserError(f"ic_only.backbone={path!r} holds another network ({collection}: "
                      f"{', '.join((missing + extra + bad)[:4])} differ); give the workdir of a run with the same "
                      f"model.name and model.width")
    out[collection] = {k: theirs[mine[k]] if k in mine else v for k, v in tree.items()}
  return out


def init(config, state, spec, mesh):
  path = config.ic_only.backbone
  if not path:
    raise UserError("scheme=ic_only needs --config.ic_only.backbone=WORKDIR, the workdir of a trained run of the "
                    "same model (e.g. the network alone: --config.model.exit_after=N, N its last block)")
  num_exits = sum(k.startswith("heads_") for k in state.params)
  if num_exits < 2:  # before the backbone run is read: it is not needed to say so
    raise UserError("scheme=ic_only trains the exits before the last, and this model has one exit; place some with "
                    "--config.model.exit_after, e.g. 1,2,3 for a ResNet-8")
  run = load_run(path, mesh)
  run.check_finished("backbone")
  run.spec.check_matches(spec.num_classes, spec.image_shape, "backbone", path)
  variables = copy_backbone(run.variables, {"params": state.params, "batch_stats": state.batch_stats},
                            run.model.num_exits, num_exits, path)
  say(f"backbone and final classifier: {run.config.model.name} from {path} (step {run.step}), frozen")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


SCHEME = register(Scheme("ic_only", loss=loss, has_section=True, fixed=fixed, init=init))
