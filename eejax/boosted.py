"""BTS-EE: boosted sequential training of lightweight branches on a frozen backbone.

Aperstein & Apartsin, arXiv 2509.08318 (2025). Branch b (a `conv1d` head after
block positions[b]) is trained only on the training images that branches
1..b-1 did not answer, then calibrated with the Class Precision Margin (CPM,
`eejax.cpm`) on validation; only then is branch b+1
trained. The non-boosted baseline trains the same branches on every image and
calibrates them with the same CPM.

Our choices (the paper's full text is not available to us):
* The backbone (stem, blocks, BatchNorm statistics, final classifier) comes
  from a finished eejax run and never changes; its final classifier is the last
  exit and the CPM reference.
* No augmentation for branch training, so each block's globally pooled
  features are computed once per split and cached. The 1D-conv head starts with
  that pool and has no BatchNorm, so training on the cache is training the
  branch, and a step costs a few small layers instead of a backbone pass.
* Within a stage every batch comes from the images still in play: each epoch
  is a fresh random order of them (a sort that puts the exited images last),
  cycled, so no compute goes to images the branch will never see.
* Adam with cosine decay to 0 over each stage and weight decay on kernels;
  the loss is cross-entropy, optionally mixed with KD from the backbone's
  softmax (`distill_weight`, at `distill_temperature`).

Shapes: N images, C classes, D feature channels, B batch, K candidate thresholds, E exits (the branches and
the final classifier), P epochs of a stage.
"""
import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eejax import cpm, evaluate, input_pipeline, losses, policies, state
from eejax.errors import UserError
from eejax.models import MultiExitNet
from eejax.models.heads import Conv1dHead
from eejax.writers import say


@dataclasses.dataclass(frozen=True)
class Settings:
  """How each branch trains and is calibrated (from config.bts)."""
  epochs: float = 20.0  # per stage, over the images in play
  batch_size: int = 256
  learning_rate: float = 1e-3
  weight_decay: float = 5e-4
  distill_weight: float = 0.0
  distill_temperature: float = 4.0
  steps_per_call: int = 50
  num_thresholds: int = 101  # absolute CPM's candidates: linspace(0, 1, num_thresholds)
  cpm: str = "paper"  # the CPM rule, eejax.cpm.RULES
  min_support: int = 30  # paper CPM: validation images of the class that must pass a threshold
  seed: int = 0

  @classmethod
  def from_config(cls, bts, seed: int = 0) -> "Settings":
    return cls(**{f.name: bts[f.name] for f in dataclasses.fields(cls) if f.name != "seed"}, seed=seed)

  @property
  def candidates_K(self) -> np.ndarray:
    return np.linspace(0.0, 1.0, self.num_thresholds, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Features:
  """One split through the frozen backbone: what every branch and the reference see."""
  pooled: tuple  # per block (1-based block b at index b-1): pooled_NxD float32
  final_logits_NxC: np.ndarray
  labels_N: np.ndarray


def extract(model: MultiExitNet, variables, images_NxHxWx3, labels_N, mean_C, std_C, batch_size: int) -> Features:
  """Pooled features after every block and the final logits, in fixed-size batches (the last one padded)."""
  @jax.jit
  def run(variables, x_BxHxWx3):
    return model.apply(variables, input_pipeline.normalize(x_BxHxWx3, mean_C, std_C),
                       method=MultiExitNet.pooled_features)

  pooled, logits = evaluate.in_batches(lambda x: run(variables, x), images_NxHxWx3, batch_size,
                                       what="extracting the backbone's features")
  return Features(tuple(pooled), logits, np.asarray(labels_N))


def branch_model(backbone: MultiExitNet, positions, head_width: int) -> MultiExitNet:
  """The backbone with a conv1d branch after each block in `positions` (1-based) and its final classifier."""
  return MultiExitNet(backbone.arch, backbone.num_classes, width=backbone.width, exit_after=tuple(positions),
                      head="conv1d", head_width=head_width, dtype=backbone.dtype)


def stitch(backbone_variables, branch_params) -> dict:
  """Variables of `branch_model`: the backbone's stem, blocks, statistics and final head, plus the branches."""
  params, stats = backbone_variables["params"], backbone_variables.get("batch_stats", {})
  keep = lambda tree: {k: v for k, v in tree.items() if k.startswith(("stem_", "blocks_"))}
  final = max((k for k in params if k.startswith("heads_")), key=lambda k: int(k.split("_")[1]))
  new = keep(params)
  for b, p in enumerate(branch_params):
    new[f"heads_{b}"] = p
  new[f"heads_{len(branch_params)}"] = params[final]
  return {"params": new, "batch_stats": keep(stats)}


def check_positions(positions, num_blocks: int) -> tuple[int, ...]:
  positions = tuple(int(p) for p in positions)
  if not positions or list(positions) != sorted(set(positions)) or positions[0] < 1 or positions[-1] >= num_blocks:
    raise UserError(f"bts.positions={positions} must be increasing block numbers in 1..{num_blocks - 1} "
                    f"(the backbone has {num_blocks} blocks; the last one feeds the final classifier)")
  return positions


def branch_loss(logits_BxC, labels_B, teacher_logits_BxC, distill_weight: float, temperature: float):
  """Mean over the batch of (1 - w) CE(labels) + w t^2 KL(teacher_t || branch_t)."""
  ce_B = losses.cross_entropy(logits_BxC[None], labels_B)[0]
  kd_B = losses.kd(logits_BxC[None], teacher_logits_BxC[None], temperature)[0]
  return jnp.mean((1.0 - distill_weight) * ce_B + distill_weight * kd_B)


def steps_per_epoch(count, batch_size: int):
  return jnp.maximum(count // batch_size, 1)


def epoch_order(key, epoch, in_play_N):
  """order_N of one epoch: a random order of the images in play, every image out of play after them."""
  u_N = jax.random.uniform(jax.random.fold_in(key, epoch), in_play_N.shape)
  return jnp.argsort(jnp.where(in_play_N, u_N, 2.0))


def batch_at(order_N, step, count, batch_size: int):
  """idx_B of step's batch within its epoch's order: only the first `count` entries (those in play), cycled."""
  pos = step % steps_per_epoch(count, batch_size)
  return order_N[(pos * batch_size + jnp.arange(batch_size)) % jnp.maximum(count, 1)]


def batch_from(key, step, in_play_N, count, batch_size: int):
  """idx_B of step's batch: each epoch (max(count // batch_size, 1) steps) a random order of the images in play.

  Training computes each epoch's order once (`train_branch`); this is the same batch from scratch.
  """
  epoch = step // steps_per_epoch(count, batch_size)
  return batch_at(epoch_order(key, epoch, in_play_N), step, count, batch_size)


_epoch_orders = jax.jit(jax.vmap(epoch_order, in_axes=(None, 0, None)))


def cosine_to_zero(learning_rate: float, total):
  """optax schedule: learning_rate * (1 + cos(pi min(count / total, 1))) / 2; `total` may be traced (one compile
  serves every stage length)."""
  return lambda count: learning_rate * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count / total, 1.0)))


def stage_optimizer(settings: Settings, total) -> optax.GradientTransformation:
  """Adam with weight decay on kernels, cosine to 0 over the stage's `total` steps."""
  return optax.chain(optax.add_decayed_weights(settings.weight_decay, mask=state.kernel_mask),
                     optax.scale_by_adam(),
                     optax.scale_by_learning_rate(cosine_to_zero(settings.learning_rate, total)))


@functools.lru_cache(maxsize=None)
def _stage_chunk(head: Conv1dHead, settings: Settings):
  """jit: (carry, stage) -> (carry, {"loss": S, "idx_B": SxB}); S = settings.steps_per_call steps under lax.scan."""
  def step(carry, stage):
    params, opt_state, i = carry
    dropout_key = stage["dropout_key"]
    epoch = i // steps_per_epoch(stage["count"], settings.batch_size)
    idx_B = batch_at(stage["orders_PxN"][epoch], i, stage["count"], settings.batch_size)
    x_Bx1x1xD = stage["features_NxD"][idx_B][:, None, None, :]

    def loss_of(p):
      logits_BxC = head.apply({"params": p}, x_Bx1x1xD, train=True,
                              rngs={"dropout": jax.random.fold_in(dropout_key, i)})
      return branch_loss(logits_BxC, stage["labels_N"][idx_B], stage["teacher_NxC"][idx_B],
                         settings.distill_weight, settings.distill_temperature)

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = stage_optimizer(settings, stage["total"]).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, i + 1), {"loss": loss, "idx_B": idx_B}

  return state.scan_chunk(step, settings.steps_per_call, unroll=1)


def train_branch(head: Conv1dHead, features_NxD, labels_N, teacher_NxC, in_play_N, settings: Settings, key,
                 record: bool = False):
  """(params, info) of one branch trained on the images in play; info["seen"] = indices used if `record`.

  Steps: round(epochs * count / batch_size), at least 1, rounded up to whole chunks.
  """
  in_play_N = np.asarray(in_play_N, bool)
  count = int(in_play_N.sum())
  init_key, data_key, dropout_key = jax.random.split(key, 3)
  params = _init_fn(head, features_NxD.shape[1])(init_key)
  info = {"train_images": count, "steps": 0}
  if count == 0:
    return params, {**info, "seen": np.zeros(0, np.int64)} if record else info
  chunk = _stage_chunk(head, settings)
  spc = settings.steps_per_call
  steps = -(-max(1, round(settings.epochs * count / settings.batch_size)) // spc) * spc
  num_epochs = -(-steps // int(steps_per_epoch(count, settings.batch_size)))
  # Each epoch's order once per stage (num_epochs x N int32), not a sort of N keys at every step.
  orders_PxN = _epoch_orders(data_key, jnp.arange(num_epochs), jnp.asarray(in_play_N))
  stage = {"features_NxD": features_NxD, "labels_N": labels_N, "teacher_NxC": teacher_NxC,
           "orders_PxN": orders_PxN, "count": jnp.int32(count), "total": jnp.float32(steps),
           "dropout_key": dropout_key}
  carry = (params, stage_optimizer(settings, stage["total"]).init(params), jnp.zeros((), jnp.int32))
  seen = []
  for _ in range(steps // spc):
    carry, metrics = chunk(carry, stage)
    if record:
      seen.append(np.unique(np.asarray(metrics["idx_B"])))
  info.update(steps=steps, final_loss=float(metrics["loss"][-1]))
  if record:
    info["seen"] = np.unique(np.concatenate(seen))
  return carry[0], info


@functools.lru_cache(maxsize=None)
def _init_fn(head: Conv1dHead, num_features: int):
  return jax.jit(lambda key: head.init(key, jnp.zeros((1, 1, 1, num_features)))["params"])


@functools.lru_cache(maxsize=None)
def _apply_fn(head: Conv1dHead):
  return jax.jit(lambda p, f_NxD: head.apply({"params": p}, f_NxD[:, None, None, :]))


@functools.lru_cache(maxsize=None)
def _max_prob_fn(head: Conv1dHead):
  """(conf_N, pred_N) of one branch, in one program (op by op, each small step would compile on its own)."""
  return jax.jit(lambda p, f_NxD: policies.max_prob(_apply_fn(head)(p, f_NxD)))


@jax.jit
def _cpm_decisions(logits_ExNxC, threshold_ExC, labels_N, cost_E):
  """(pred_ExN, exit_N, accuracy, macs) under per-exit, per-class thresholds."""
  conf_ExN, pred_ExN = policies.max_prob(logits_ExNxC)
  exit_1xN = policies.first_exit(conf_ExN, pred_ExN, threshold_ExC[None])
  accuracy_K, macs_K, _ = policies.outcome(exit_1xN, pred_ExN, labels_N, cost_E)
  return pred_ExN, exit_1xN[0], accuracy_K[0], macs_K[0]


def fit_branches(train: Features, val: Features, positions, head_width: int, margin: float, boosted: bool,
                 settings: Settings, device_train: dict, memo: dict | None = None, record: bool = False,
                 log=say):
  """(branch_params, threshold_ExC, stages) for one configuration at one CPM margin.

  Branch by branch: train on the images in play (boosted: those no earlier
  branch answered; else all), calibrate CPM on the validation images that
  reach it, then drop from play the training images it answers. `memo` shares
  branches trained on the same images across margins and modes;
  `device_train` holds the training arrays on the device.
  """
  num_classes = train.final_logits_NxC.shape[1]
  head = Conv1dHead(num_classes, width=head_width)
  in_play_N = np.ones(len(train.labels_N), bool)
  reach_N = np.ones(len(val.labels_N), bool)
  val_ref_pred_N = np.argmax(val.final_logits_NxC, -1)
  params_list, threshold_rows, stages = [], [], []
  for b, pos in enumerate(positions):
    trained_on = in_play_N if boosted else np.ones_like(in_play_N)
    memo_key = (pos, head_width, hashlib.sha1(np.packbits(trained_on).tobytes()).hexdigest())
    if memo is not None and memo_key in memo and not record:
      params, info = memo[memo_key]
    else:
      params, info = train_branch(head, device_train["pooled"][pos - 1], device_train["labels_N"],
                                  device_train["teacher_NxC"], trained_on, settings,
                                  jax.random.fold_in(jax.random.key(settings.seed), pos), record=record)
      if memo is not None:
        memo[memo_key] = (params, info)
    scored = _max_prob_fn(head)
    conf_N, pred_N = scored(params, val.pooled[pos - 1])
    threshold_C, val_exits_N = cpm.cpm_branch(conf_N, pred_N, reach_N, val.labels_N, val_ref_pred_N,
                                              settings.candidates_K, margin, num_classes, settings.cpm,
                                              settings.min_support)
    val_exits_N = np.asarray(val_exits_N)
    train_exits_N = np.asarray(cpm.cpm_exits(*scored(params, device_train["pooled"][pos - 1]), threshold_C)) & in_play_N
    stage = {"branch": b + 1, "after_block": pos, **{k: v for k, v in info.items() if k != "seen"},
             "val_reaching": int(reach_N.sum()), "val_exits": int(val_exits_N.sum()),
             "train_exits": int(train_exits_N.sum()),
             "classes_that_exit": int(np.isfinite(np.asarray(threshold_C)).sum())}
    if record:
      stage["seen"] = info["seen"]
    log(f"  {'boosted' if boosted else 'non-boosted'} margin {margin:g}, branch {b + 1} after block {pos}: "
        f"trained on {info['train_images']} images ({info['steps']} steps); validation: "
        f"{stage['val_exits']}/{stage['val_reaching']} exit, {stage['classes_that_exit']} classes can exit")
    params_list.append(params)
    threshold_rows.append(np.asarray(threshold_C))
    stages.append(stage)
    reach_N &= ~val_exits_N
    in_play_N &= ~train_exits_N
  never_1xC = np.full((1, num_classes), np.inf, np.float32)  # the final classifier: always answers
  return params_list, np.concatenate([np.stack(threshold_rows), never_1xC]), stages


def evaluate_split(params_list, positions, head_width: int, split: Features, threshold_ExC, cost_E) -> dict:
  """Accuracy, mean MACs and exit shares of the branches under CPM thresholds on one split."""
  head = Conv1dHead(split.final_logits_NxC.shape[1], width=head_width)
  apply = _apply_fn(head)
  logits_ExNxC = jnp.stack([apply(p, split.pooled[pos - 1]) for p, pos in zip(params_list, positions)]
                           + [jnp.asarray(split.final_logits_NxC)])
  pred_ExN, exit_N, accuracy, macs = jax.device_get(_cpm_decisions(
      logits_ExNxC, np.asarray(threshold_ExC, np.float32), split.labels_N, np.asarray(cost_E, np.float32)))
  correct_ExN = pred_ExN == split.labels_N[None]
  shares = np.bincount(exit_N, minlength=len(cost_E)) / len(exit_N)
  return {"accuracy": float(accuracy), "macs": float(macs), "exit_share": shares.tolist(),
          "exit_accuracy": correct_ExN.mean(-1).tolist(),
          "accuracy_where_taken": [float(correct_ExN[e][exit_N == e].mean()) if (exit_N == e).any() else None
                                   for e in range(len(cost_E))]}


def device_arrays(train: Features) -> dict:
  return {"pooled": tuple(jnp.asarray(p) for p in train.pooled), "labels_N": jnp.asarray(train.labels_N),
          "teacher_NxC": jnp.asarray(train.final_logits_NxC)}
