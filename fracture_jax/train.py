"""Data-parallel fine-tuning: train state, steps, schedules, freezing, and the training loop.

The steps are ``jax.jit`` over ``jax.shard_map`` on a 1-D mesh of all devices: each device
runs the per-device program on its slice of the global batch, the loss is ``lax.pmean``-ed
(so its gradient is the global mean) and BatchNorm statistics are synced over the axis.
Frozen backbone layers are outside the differentiated tree: no gradient is computed for them,
and their BatchNorm runs in inference mode (Keras' rule for ``trainable=False``).
"""

import dataclasses
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from fracture_jax import feature_cache, parallel
from fracture_jax.checkpoint import RunCheckpoints
from fracture_jax.data import dataset
from fracture_jax.data.pipeline import Augment, train_dataset
from fracture_jax.errors import UserError
from fracture_jax.files import write_json
from fracture_jax.inference import make_forward, predict
from fracture_jax.metrics import epoch_metrics
from fracture_jax.models import FractureClassifier, backbone_layers, get_spec
from fracture_jax.weights import backbone_variables, resolve_weights

INIT_SIZE = 32  # parameter shapes do not depend on the image size: initialise small


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # every parameter, frozen ones included
    batch_stats: Any
    opt_state: Any  # over the trainable parameters only

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


# ---------------------------------------------------------------- freezing

def frozen_count(freeze, num_layers: int) -> int:
    """``config.train.freeze`` ('none', 'all' or a number of leading layers) as a count."""
    text = str(freeze).strip().lower()
    if text in ("none", "0", "false", ""):
        return 0
    if text in ("all", "backbone", "true"):
        return num_layers
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"train.freeze={freeze!r}: use none, all, or a number of layers") from None
    return max(0, min(n, num_layers))


def split_params(params, frozen_names: frozenset):
    """(trainable, frozen) halves of a params tree; frozen = the named backbone layers."""
    backbone = params.get("backbone", {})
    frozen = {k: v for k, v in backbone.items() if k in frozen_names}
    trainable = dict(params, backbone={k: v for k, v in backbone.items() if k not in frozen_names})
    return trainable, frozen


def merge_params(trainable, frozen):
    return dict(trainable, backbone={**trainable.get("backbone", {}), **frozen})


# ---------------------------------------------------------------- optimisation

def learning_rate_fn(config, steps_per_epoch: int, scale: float = 1.0) -> optax.Schedule:
    """The schedule named by ``config.schedule.name``, peaking at ``optimizer.lr * scale``."""
    peak, s = config.optimizer.lr * scale, config.schedule
    total = max(1, config.train.epochs * steps_per_epoch)
    if s.name == "constant":
        return optax.constant_schedule(peak)
    if s.name == "step_exp":  # the seed: constant for N epochs, then x decay_rate each epoch
        def step_exp(step):
            epoch = jnp.asarray(step) // steps_per_epoch
            return peak * s.decay_rate ** jnp.maximum(0, epoch - s.constant_epochs + 1)
        return step_exp
    if s.name == "warmup_cosine":
        warmup = min(total - 1, int(s.warmup_epochs * steps_per_epoch))
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), total)
    raise UserError(f"schedule.name={s.name!r}: use constant, step_exp or warmup_cosine")


def make_optimizer(config, lr: optax.Schedule) -> optax.GradientTransformation:
    o = config.optimizer
    if o.name == "adam":
        opt = optax.adam(lr)
    elif o.name == "adamw":
        opt = optax.adamw(lr, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        opt = optax.sgd(lr, momentum=o.momentum or None)
    else:
        raise UserError(f"optimizer.name={o.name!r}: use adam, adamw or sgd")
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def bce_loss(logits, labels, pos_weight: float = 1.0, label_smoothing: float = 0.0):
    """Per-example binary cross-entropy on one logit, with class weight and smoothing."""
    y = labels.astype(jnp.float32) * (1.0 - label_smoothing) + 0.5 * label_smoothing
    z = logits.astype(jnp.float32)
    return -(pos_weight * y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))


# ---------------------------------------------------------------- steps

def make_train_step(model, tx, mesh, frozen_names: frozenset, config):
    """jit(shard_map(step)): (state, global batch, rng) -> (state, mean loss, logits)."""
    pos_weight, smoothing = config.train.pos_weight, config.train.label_smoothing

    def step(state, batch, rng):
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(parallel.AXIS))
        trainable, frozen = split_params(state.params, frozen_names)

        def loss_fn(trainable):
            variables = {"params": merge_params(trainable, frozen),
                         "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, batch["image"], train=True,
                                          mutable=["batch_stats"], rngs={"dropout": rng})
            loss = bce_loss(logits, batch["label"], pos_weight, smoothing).mean()
            return lax.pmean(loss, parallel.AXIS), (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        new = state.replace(step=state.step + 1, params=merge_params(trainable, frozen),
                            batch_stats=batch_stats or state.batch_stats, opt_state=opt_state)
        return new, loss, logits

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P()),
                            out_specs=(P(), P(), P(parallel.AXIS)))
    return jax.jit(sharded, donate_argnums=0)


# ---------------------------------------------------------------- model and state

@dataclasses.dataclass
class Phase:
    """One stretch of training with a fixed set of frozen layers and learning-rate scale."""

    index: int
    first_epoch: int
    frozen: int
    lr_scale: float


def phases(config, num_layers: int) -> list[Phase]:
    """The seed's one phase, or the two-phase recipe (head first, then unfrozen)."""
    freeze = frozen_count(config.train.freeze, num_layers)
    if config.train.head_epochs > 0:
        return [Phase(0, 0, num_layers, 1.0),
                Phase(1, config.train.head_epochs, freeze, config.train.unfreeze_lr_scale)]
    return [Phase(0, 0, freeze, 1.0)]


def phase_at(all_phases: list[Phase], epoch: int) -> Phase:
    return [p for p in all_phases if p.first_epoch <= epoch][-1]


def initial_variables(config, rng):
    """(variables, imagenet_rescaling): random init, with the pretrained backbone merged in."""
    spec = get_spec(config.model.name)
    path = resolve_weights(spec.name, config.model.pretrained, config.model.weights_cache)
    module = FractureClassifier(model=spec.name, dropout_rate=config.model.dropout)
    variables = jax.jit(module.init)(rng, jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3)))
    variables = flax.core.unfreeze(variables)
    if path is None:
        logging.warning("=" * 70 + "\nmodel.pretrained is None: the backbone starts from RANDOM "
                        "weights, not ImageNet.\n" + "=" * 70)
        return variables, False
    loaded, rescaling = backbone_variables(spec.name, path, INIT_SIZE)
    for collection, tree in loaded.items():
        variables[collection]["backbone"] = tree["backbone"]
    logging.info("backbone weights from %s%s", path,
                 " (published layout: ImageNet std rescaling on)" if rescaling else "")
    return variables, rescaling


def build_model(config, frozen: int, rescaling: bool) -> FractureClassifier:
    return FractureClassifier(model=get_spec(config.model.name).name,
                              dropout_rate=config.model.dropout, frozen=frozen,
                              imagenet_rescaling=rescaling, axis_name=parallel.AXIS,
                              dtype=jnp.dtype(config.model.dtype))


@dataclasses.dataclass
class PhaseProgram:
    """What one phase compiles: its model, optimizer, steps and learning-rate schedule."""

    phase: Phase
    model: Any
    tx: Any
    lr: Any
    frozen_names: frozenset
    train_step: Any
    forward: Any  # images -> logits
    head_forward: Any  # pooled backbone features -> logits, when the steps take cached ones

    @property
    def cached(self) -> bool:
        return self.head_forward is not None

    def init_opt_state(self, params):
        return self.tx.init(split_params(params, self.frozen_names)[0])


def compile_phase(config, phase: Phase, layers: tuple, rescaling: bool, steps_per_epoch: int,
                  mesh) -> PhaseProgram:
    model = build_model(config, phase.frozen, rescaling)
    lr = learning_rate_fn(config, steps_per_epoch, phase.lr_scale)
    tx = make_optimizer(config, lr)
    frozen_names = frozenset(layers[:phase.frozen])
    head = (model.clone(pooled_inputs=True)
            if feature_cache.applies(config, phase.frozen, len(layers)) else None)
    return PhaseProgram(phase, model, tx, lr, frozen_names,
                        make_train_step(head or model, tx, mesh, frozen_names, config),
                        make_forward(model, mesh), head and make_forward(head, mesh))


# ---------------------------------------------------------------- the loop

class _Progress:
    """One log line every ``every`` steps: loss, learning rate, images/s and the epoch's ETA."""

    def __init__(self, epoch, epochs, steps, batch, every):
        self.epoch, self.epochs, self.steps, self.batch, self.every = epoch, epochs, steps, batch, every
        self.start = self.last = time.perf_counter()
        self.last_step = 0

    def due(self, i) -> bool:
        return (i + 1) % self.every == 0 or i + 1 == self.steps

    def log(self, i, loss, lr):
        now = time.perf_counter()
        rate = (i + 1 - self.last_step) * self.batch / max(now - self.last, 1e-9)
        eta = (self.steps - i - 1) * self.batch / max(rate, 1e-9)
        logging.info("epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f img/s ETA %ds",
                     self.epoch + 1, self.epochs, i + 1, self.steps, loss, lr, rate, eta)
        self.last, self.last_step = now, i + 1


def _predict(program, state, source, config, mesh):
    return predict(program.forward, state.variables, source, config.model.image_size,
                   config.train.batch_size, mesh, config.data.num_workers, config.data.prefetch)


def _write_json(workdir: str, name: str, obj):
    """Write ``workdir/name`` atomically, from the first process only."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, name), obj)


def _tensorboard(workdir):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Ends with the best state (by ``train.early_stop_metric``) restored and returned, the
    history in ``workdir/history.json`` and final metrics in ``workdir/final_metrics.json``.
    """
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh()
    _, sources = dataset.load(config, workdir)
    batch = config.train.batch_size
    if batch % jax.device_count():
        raise UserError(f"train.batch_size={batch} does not split over {jax.device_count()} "
                        "devices; use a multiple of the device count")
    steps_per_epoch = (config.train.steps_per_epoch if config.train.steps_per_epoch > 0
                       else len(sources["train"]) // batch)
    if steps_per_epoch < 1:
        raise UserError(f"the train split has {len(sources['train'])} images, fewer than one "
                        f"batch of {batch}; lower train.batch_size")
    layers = backbone_layers(get_spec(config.model.name).name)
    plan = phases(config, len(layers))
    rng = jax.random.key(config.seed)
    variables, rescaling = initial_variables(config, rng)
    aug = Augment.from_config(config.data.augment)
    cache = None

    def train_stream(program, weights):
        """The phase's train batches, continuing the stream where the phase before ended."""
        nonlocal cache
        skip = program.phase.first_epoch * steps_per_epoch
        if not program.cached:
            return iter(train_dataset(sources["train"], config.model.image_size, batch,
                                      config.seed, aug, config.data.num_workers,
                                      config.data.prefetch, skip))
        logging.info("phase %d trains the head on cached backbone features (backbone frozen, "
                     "no augmentation)", program.phase.index)
        if cache is None:  # no phase before a cached one trains the backbone
            cache = feature_cache.FeatureCache.compute(program.model, weights, sources, config,
                                                       mesh)
        return iter(cache.train_dataset(batch, config.seed, skip))

    minimise = config.train.early_stop_metric.endswith("loss")
    ckpt = RunCheckpoints(workdir, config.train.early_stop_metric, "min" if minimise else "max")

    meta = {"epoch": 0, "step_in_epoch": 0, "phase": 0, "history": [], "best": None,
            "bad_epochs": 0, "acc_logits": [], "acc_labels": []}
    resumed = ckpt.latest_meta()
    meta = resumed or meta
    program = compile_phase(config, plan[meta["phase"]], layers, rescaling, steps_per_epoch,
                            mesh)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}),
                       opt_state=program.init_opt_state(variables["params"]))
    train_iter = train_stream(program, state.variables)  # a cached phase's backbone: the initial
    if resumed is not None:
        state, meta = ckpt.restore_latest(state, train_iter)
        logging.info("resumed from %s at step %d (epoch %d)", ckpt.latest.directory,
                     int(state.step), meta["epoch"] + 1)
    state = parallel.replicate(state, mesh)
    writer = _tensorboard(workdir)

    def checkpoint_meta():
        return dict(meta, config=config.to_dict(), imagenet_rescaling=rescaling)

    epoch = meta["epoch"]
    while epoch < config.train.epochs and meta["bad_epochs"] < config.train.patience:
        phase = phase_at(plan, epoch)
        if phase.index != program.phase.index:
            logging.info("phase %d from epoch %d: %d frozen layers, lr x%g", phase.index,
                         epoch + 1, phase.frozen, phase.lr_scale)
            program = compile_phase(config, phase, layers, rescaling, steps_per_epoch, mesh)
            host = jax.device_get(state)
            state = parallel.replicate(host.replace(
                opt_state=program.init_opt_state(host.params)), mesh)
            meta["phase"] = phase.index
            train_iter.close()
            train_iter = train_stream(program, state.variables)
        progress = _Progress(epoch, config.train.epochs, steps_per_epoch, batch,
                             config.train.log_every)
        global_step = int(state.step)  # kept on the host from here: no device sync per step
        for i in range(meta["step_in_epoch"], steps_per_epoch):
            host_batch = next(train_iter)
            state_next, loss, logits = program.train_step(
                state, parallel.shard_batch(host_batch, mesh), rng)
            loss = float(loss)
            if not math.isfinite(loss):
                raise UserError(
                    f"loss is {loss} at step {global_step + 1} (epoch {epoch + 1}); training "
                    f"stopped, the last good checkpoint is in {ckpt.latest.directory}. Lower "
                    "optimizer.lr or set optimizer.grad_clip")
            state, global_step = state_next, global_step + 1
            meta["acc_logits"] += np.asarray(logits, np.float64).tolist()
            meta["acc_labels"] += np.asarray(host_batch["label"]).tolist()
            meta["step_in_epoch"] = i + 1
            if progress.due(i):
                lr = float(program.lr(global_step - 1))  # the rate this step used
                progress.log(i, loss, lr)
                if writer:
                    writer.add_scalar("train/loss_step", loss, global_step)
                    writer.add_scalar("train/lr", lr, global_step)
            every = config.train.checkpoint_every
            if every > 0 and global_step % every == 0 and i + 1 < steps_per_epoch:
                ckpt.save_latest(global_step, state, train_iter, checkpoint_meta())

        metrics = {"epoch": epoch + 1, "lr": float(program.lr(global_step - 1))}
        metrics |= epoch_metrics(meta["acc_logits"], meta["acc_labels"], "train")
        if program.cached:
            val_logits, val_labels = cache.val_logits(program.head_forward, state.variables,
                                                      batch, mesh)
        else:
            val_logits, val_labels = _predict(program, state, sources["val"], config, mesh)
        metrics |= epoch_metrics(val_logits, val_labels, "val")
        logging.info("epoch %d: %s", epoch + 1,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"))
        if writer:
            for k, v in metrics.items():
                writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
        value = metrics[config.train.early_stop_metric]
        improved = meta["best"] is None or (math.isfinite(value) and (
            value < meta["best"] if minimise else value > meta["best"]))
        meta.update(epoch=epoch + 1, step_in_epoch=0, acc_logits=[], acc_labels=[],
                    history=meta["history"] + [metrics],
                    best=value if improved else meta["best"],
                    bad_epochs=0 if improved else meta["bad_epochs"] + 1)
        _write_json(workdir, "history.json", meta["history"])
        ckpt.save_latest(global_step, state, train_iter, checkpoint_meta())
        if improved:
            ckpt.save_best(global_step, state, train_iter, checkpoint_meta(),
                           {config.train.early_stop_metric: value})
        epoch += 1
    if meta["bad_epochs"] >= config.train.patience:
        logging.info("early stopping: %s did not improve for %d epochs",
                     config.train.early_stop_metric, config.train.patience)

    best = ckpt.restore_best_weights()
    if best is not None:
        state = parallel.replicate(jax.device_get(state).replace(**best), mesh)
        logging.info("restored the best state (%s %.4f, step %d)",
                     config.train.early_stop_metric, meta["best"], int(state.step))
    final = {split: epoch_metrics(*_predict(program, state, src, config, mesh), split)
             for split, src in sources.items() if split != "train"}
    _write_json(workdir, "final_metrics.json", final)
    for split, m in final.items():
        logging.info("final %s: %s", split, ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if writer:
        writer.close()
    ckpt.close()
    train_iter.close()  # stops grain's worker processes and frees their shared memory
    print(f"training done: history {os.path.join(workdir, 'history.json')}, metrics "
          f"{os.path.join(workdir, 'final_metrics.json')}, checkpoints "
          f"{os.path.join(workdir, 'checkpoints')}, TensorBoard {os.path.join(workdir, 'tensorboard')}")
    return jax.device_get(state)
