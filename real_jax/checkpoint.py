"""Checkpoints of a whole RLHF run with orbax: every model, the optimizer states, and the loop state.

    ckpt = Checkpointer(workdir, every=10, config=exp)
    start = ckpt.latest_step() or 0                    # iterations already completed
    if start:
      r = ckpt.restore(start, homes, like=slots)       # straight into this run's home layouts
    ...
    ckpt.save(it + 1, slots, {"iteration": it + 1, "data": prompts.state(), ...})
    ckpt.save(n, slots, extra, force=True); ckpt.close()

Layout on disk: `<workdir>/checkpoints/<step>/` holds one orbax item per model role plus `meta`
(JSON: the caller's `extra` dict, the experiment fingerprint and config). A step is the number of
iterations completed, so resuming from step s runs iteration s next.

* A trained model (a slot with a `train_state`) is stored once, as its TrainState (params,
  opt_state, step): its params are the TrainState's. A frozen model is stored as {"params": ...}.
  Trees are stored as nested dicts of arrays keyed by their pytree paths (nnx Variables by their
  value), so the files do not depend on Python classes.
* Atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when every item is written;
  a directory left behind by a killed process is never listed as a step, and is deleted when the
  next Checkpointer opens the directory.
* Asynchronous: `save` returns once the arrays are copied off the accelerators (so the caller may
  donate them to the next step); the files are written in a background thread. The next `save`,
  `wait_until_finished` and `close` wait for it.
* Restore under any plan: `restore` builds an abstract target (`jax.ShapeDtypeStruct` with the
  NamedSharding each leaf has under the given layout, from the same logical-axis rules as
  everything else) and orbax reads each device's shards straight into place: nothing is assembled
  on one device, and the device count may differ from the writer's.
* Multi-process: every process must call `save`/`restore` with the same arguments (orbax
  synchronises them); only process 0 writes `meta`. Every saved array and every target layout
  must have devices on every process (an orbax 0.12 limit, checked up front with a clear error):
  a model resting on one host's devices is moved to a spanning layout before saving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from sharding import Layout, shardings_for

META = "meta"
# Experiment fields that may change between a run and its resumption: the plan (restore under other
# layouts is the point), how long to run, and how often to log/checkpoint.
RESUMABLE_FIELDS = ("plan", "colocated_strategy", "num_iterations", "checkpoint_every", "log_every")


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into this run (names the path and what is missing)."""


class ConfigMismatchError(CheckpointError):
  """The checkpoint was written by an experiment with another configuration."""


# -- experiment fingerprint --------------------------------------------------------------------


def _plain(x: Any) -> Any:
  """JSON-able form of a config: dataclasses and ConfigDicts to dicts, tuples to lists."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if hasattr(x, "to_dict") and callable(x.to_dict):
    return _plain(x.to_dict())
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return repr(x)


def config_summary(config: Any, ignore=RESUMABLE_FIELDS) -> dict:
  """The experiment config as a JSON-able dict, without the fields a resumed run may change."""
  plain = _plain(config)
  if not isinstance(plain, dict):
    raise TypeError(f"config must be a dataclass, a ConfigDict or a mapping, got {type(config).__name__}")
  return {k: v for k, v in plain.items() if k not in ignore}


def fingerprint(config: Any, ignore=RESUMABLE_FIELDS) -> str:
  """sha256 of the canonical JSON of `config_summary(config)` (16 hex digits)."""
  text = json.dumps(config_summary(config, ignore), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: d}


def _config_diff(saved: dict, current: dict) -> list[str]:
  a, b = _flat(saved), _flat(current)
  return [f"config.{k}: checkpoint {a.get(k, '<absent>')!r} != now {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


# -- trees <-> nested dicts keyed by path ------------------------------------------------------


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """Leaf paths (strings; an nnx Variable's trailing `value` dropped), leaves, and the treedef."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = []
  for path, _ in with_path:
    names = tuple(_key_name(k) for k in path)
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
      names = names[:-1]
    paths.append(names)
  if len(set(paths)) != len(paths):
    raise ValueError("checkpoint: two leaves of one tree have the same path")
  return paths, [leaf for _, leaf in with_path], treedef


def _nest(paths, leaves) -> dict:
  out: dict = {}
  for path, leaf in zip(paths, leaves):
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = leaf
  return out


def _get(nested: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    nested = nested[p]
  return nested


def _model_tree(slot: Any) -> Any:
  """What is stored for one model: its TrainState when trained, else {"params": params}."""
  train_state = getattr(slot, "train_state", None)
  return train_state if train_state is not None else {"params": slot.params}


def _check_spans_processes(devices, what: str, where: str) -> None:
  """Orbax (0.12.x) can neither save nor restore an array whose devices miss some process: saving
  refuses it as a "host-local array"; restoring fails inside orbax on the process without shards
  ("If the Array has no addressable shards, `dtype` must be provided") while the others wait for
  it. Say so up front instead."""
  n = jax.process_count()
  if n == 1:
    return
  procs = {d.process_index for d in devices}
  if len(procs) < n:
    raise CheckpointError(f"{where}: {what} has devices of processes {sorted(procs)} only, but with {n} processes "
                          f"orbax saves and restores only arrays with devices on every process; use a layout that "
                          f"spans all processes for checkpoints and reallocate from/to it")


# -- the checkpointer --------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore` returns: per-role params and train states, and the saved extra."""

  step: int
  params: dict[str, Any]  # role -> nnx.State in the target layout (a trained model's = its TrainState's)
  train_states: dict[str, Any]  # role -> TrainState, for the roles restored with one
  extra: dict


class Checkpointer:
  """Periodic, asynchronous, atomic checkpoints of a run under `<workdir>/checkpoints`.

  every: save when `step % every == 0` (0: only forced saves). max_to_keep: newest steps kept.
  async_save: write in a background thread (`async` is a Python keyword, hence the name).
  config: the experiment (dataclass, ConfigDict or dict); its fingerprint is saved and compared on
  restore. on_mismatch: "error" (default) or "warn" when a checkpoint has another fingerprint.
  """

  def __init__(self, workdir: str, *, every: int, max_to_keep: int = 3, async_save: bool = True,
               config: Any = None, on_mismatch: str = "error"):
    if every < 0 or max_to_keep < 1:
      raise ValueError(f"Checkpointer: every must be >= 0 and max_to_keep >= 1, got {every}, {max_to_keep}")
    if on_mismatch not in ("error", "warn"):
      raise ValueError(f"Checkpointer: on_mismatch must be 'error' or 'warn', got {on_mismatch!r}")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.every, self.on_mismatch = int(every), on_mismatch
    self.config = config_summary(config) if config is not None else None
    self.fingerprint = fingerprint(config) if config is not None else None
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Orbax deletes leftover `*.orbax-checkpoint-tmp*` directories in a background future; newer
    # versions have this hook to wait for it (older ones clean up synchronously).
    wait_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_cleanup is not None:
      wait_cleanup()

  # -- queries -----------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest complete step (tmp directories of unfinished saves are never steps)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  # -- save --------------------------------------------------------------------------------------

  def save(self, step: int, slots: Mapping[str, Any], extra: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves every slot and `extra` (JSON-able) as `step` if due (or forced); returns whether it did.

    slots: role -> object with `.params` (nnx.State) and `.train_state` (TrainState or None), e.g.
    the engine's ModelSlots. Waits for the previous asynchronous save first (orbax does).
    """
    if not (force or self.due(step)) or step in self._manager.all_steps():
      return False
    if META in slots:
      raise ValueError(f"Checkpointer.save: a model may not be called {META!r}")
    items = {}
    for role, slot in slots.items():
      paths, leaves, _ = _paths(_model_tree(slot))
      for path, x in zip(paths, leaves):
        if hasattr(x, "sharding"):
          _check_spans_processes(x.sharding.device_set, f"leaf {'/'.join(path)}",
                                 f"checkpoint {self.step_dir(step)}: model {role!r}")
      items[role] = ocp.args.StandardSave(_nest(paths, leaves))
    meta = {"step": int(step), "fingerprint": self.fingerprint, "config": self.config,
            "roles": {role: ("train_state" if getattr(s, "train_state", None) is not None else "params")
                      for role, s in slots.items()},
            "extra": dict(extra or {})}
    json.dumps(meta)  # Fail here, not in a background thread, on something that is not JSON.
    items[META] = ocp.args.JsonSave(meta)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads; call before the process exits."""
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restore -----------------------------------------------------------------------------------

  def read_meta(self, step: int) -> dict:
    """The `meta` item of `step` (JSON), or a CheckpointError naming the path."""
    path = os.path.join(self.step_dir(step), META)
    if not os.path.isdir(path):
      raise CheckpointError(f"checkpoint {self.step_dir(step)}: missing item {META!r} (an incomplete or foreign "
                            f"checkpoint)")
    return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def restore(self, step: int | None, target_layouts: Mapping[str, Layout], *, like: Mapping[str, Any]) -> Restored:
    """Restores the roles of `target_layouts` from `step` (None: the latest), each array read
    straight into its sharding under `target_layouts[role]`.

    like: role -> a template with `.params` and `.train_state` (ModelSlots, or objects holding
    abstract state, e.g. from `jax.eval_shape`): only tree structure, shapes, dtypes and logical
    axes are read from it, so it may live in another layout or be abstract. Roles are restored as
    saved: a role saved with a TrainState needs a template with one.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint in {self.directory}")
    step_dir = self.step_dir(step)
    if step not in self._manager.all_steps():
      raise CheckpointError(f"checkpoint {step_dir}: no such complete step (have {self.all_steps()})")
    meta = self.read_meta(step)
    self._check_fingerprint(meta, step_dir)
    saved_roles = meta.get("roles", {})
    missing = [r for r in target_layouts if r not in saved_roles]
    if missing:
      raise CheckpointError(f"checkpoint {step_dir}: missing item(s) {missing} (has {sorted(saved_roles)})")
    items, plans = {}, {}
    for role in target_layouts:
      if role not in like:
        raise ValueError(f"Checkpointer.restore: no template (like=) for model {role!r}")
      tmpl = like[role]
      _check_spans_processes(target_layouts[role].device_mesh.devices(), str(target_layouts[role]),
                             f"checkpoint {step_dir}: target layout of model {role!r}")
      if not os.path.isdir(os.path.join(step_dir, role)):
        raise CheckpointError(f"checkpoint {step_dir}: missing item {role!r} (directory {role}/ is absent)")
      kind = saved_roles[role]
      if kind == "train_state" and getattr(tmpl, "train_state", None) is None:
        raise CheckpointError(f"checkpoint {step_dir}: model {role!r} was saved with a TrainState but the "
                              f"template has none")
      tree = tmpl.train_state if kind == "train_state" else {"params": tmpl.params}
      paths, leaves, treedef = _paths(tree)
      shardings = jax.tree.leaves(shardings_for(tree, target_layouts[role]))
      abstract = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s) for x, s in zip(leaves, shardings)]
      self._check_structure(step, role, paths, abstract)
      items[role] = ocp.args.StandardRestore(_nest(paths, abstract))
      plans[role] = (kind, paths, treedef)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    params, train_states = {}, {}
    for role, (kind, paths, treedef) in plans.items():
      tree = jax.tree.unflatten(treedef, [_get(out[role], p) for p in paths])
      if kind == "train_state":
        train_states[role], params[role] = tree, tree.params
      else:
        params[role] = tree["params"]
    return Restored(step, params, train_states, meta.get("extra", {}))

  def _check_fingerprint(self, meta: dict, step_dir: str) -> None:
    saved = meta.get("fingerprint")
    if self.fingerprint is None or saved == self.fingerprint:
      return
    diff = _config_diff(meta.get("config") or {}, self.config or {})
    msg = (f"checkpoint {step_dir} was written by another experiment (fingerprint {saved} != {self.fingerprint}):\n  "
           + "\n  ".join(diff[:20] or ["(no saved config to compare)"])
           + "\nresume with the same config, or use a fresh --workdir")
    if self.on_mismatch == "error":
      raise ConfigMismatchError(msg)
    logging.warning(msg)

  def _check_structure(self, step: int, role: str, paths, abstract) -> None:
    """Compares the template's leaves with the saved item's metadata; names the first difference."""
    where = f"checkpoint {self.step_dir(step)}: item {role!r}"
    try:
      md = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step)) / role)
    except Exception:  # noqa: BLE001 -- metadata is a courtesy; orbax's restore still validates.
      md = None
    if md is None:
      return
    tree = getattr(md, "tree", md)
    saved_paths, saved_leaves, _ = _paths(tree)
    saved = dict(zip(saved_paths, saved_leaves))
    for path, want in zip(paths, abstract):
      got = saved.get(path)
      name = "/".join(path)
      if got is None:
        raise CheckpointError(f"{where}: missing leaf {name!r} (the model or optimizer differs from the saved one)")
      if tuple(got.shape) != tuple(want.shape):
        raise CheckpointError(f"{where}: leaf {name!r} has shape {tuple(got.shape)} in the checkpoint but "
                              f"{tuple(want.shape)} in this run")
    extra = sorted("/".join(p) for p in set(saved) - set(paths))
    if extra:
      raise CheckpointError(f"{where}: the checkpoint has leaves this run lacks, e.g. {extra[:3]}")
