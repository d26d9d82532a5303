"""Orbax checkpoints of a run: the latest (for resuming) and the best (by a val metric).

Each checkpoint is one step directory with four items: ``state`` (the train state pytree),
``outputs`` (the epoch's train logits and labels so far, arrays), ``data`` (the grain
iterator's state) and ``meta`` (JSON: the loop's state, config, kernels).
Orbax writes into a temporary directory and renames it when complete, so a process killed
mid-save leaves nothing that a restart would mistake for a checkpoint.
"""

import math
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fracture_jax.errors import UserError


def ranking(metric: str, mode: str):
    """The key that orders checkpoints from worst to best by ``metric`` ("max" or "min" is
    better); a NaN or missing value ranks below every number, so it never becomes the best."""
    def key(metrics: dict) -> float:
        value = float(metrics.get(metric, math.nan))
        if math.isnan(value):
            return -math.inf
        return value if mode == "max" else -value
    return key


def _handlers() -> dict:
    return {"state": ocp.PyTreeCheckpointHandler(), "outputs": ocp.PyTreeCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _has(tree, key: str) -> bool:
    try:
        return bool(jax.tree.leaves(tree[key]))
    except (KeyError, TypeError):
        return False


def _restore(target, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore into ``target``'s shapes, dtypes and shardings (only its keys when ``partial``)."""
    return ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


class RunCheckpoints:
    """``latest/`` keeps the newest checkpoint, ``best/`` the one with the best metric."""

    def __init__(self, workdir: str, metric: str, mode: str = "max", read_only: bool = False):
        root = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.metric = metric
        policies = checkpoint_managers.preservation_policy
        common = dict(enable_async_checkpointing=False, read_only=read_only,
                      cleanup_tmp_directories=not read_only, create=not read_only)
        self.latest = ocp.CheckpointManager(
            os.path.join(root, "latest"), item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(preservation_policy=policies.LatestN(n=1),
                                                 **common))
        self.best = ocp.CheckpointManager(
            os.path.join(root, "best"), item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.BestN(
                    get_metric_fn=ranking(metric, mode), n=1,
                    keep_checkpoints_without_metrics=False), **common))

    @staticmethod
    def _args(state, outputs, data_iter, meta):
        return ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  outputs=ocp.args.PyTreeSave(outputs),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave(meta))

    def save_latest(self, step: int, state, outputs, data_iter, meta: dict):
        self.latest.save(step, args=self._args(state, outputs, data_iter, meta), force=True)
        self.latest.wait_until_finished()

    def save_best(self, step: int, state, outputs, data_iter, meta: dict, metrics: dict):
        self.best.save(step, args=self._args(state, outputs, data_iter, meta), metrics=metrics,
                       force=True)
        self.best.wait_until_finished()

    def restore_latest(self, target_state, target_outputs, data_iter):
        """(state, outputs, meta) of the newest complete checkpoint, restoring ``data_iter``
        in place; None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=_restore(target_state), outputs=_restore(target_outputs),
            data=grain.checkpoint.CheckpointRestore(data_iter), meta=ocp.args.JsonRestore()))
        return restored.state, restored.outputs, restored.meta

    def restore_best_weights(self, with_meta: bool = False):
        """``{'step', 'params', 'batch_stats'}`` of the best checkpoint, on this process's first
        device, or None; with ``with_meta`` a pair (weights, meta). Restored from the saved
        shapes alone: the best may come from another phase of the run, and the devices that
        saved it (how many, which processes) need not be these."""
        step = self.best.latest_step()
        if step is None:
            return None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = self.best.item_metadata(step)["state"]
        # with EMA on, the EMA is the model the run validated: its weights are the best's
        kept = ("step", "ema") if _has(saved, "ema") else ("step", "params", "batch_stats")
        target = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                  saved[k]) for k in kept}
        items = {"state": _restore(target, partial=True)} | (
            {"meta": ocp.args.JsonRestore()} if with_meta else {})
        raw = self.best.restore(step, args=ocp.args.Composite(**items))
        weights = {"step": raw.state["step"], **raw.state.get("ema", raw.state)}
        weights = {k: weights[k] for k in ("step", "params", "batch_stats")}
        return (weights, raw.meta) if with_meta else weights

    def latest_meta(self) -> dict | None:
        """The JSON metadata of the newest checkpoint, without restoring its arrays."""
        step = self.latest.latest_step()
        if step is None:
            return None
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self):
        self.latest.close()
        self.best.close()


def load_best(workdir: str) -> tuple[dict, dict]:
    """(weights, meta) of the best checkpoint of the run in ``workdir``, for scoring."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints", "best")):
        raise UserError(f"no trained model in {workdir}: {workdir}/checkpoints/best does not "
                        f"exist; train first with --mode=train --workdir={workdir}")
    ckpt = RunCheckpoints(workdir, metric="unused", read_only=True)  # (a read-only copy works)
    try:
        found = ckpt.restore_best_weights(with_meta=True)
    finally:
        ckpt.close()
    if found is None:
        raise UserError(f"{workdir}/checkpoints/best holds no complete checkpoint (was the run "
                        "stopped before its first epoch ended?); train it further first")
    return found
