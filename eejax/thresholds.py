"""The one threshold type, from fitting to export: threshold_ExC.

A fitted setting is a float32 array of shape (E exits, C classes) in its
policy's units: exit e answers an image it predicts as class c when
`policy.passes(score, threshold_ExC[e, c])`. A per-exit setting repeats its
value over the classes. `policy.never` (+inf where higher scores pass, -inf
for entropy) means "never answers there"; the last row is stored as never and
not read: the last exit always answers.

On disk a run keeps its settings in thresholds.json, one entry each:
{"policy": NAME, "threshold_ExC": [[...], ...], ...what it was fitted for};
in JSON a never value is null. `load` also reads runs written before this
file existed (their report.json, or a BTS-EE model's per-class table).
"""
import json
import os

import numpy as np

from eejax import cascade_runtime, policies, workdirs
from eejax.errors import UserError

FILE = "thresholds.json"


class Fitted(np.ndarray):
  """A threshold_ExC that knows its policy: what `eejax.fit_thresholds` and `certify_thresholds` return, so that
  `predict` and `export_run` run it with that policy and refuse another (its numbers are in its policy's units)."""

  def __array_finalize__(self, obj):
    self.policy = getattr(obj, "policy", None)

  def __reduce__(self):  # a pickled copy (another process, a cache) keeps its policy too; np.save keeps numbers only
    constructor, args, state = super().__reduce__()
    return constructor, args, (state, self.policy)

  def __setstate__(self, state):
    array_state, self.policy = state
    super().__setstate__(array_state)


def fitted(threshold_ExC, policy) -> Fitted:
  """threshold_ExC as float32, marked as fitted for `policy`."""
  t = np.array(threshold_ExC, np.float32).view(Fitted)
  t.policy = policies.get(policy).name
  return t


def policy_for(threshold_ExC, policy) -> str:
  """The policy to run `threshold_ExC` with: `policy` when given, else the one it was fitted for, else max_prob.
  A policy other than the one it was fitted for is a UserError: its numbers would be read in other units."""
  own = getattr(threshold_ExC, "policy", None)
  if policy is None:
    return own or "max_prob"
  name = policies.get(policy).name
  if own is not None and own != name:
    raise UserError(f"these thresholds were fitted for the {own} policy, and policy={name!r} would read them in "
                    f"its own units: leave policy out (it follows the thresholds), or fit them with policy={name!r}")
  return name


def per_exit(threshold_E, num_exits: int, num_classes: int, policy) -> np.ndarray:
  """threshold_ExC from one value per early exit (E-1 or E values; a last value is not read)."""
  never = policies.get(policy).never
  t = np.full((num_exits, num_classes), never, np.float32)
  values = np.asarray(threshold_E, np.float32).reshape(-1)[:num_exits - 1]
  if len(values) != num_exits - 1:
    raise UserError(f"{len(values)} per-exit thresholds for a model with {num_exits} exits; "
                    f"give one for each of the {num_exits - 1} early exits")
  t[:-1] = values[:, None]
  return t


def forced(k: int, num_exits: int, num_classes: int, policy) -> np.ndarray:
  """threshold_ExC under which exit k answers every image: never before it, always at it."""
  never = policies.get(policy).never
  t = np.full((num_exits, num_classes), never, np.float32)
  t[k] = -never
  return t


def to_json(threshold_ExC) -> list:
  return [[float(v) if np.isfinite(v) else None for v in row] for row in np.asarray(threshold_ExC)]


def from_json(rows, policy) -> np.ndarray:
  """threshold_ExC; null (no setting passes) becomes the policy's `never`, as a deployed cascade reads it."""
  return cascade_runtime.thresholds_from_json(rows, policies.get(policy).name)


def entry(policy, threshold_ExC, **about) -> dict:
  """One fitted setting as JSON: its policy, threshold_ExC and what it was fitted for (budget, margin, ...)."""
  return {"policy": policies.get(policy).name, "threshold_ExC": to_json(threshold_ExC), **about}


def save(workdir: str, entries: list[dict]) -> None:
  """Writes the entries (threshold_ExC as an array or already in JSON form) to thresholds.json."""
  entries = [{**e, "threshold_ExC": to_json(e["threshold_ExC"])} if isinstance(e["threshold_ExC"], np.ndarray)
             else e for e in entries]
  workdirs.write_text(os.path.join(workdir, FILE),  # one entry a line
                      '{"thresholds": [\n' + ",\n".join(json.dumps(e) for e in entries) + "\n]}\n")


def load(workdir: str, num_exits: int, num_classes: int, step: int | None = None) -> list[dict]:
  """The run's fitted settings (entries with "threshold_ExC" as an array), newest format or older ones; [] when
  the run has none yet (no thresholds.json and no report.json).

  `step`: the checkpoint step of the weights they will serve; a setting fitted on another step's model is
  refused with one line (settings saved without a step, by older runs or BTS-EE, are taken as they are).
  """
  path = os.path.join(workdir, FILE)
  if os.path.exists(path):
    raw = workdirs.read_json(path)
    entries = raw["thresholds"] if "thresholds" in raw else [_bts_table(raw, num_exits, num_classes)]
  else:
    entries = _from_report(workdir, num_exits, num_classes)
  out = []
  for e in entries:
    t = e["threshold_ExC"] if isinstance(e["threshold_ExC"], np.ndarray) else from_json(e["threshold_ExC"], e["policy"])
    if t.shape != (num_exits, num_classes):
      raise UserError(f"{workdir}: a threshold of shape {t.shape} for a model with {num_exits} exits and "
                      f"{num_classes} classes; it belongs to another run")
    if step is not None and e.get("step") is not None and e["step"] != step:
      raise UserError(f"{workdir}/{FILE} was fitted on the model of step {e['step']}, but the checkpoint loaded is "
                      f"step {step} (the newest whole one there): run the training command again to evaluate "
                      f"step {step} and fit its thresholds, or put the checkpoint of step {e['step']} back")
    out.append({**e, "threshold_ExC": t})
  return out


def pick(entries: list[dict], policy, budget: float | None = None) -> dict:
  """The entry for `policy` (and `budget`, when the run has one per budget); a UserError lists the choices."""
  name = policies.get(policy).name
  mine = [e for e in entries if e["policy"] == name]
  if budget is not None and any("budget" in e for e in mine):
    mine = [e for e in mine if "budget" in e and abs(e["budget"] - budget) < 1e-6]
  if len(mine) == 1:
    return mine[0]
  choices = ", ".join(sorted({f"{e['policy']}" + (f" budget {e['budget']:g}" if "budget" in e else "")
                              for e in entries})) or "none"
  raise UserError(f"no single {name} threshold setting" + (f" for budget {budget:g}" if budget is not None else "")
                  + f" in this run; it has: {choices}. Fit one with eejax.fit_thresholds")


def _bts_table(raw: dict, num_exits: int, num_classes: int) -> dict:
  """A BTS-EE model saved before thresholds.json held entries: a per-class table for the branches."""
  rows = raw["per_class_threshold_BxC"] + [[None] * num_classes]
  return {"policy": raw["policy"], "threshold_ExC": from_json(rows, raw["policy"]), "method": "cpm"}


def _from_report(workdir: str, num_exits: int, num_classes: int) -> list[dict]:
  """Entries from an older run's report.json: per-exit settings fitted on validation, per policy and budget."""
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    return []
  report = workdirs.read_json(path)
  return [{"policy": policy, "budget": row["budget"], "fitted_on": "val",
           "threshold_ExC": per_exit(row["per_exit"]["thresholds"], num_exits, num_classes, policy)}
          for policy, rows in report.get("fitted_on_val", {}).items() for row in rows]
