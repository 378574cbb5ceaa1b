"""SDN (Kaya et al. 2019): its internal classifier against numpy, SDN training's weights by hand, IC-only runs."""
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax import losses, run, state, train
from eejax.errors import UserError
from eejax.models import MultiExitNet
from eejax.models.heads import SdnHead
from eejax.schemes import sdn
from conftest import REPO, TINY_RUN, make_tree
from test_train import smoke_config


def numpy_sdn_head(h_BxHxWxC, alpha, kernel_DxK, bias_K):
  """SDN's InternalClassifier, written again with numpy loops (NHWC; flattened as the head flattens)."""
  b, s, _, c = h_BxHxWxC.shape
  if s >= 4:
    k = s // 4
    r = s // k
    pooled = np.zeros((b, r, r, c))
    for i in range(r):
      for j in range(r):
        window = h_BxHxWxC[:, i * k:(i + 1) * k, j * k:(j + 1) * k]
        pooled[:, i, j] = alpha * window.max(axis=(1, 2)) + (1 - alpha) * window.mean(axis=(1, 2))
    h_BxHxWxC = pooled
  return h_BxHxWxC.reshape(b, -1) @ kernel_DxK + bias_K


@pytest.mark.parametrize("side,pooled", [(32, 4), (16, 4), (8, 4), (10, 5), (6, 6), (4, 4), (2, 2)])
def test_sdn_head_equals_numpy_and_counts_its_dense_layer(side, pooled):
  h = np.asarray(jax.random.normal(jax.random.key(0), (3, side, side, 5)))
  head = SdnHead(num_classes=7)
  variables = head.init(jax.random.key(1), h)
  params = variables["params"]
  assert ("alpha" in params) == (side >= 4)
  alpha = float(params["alpha"][0]) if side >= 4 else 0.0
  assert 0 <= alpha < 1
  kernel = np.asarray(params["Dense_0"]["kernel"])
  assert kernel.shape == (pooled * pooled * 5, 7)
  ours = head.apply(variables, jnp.asarray(h))
  np.testing.assert_allclose(ours, numpy_sdn_head(h, alpha, kernel, np.asarray(params["Dense_0"]["bias"])),
                             rtol=1e-5, atol=1e-5)
  assert SdnHead.macs((side, side, 5), 7) == kernel.size


def test_alpha_learns_from_the_max_and_average_difference():
  h = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  head = SdnHead(num_classes=4)
  variables = head.init(jax.random.key(1), h)
  grad = jax.grad(lambda p: head.apply({"params": p}, h).sum())(variables["params"])
  assert float(jnp.abs(grad["alpha"][0])) > 0


def test_sdn_weights_by_hand():
  # SDN's six: C_i = 0.15 i; epoch 1 of 10 gives 0.01 + 0.015 i, epoch 10 reaches C_i, the final exit weighs 1.
  c_I = sdn.max_weights(smoke_config("x", "y").sdn, 6)
  np.testing.assert_allclose(c_I, [0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
  np.testing.assert_allclose(sdn.weights_at(1, 10, c_I, 0.01), [0.025, 0.04, 0.055, 0.07, 0.085, 0.1, 1], rtol=1e-6)
  np.testing.assert_allclose(sdn.weights_at(5, 10, c_I, 0.01), [0.085, 0.16, 0.235, 0.31, 0.385, 0.46, 1],
                             rtol=1e-6)
  np.testing.assert_allclose(sdn.weights_at(10, 10, c_I, 0.01), [*c_I, 1], rtol=1e-6)
  section = smoke_config("x", "y").sdn
  section.max_weights = (0.5, 0.2)
  with pytest.raises(UserError, match="sdn.max_weights has 2 values; the model has 3"):
    sdn.max_weights(section, 3)


def test_sdn_loss_uses_the_epoch_of_the_step():
  # 5 steps an epoch, 4 epochs, two internal classifiers (C = 0.45, 0.9): step 7 is epoch 2.
  config = smoke_config("x", "y", **{"scheme": "sdn", "train.epochs": 4})
  logits = jax.random.normal(jax.random.key(0), (3, 6, 4))
  labels = jnp.asarray([0, 1, 2, 3, 0, 1])
  loss_fn = train.make_loss_fn(config, 3, steps_per_epoch=5)
  ce_E = np.asarray(losses.cross_entropy(logits, labels).mean(axis=1))
  for step, epoch in ((0, 1), (7, 2), (19, 4)):
    total, metrics = loss_fn(logits, labels, None, {}, jnp.asarray(step))
    w = [min(0.45, 0.01 + epoch * 0.45 / 4), min(0.9, 0.01 + epoch * 0.9 / 4), 1.0]
    np.testing.assert_allclose(metrics["weight_E"], w, rtol=1e-6)
    np.testing.assert_allclose(total, np.dot(w, ce_E), rtol=1e-5)


def test_adam_first_step_by_hand():
  # Adam's first step is -lr * g / (|g| + eps) per entry; weight decay adds wd * p to a kernel's gradient first,
  # which turns both kernel entries' signs here (and would turn the bias's, which it must not decay).
  config = smoke_config("x", "y", **{"train.optimizer": "adam", "train.weight_decay": 0.5})
  tx = state.make_optimizer(config.train, lambda step: 0.1)
  params = {"kernel": jnp.asarray([[1.0, -2.0]]), "bias": jnp.asarray([3.0])}
  grads = {"kernel": jnp.asarray([[-0.2, 0.5]]), "bias": jnp.asarray([-0.4])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g_kernel = np.asarray([[-0.2 + 0.5, 0.5 - 1.0]])
  np.testing.assert_allclose(updates["kernel"], -0.1 * g_kernel / np.abs(g_kernel), rtol=1e-4)
  np.testing.assert_allclose(updates["bias"], [0.1], rtol=1e-4)


def _convolutions(fn, *args) -> int:
  """Convolutions in fn's program, nested ones included (forward, and each backward one)."""
  return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def test_a_fixed_backbone_has_no_backward_pass_and_does_not_change():
  config = smoke_config("x", "y", **{"scheme": "ic_only", "model.exit_after": (1, 2, 3)})
  model = MultiExitNet("resnet8", 3, width=0.25, exit_after=(1, 2, 3), head="sdn")
  tx = state.make_optimizer(config.train, lambda step: 0.1)
  s = state.init_state(model, tx, jax.random.key(0), (16, 16, 3))
  fixed = frozenset(k for k in s.params if not k.startswith("heads_") or k == "heads_2")
  data_dev = {"images": jax.random.randint(jax.random.key(1), (8, 16, 16, 3), 0, 255).astype(jnp.uint8),
              "labels": jnp.arange(8) % 3, "mean": jnp.zeros(3), "std": jnp.ones(3)}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  step = functools.partial(train.train_step, model=model, tx=tx, loss_fn=train.make_loss_fn(config, 3),
                           batch_size=4, crop_pad=0, flip=False,
                           batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  keys = (jax.random.key(2), jax.random.key(3))
  forward = _convolutions(lambda v, x: model.apply(v, x), {"params": s.params, "batch_stats": s.batch_stats},
                          jnp.zeros((4, 16, 16, 3)))
  with_fixed = _convolutions(functools.partial(step, fixed=fixed), s, data_dev, keys, None)
  whole = _convolutions(step, s, data_dev, keys, None)
  assert with_fixed == forward < whole  # the gradient reaches no convolution: only the heads' dense layers
  after, metrics = jax.jit(functools.partial(step, fixed=fixed))(s, data_dev, keys, None)
  for name in s.params:
    same = all(jax.tree.leaves(jax.tree.map(np.array_equal, s.params[name], after.params[name])))
    assert same == (name in fixed), name
  for name in s.batch_stats:  # the backbone's running statistics are kept
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, s.batch_stats[name], after.batch_stats[name]))), name
  assert np.isfinite(float(metrics["loss"]))


def test_ic_only_run_keeps_the_trained_network_to_the_last_digit(tiny_tree, tmp_path, capsys):
  cache = str(tmp_path / "c")
  cnn = str(tmp_path / "cnn")
  cnn_report = train.train_and_evaluate(smoke_config(tiny_tree, cache, **{"model.exit_after": (3,)}), cnn)
  config = smoke_config(tiny_tree, cache, **{"scheme": "ic_only", "ic_only.backbone": cnn, "model.head": "sdn",
                                             "model.exit_after": (1, 2, 3), "train.optimizer": "adam",
                                             "train.learning_rate": 0.01})
  ics = str(tmp_path / "ics")
  report = train.train_and_evaluate(config, ics)
  assert report["method"] == "ic_only"
  # The progress line carries every exit's validation accuracy (the frozen last one alone would never move).
  printed = capsys.readouterr()
  assert re.search(r"val \d+\.\d\d/\d+\.\d\d/\d+\.\d\d%$", printed.out + printed.err, re.MULTILINE)
  assert report["exits"][-1]["accuracy"] == cnn_report["exits"][-1]["accuracy"]
  theirs, ours = run.load_run(cnn).variables, run.load_run(ics).variables
  for collection in ("params", "batch_stats"):  # the backbone, and the final classifier (the CNN's only head)
    for name, tree in ours[collection].items():
      if name not in ("heads_0", "heads_1"):
        source = theirs[collection]["heads_0" if name == "heads_2" else name]
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, source, tree))), name
  with pytest.raises(UserError, match="holds another network"):
    config.model.width = 0.5
    train.train_and_evaluate(config, str(tmp_path / "wider"))
  config.model.width, config.model.exit_after = 0.25, (3,)
  with pytest.raises(UserError, match="this model has one exit"):
    train.train_and_evaluate(config, str(tmp_path / "alone"))
  config.ic_only.backbone = ""
  with pytest.raises(UserError, match="needs --config.ic_only.backbone"):
    train.train_and_evaluate(config, str(tmp_path / "none"))


def test_the_sdn_launcher_runs_all_four_and_tables_them(tmp_path):
  tree = str(tmp_path / "tree")
  make_tree(tree, per_class=(16, 8), size=16)
  root = str(tmp_path / "sdn")
  done = subprocess.run([sys.executable, "launch/sdn.py", "--scale=cpu", f"--data=folder:{tree}", f"--root={root}",
                         "--", *TINY_RUN], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  table = json.load(open(os.path.join(root, "comparison.json")))
  assert [r["name"] for r in table["rows"]] == ["cnn", "ic_only", "sdn", "joint"]
  cnn, ic_only = table["rows"][:2]
  assert len(cnn["exit_accuracy"]) == 1 and len(ic_only["exit_accuracy"]) == 3
  assert ic_only["exit_accuracy"][-1] == cnn["exit_accuracy"][-1]  # the same frozen network
  schemes = {n: json.load(open(os.path.join(root, n, "config.json")))["scheme"] for n in ("ic_only", "sdn", "joint")}
  assert schemes == {"ic_only": "ic_only", "sdn": "sdn", "joint": "joint"}
  assert "| cnn | n/a | n/a |" in open(os.path.join(root, "comparison.md")).read()
  # The table's command runs again as written: its config overrides after `--` (once dropped, so that the line
  # failed on the first override as an unknown flag); finished runs are kept, so this only tables them again.
  again = subprocess.run(table["command"].replace("python", sys.executable, 1).split(), cwd=REPO,
                         capture_output=True, text=True, timeout=900, check=False)
  assert again.returncode == 0 and " -- " in table["command"], table["command"] + again.stderr[-2000:]
  assert json.load(open(os.path.join(root, "comparison.json")))["rows"] == table["rows"]
  # The same data by a relative path, the runs' configs holding it so (as launchers wrote them before they made it
  # absolute): the same finished runs, none trained again.
  for name in ("cnn", "ic_only", "sdn", "joint"):
    path = os.path.join(root, name, "config.json")
    config = json.load(open(path))
    config["data"]["source"] = f"folder:{os.path.relpath(tree, REPO)}"
    json.dump(config, open(path, "w"))
  relative = f"--data=folder:{os.path.relpath(tree, REPO)}"
  again = subprocess.run([sys.executable, "launch/sdn.py", "--scale=cpu", relative, f"--root={root}", "--", *TINY_RUN],
                         cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert again.returncode == 0 and again.stdout.count("done already") == 4, again.stdout[-3000:]
