"""Data-parallel fine-tuning: train state, steps, schedules, freezing, and the training loop.

The steps are ``jax.jit`` over ``jax.shard_map`` on a 1-D mesh of all devices: each device
runs the per-device program on its slice of the global batch (augmenting its uint8 images
first), the loss is ``lax.pmean``-ed (so its gradient is the global mean) and BatchNorm
statistics are synced over the axis. Frozen backbone layers are outside the differentiated
tree: no gradient is computed for them, and their BatchNorm runs in inference mode (Keras' rule
for ``trainable=False``).

Read ``train_and_evaluate`` (at the end) as the recipe: it enters a phase, runs an epoch, ends
it, and finishes; ``_Trainer`` holds each of those steps, ``LoopState`` where the loop stands.
"""

import collections
import dataclasses
import functools
import math
import os
import signal
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

from fracture_jax import feature_cache, interrupt, kernels, parallel
from fracture_jax.augment import Augment, augment_batch, model_input
from fracture_jax.checkpoint import RunCheckpoints
from fracture_jax.data import dataset
from fracture_jax.data.pipeline import train_dataset
from fracture_jax.errors import UserError
from fracture_jax.files import write_json
from fracture_jax.inference import make_forward, predict
from fracture_jax.metrics import epoch_metrics
from fracture_jax.mixing import Mixing, mix_batch
from fracture_jax.models import builder
from fracture_jax.models.builder import frozen_layers


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # every parameter, frozen ones included
    batch_stats: Any
    opt_state: Any  # over the trainable parameters only
    bad_step: jax.Array  # the first step whose loss or update was not finite (0: none)
    bad_loss: jax.Array  # that step's loss
    ema: Any = None  # the weights' exponential moving average ({params, batch_stats}), if on

    @classmethod
    def create(cls, params, batch_stats, opt_state, ema: bool = False) -> "TrainState":
        return cls(jnp.zeros((), jnp.int32), params, batch_stats, opt_state,
                   jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                   {"params": params, "batch_stats": batch_stats} if ema else None)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """What validation, the best checkpoint and every later use score: the EMA when on."""
        return self.ema if self.ema is not None else self.variables


def ema_rate(config, step) -> jax.Array:
    """The EMA's decay at ``step`` (1, 2, ...): ``train.ema_decay``, with timm's warmup
    ``min(decay, (1 + step) / (10 + step))`` when ``train.ema_warmup``."""
    decay = jnp.float32(config.train.ema_decay)
    if config.train.ema_warmup:
        step = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def ema_on(config) -> bool:
    d = config.train.ema_decay
    if not 0.0 <= d < 1.0:
        raise UserError(f"train.ema_decay={d}: use 0 (off) or a decay in (0, 1), e.g. 0.999")
    return d > 0.0


# ---------------------------------------------------------------- freezing

def split_params(params, frozen: frozenset):
    """(trainable, frozen) halves of a params tree; frozen = the named backbone layers."""
    backbone = params.get("backbone", {})
    held = {k: v for k, v in backbone.items() if k in frozen}
    trainable = dict(params, backbone={k: v for k, v in backbone.items() if k not in frozen})
    return trainable, held


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
    """The optimizer of ``config.optimizer`` at rate ``lr`` (counted in updates), with
    gradient clipping, layer-wise rates (``layer_decay``) and gradient accumulation
    (``train.accumulate_steps``: optax.MultiSteps, one update per that many steps) when set."""
    o, k = config.optimizer, accumulate_steps(config)
    if o.name == "adam":
        opt = optax.adam(lr)
    elif o.name == "adamw":
        opt = optax.adamw(lr, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        opt = optax.sgd(lr, momentum=o.momentum or None)
    else:
        raise UserError(f"optimizer.name={o.name!r}: use adam, adamw or sgd")
    if o.layer_decay != 1.0:
        if not 0.0 < o.layer_decay <= 1.0:
            raise UserError(f"optimizer.layer_decay={o.layer_decay}: use a factor in (0, 1]")
        opt = optax.chain(opt, scale_by_layer(
            builder.layer_rate_factors(config.model.name, o.layer_decay)))
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt
    return optax.MultiSteps(opt, every_k_schedule=k) if k > 1 else opt


def accumulate_steps(config) -> int:
    k = config.train.accumulate_steps
    if not isinstance(k, int) or k < 1:
        raise UserError(f"train.accumulate_steps={k!r}: use a whole number >= 1")
    return k


def steps_per_dispatch(config) -> int:
    k = config.train.steps_per_dispatch
    if not isinstance(k, int) or k < 1:
        raise UserError(f"train.steps_per_dispatch={k!r}: use a whole number >= 1")
    return k


def sampling_balanced(config) -> bool:
    if config.data.sampling not in ("shuffled", "balanced"):
        raise UserError(f"data.sampling={config.data.sampling!r}: use shuffled or balanced")
    return config.data.sampling == "balanced"


def scale_by_layer(factors: dict) -> optax.GradientTransformation:
    """Each backbone layer's update times its factor (``factors``: layer name -> factor;
    layers not named, and the head, keep theirs): layer-wise learning rates."""
    def factor(path) -> float:
        keys = [getattr(k, "key", None) for k in path]
        if "backbone" in keys[:-1]:
            return factors.get(keys[keys.index("backbone") + 1], 1.0)
        return 1.0

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def bce_loss(logits, labels, pos_weight: float = 1.0, label_smoothing: float = 0.0):
    """Per-example binary cross-entropy on one logit, with class weight and smoothing."""
    y = labels.astype(jnp.float32) * (1.0 - label_smoothing) + 0.5 * label_smoothing
    z = logits.astype(jnp.float32)
    return -(pos_weight * y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))


# ---------------------------------------------------------------- steps

AUGMENT_STREAM = 0x61756720  # folded into the run's key: augmentation's own random stream
MIX_STREAM = 0x6d697820  # and MixUp/CutMix's


def step_images(batch_images, state_step, rng, augment: Augment | None, image_size: int | None):
    """The model's input from a batch on the device (inside shard_map): stored uint8 images
    augmented (each example from its position in the global batch) or only resized; cached
    features (``image_size`` None) as they are."""
    if image_size is None:
        return batch_images
    if augment is None or not augment.active:
        return model_input(batch_images, image_size)
    n = batch_images.shape[0]
    positions = lax.axis_index(parallel.AXIS) * n + jnp.arange(n)
    key = jax.random.fold_in(jax.random.fold_in(rng, AUGMENT_STREAM), state_step)
    return augment_batch(batch_images, key, positions, augment, image_size)


def make_train_step(model, tx, mesh, frozen_names: frozenset, config,
                    image_size: int | None = None, chain: int = 1):
    """jit(shard_map(step)): (state, global batch, rng) -> (state, mean loss, logits).

    A step whose loss or update is not finite changes nothing but the step count, and records
    itself in ``state.bad_step``: the loop reads that when it next syncs with the device.
    ``chain`` > 1: one call runs that many steps in a row (``lax.scan``, the same steps) on
    stacked batches (chain, global batch, ...) and returns their losses (chain,) and logits
    (chain, global batch): one dispatch and one transfer for them all."""
    pos_weight, smoothing = config.train.pos_weight, config.train.label_smoothing
    augment, mixing = Augment.from_config(config.data.augment), Mixing.from_config(config.data)

    def step(state, batch, rng):
        images = step_images(batch["image"], state.step, rng, augment, image_size)
        device = lax.axis_index(parallel.AXIS)
        targets = batch["label"]
        if mixing.active:
            key = jax.random.fold_in(jax.random.fold_in(rng, MIX_STREAM), state.step)
            images, targets, _ = mix_batch(images, targets, jax.random.fold_in(key, device),
                                           mixing)
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), device)
        trainable, frozen = split_params(state.params, frozen_names)

        def loss_fn(trainable):
            variables = {"params": merge_params(trainable, frozen),
                         "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, images, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": rng})
            loss = bce_loss(logits, targets, pos_weight, smoothing).mean()
            return lax.pmean(loss, parallel.AXIS), (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        finite = functools.reduce(jnp.logical_and, [jnp.isfinite(u).all()
                                                    for u in jax.tree.leaves(updates)],
                                  jnp.isfinite(loss))
        # computed once: XLA would copy the chain of ands into each select below, a program
        # of ~100 times the size that compiled several times slower
        finite = lax.optimization_barrier(finite)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (merge_params(trainable, frozen), batch_stats or state.batch_stats,
                             opt_state), (state.params, state.batch_stats, state.opt_state))
        first_bad = ~finite & (state.bad_step == 0)
        new = state.replace(step=state.step + 1, params=kept[0], batch_stats=kept[1],
                            opt_state=kept[2],
                            bad_step=jnp.where(first_bad, state.step + 1, state.bad_step),
                            bad_loss=jnp.where(first_bad, loss, state.bad_loss))
        if state.ema is not None:  # after a step that was not applied, the EMA stays too
            d = jnp.where(finite, ema_rate(config, new.step), 1.0)
            new = new.replace(ema=jax.tree.map(lambda e, v: d * e + (1.0 - d) * v, state.ema,
                                               new.variables))
        return new, loss, logits

    batches = P(parallel.AXIS) if chain == 1 else P(None, parallel.AXIS)
    sharded = jax.shard_map(step if chain == 1 else _in_a_row(step), mesh=mesh,
                            in_specs=(P(), batches, P()), out_specs=(P(), P(), batches))
    return jax.jit(sharded, donate_argnums=0)


def _in_a_row(step):
    """``step`` run over stacked batches, one after the other."""
    def steps(state, batches, rng):
        def one(state, batch):
            state, loss, logits = step(state, batch, rng)
            return state, (loss, logits)
        state, (losses, logits) = lax.scan(one, state, batches)
        return state, losses, logits
    return steps


# ---------------------------------------------------------------- phases

@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of training with a fixed set of frozen layers and learning-rate scale."""

    index: int
    first_epoch: int
    frozen: frozenset
    lr_scale: float


def phases(config) -> list[Phase]:
    """The seed's one phase, or the two-phase recipe (head first, then unfrozen)."""
    name, t = config.model.name, config.train
    freeze = frozen_layers(name, t.freeze)
    if t.head_epochs > 0:
        return [Phase(0, 0, frozen_layers(name, "all"), 1.0),
                Phase(1, t.head_epochs, freeze, t.unfreeze_lr_scale)]
    return [Phase(0, 0, freeze, 1.0)]


def phase_at(all_phases: list[Phase], epoch: int) -> Phase:
    return [p for p in all_phases if p.first_epoch <= epoch][-1]


@dataclasses.dataclass
class PhaseProgram:
    """What one phase compiles: its model, optimizer, steps and learning-rate schedule."""

    phase: Phase
    model: Any
    tx: Any
    lr: Any
    train_step: Any
    forward: Any  # images -> logits
    head_forward: Any  # pooled backbone features -> logits, when the steps take cached ones
    train_chain: Any = None  # train.steps_per_dispatch steps in one call (when over 1)

    @property
    def cached(self) -> bool:
        return self.head_forward is not None

    def init_opt_state(self, params):
        return self.tx.init(split_params(params, self.phase.frozen)[0])


def compile_phase(config, phase: Phase, rescaling: bool, steps_per_epoch: int,
                  mesh) -> PhaseProgram:
    model = builder.classifier(config, phase.frozen, rescaling)
    k = accumulate_steps(config)
    updates_lr = learning_rate_fn(config, max(1, steps_per_epoch // k), phase.lr_scale)
    tx = make_optimizer(config, updates_lr)
    lr = updates_lr if k == 1 else (lambda step: updates_lr(step // k))  # by step
    whole = phase.frozen == frozen_layers(config.model.name, "all")
    head = model.clone(pooled_inputs=True) if feature_cache.applies(config, whole) else None
    size = None if head else config.model.image_size
    chain = steps_per_dispatch(config)

    def steps(n):  # (compiled at their first call only)
        return make_train_step(head or model, tx, mesh, phase.frozen, config, size, n)

    return PhaseProgram(phase, model, tx, lr, steps(1), make_forward(model, mesh,
                        config.model.image_size), head and make_forward(head, mesh),
                        steps(chain) if chain > 1 else None)


# ---------------------------------------------------------------- the loop's state

DIVERGED, DIVERGED_READS = 100.0, 3  # a loss this many times the first, this many reads


@dataclasses.dataclass
class LoopState:
    """Where the loop stands; saved as every checkpoint's metadata (with the config)."""

    epoch: int = 0
    step_in_epoch: int = 0
    phase: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: float | None = None
    bad_epochs: int = 0
    first_loss: float | None = None  # the run's first step's loss, before any update
    diverging: int = 0  # reads in a row with the loss above DIVERGED x first_loss

    def running(self, config) -> bool:
        return self.epoch < config.train.epochs and self.bad_epochs < config.train.patience

    def end_epoch(self, metrics: dict, value: float, minimise: bool) -> bool:
        """Record the epoch; whether it is the best so far: a number better than the best, or
        any epoch while no number has come (a NaN never becomes ``best``)."""
        better = math.isfinite(value) and (self.best is None or (
            value < self.best if minimise else value > self.best))
        improved = better or self.best is None
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.history = self.history + [metrics]
        self.best = value if better else self.best
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return improved

    def watch(self, loss: float) -> bool:
        """Count a read of the loss; whether it has stayed diverged for ``DIVERGED_READS``."""
        diverged = self.first_loss is not None and loss > DIVERGED * max(self.first_loss, 1e-3)
        self.diverging = self.diverging + 1 if diverged else 0
        return self.diverging >= DIVERGED_READS

    @classmethod
    def from_meta(cls, meta: dict) -> "LoopState":
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})


@dataclasses.dataclass
class TrainOutputs:
    """The epoch's train logits and labels so far, in buffers sized for the whole epoch. A
    step's logits stay on the device until the loop syncs (``fetch``)."""

    logits: np.ndarray
    labels: np.ndarray
    pending: list = dataclasses.field(default_factory=list)  # (step in epoch, device logits)

    @classmethod
    def empty(cls, examples: int) -> "TrainOutputs":
        return cls(np.zeros(examples, np.float32), np.zeros(examples, np.int32))

    def put(self, step_in_epoch: int, logits, labels):
        """Keep the global batch of step ``step_in_epoch`` (or the stacked batches of the steps
        from it on), as device arrays (every batch of the epoch has one size)."""
        self.pending.append((step_in_epoch, logits, labels))

    def fetch(self):
        """Copy the pending logits and labels into the buffers (waits for their steps)."""
        for i, logits, labels in self.pending:
            start = i * logits.shape[-1]
            self.logits[start:start + logits.size] = parallel.to_host(logits).reshape(-1)
            self.labels[start:start + labels.size] = parallel.to_host(labels).reshape(-1)
        self.pending.clear()

    def metrics(self) -> dict:
        """The train metrics of the whole epoch (every step stored)."""
        self.fetch()
        return epoch_metrics(self.logits, self.labels, "train")

    def arrays(self) -> dict:
        """As a checkpoint stores them."""
        self.fetch()
        return {"logits": self.logits, "labels": self.labels}


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The epoch's steps ``first`` to ``end - 1``, run by one call; whether the loop logs (and
    reads the devices) and whether a checkpoint is due after them."""

    first: int
    end: int
    logs: bool
    saves: bool

    @property
    def count(self) -> int:
        return self.end - self.first


def dispatch_plan(first: int, steps: int, done: int, chain: int, logs, save_every: int
                  ) -> list[Dispatch]:
    """The epoch's steps from ``first`` on (``done`` steps trained before it) as calls: runs of
    ``chain`` steps where no log step (``logs(i)``), checkpoint step or the epoch's end falls
    before a run's last step, single steps elsewhere. Each run depends only on where it starts,
    so a resumed run dispatches the rest of the epoch as the uninterrupted one did."""
    def saves(i):
        return save_every > 0 and (done + i + 1 - first) % save_every == 0

    def event(i):
        return logs(i) or saves(i) or i + 1 == steps

    plan, i = [], first
    while i < steps:
        n = chain if i + chain <= steps and not any(map(event, range(i, i + chain - 1))) else 1
        plan.append(Dispatch(i, i + n, logs(i + n - 1), saves(i + n - 1)))
        i += n
    return plan


class _Feed:
    """Each dispatch's batches (stacked, for a run of steps) put on the devices ahead of it (up
    to ``ahead`` dispatches), never past the one after which the iterator's position is next
    saved."""

    def __init__(self, batches, mesh, plan: list[Dispatch], ahead: int = 2):
        self.batches, self.mesh, self.plan, self.ahead = batches, mesh, plan, ahead
        self.queue, self.loaded = collections.deque(), 0

    def take(self, d: int):
        """The device batches of dispatch ``d`` of the plan."""
        while (self.loaded < min(d + self.ahead + 1, len(self.plan))
               and (self.loaded == d or not self.plan[self.loaded - 1].saves)):
            run = self.plan[self.loaded]
            host = [next(self.batches) for _ in range(run.count)]
            batch = (parallel.shard_batch(host[0], self.mesh) if len(host) == 1 else
                     parallel.shard_batch({k: np.stack([b[k] for b in host]) for k in host[0]},
                                          self.mesh, stacked=True))
            self.queue.append((batch, self.batches.get_state()))
            self.loaded += 1
        batch, self.position = self.queue.popleft()
        return batch

    def rewind(self):
        """The iterator put back to just after the last batch taken (those loaded ahead
        dropped), so that its saved position is the loop's."""
        if self.queue:
            self.batches.set_state(self.position)
            self.queue.clear()


class _Progress:
    """One log line every ``every`` steps: loss, learning rate, images/s, and the time left in
    the epoch and (at most, early stopping aside; val passes not counted) in the run."""

    def __init__(self, epoch, epochs, steps, batch, every):
        self.epoch, self.epochs, self.steps, self.batch, self.every = epoch, epochs, steps, batch, every
        self.start = self.last = time.perf_counter()
        self.last_step = 0

    def due(self, i) -> bool:
        return (i + 1) % self.every == 0 or i + 1 == self.steps

    def log(self, i, loss, lr):
        now = time.perf_counter()
        rate = (i + 1 - self.last_step) * self.batch / max(now - self.last, 1e-9)
        left = self.steps - i - 1
        run_left = left + (self.epochs - self.epoch - 1) * self.steps
        per_step = self.batch / max(rate, 1e-9)
        logging.info("epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f img/s ETA epoch %s, run %s",
                     self.epoch + 1, self.epochs, i + 1, self.steps, loss, lr, rate,
                     _duration(left * per_step), _duration(run_left * per_step))
        self.last, self.last_step = now, i + 1


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def _write_json(workdir: str, name: str, obj):
    """Write ``workdir/name`` atomically, from the first process only."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, name), obj)


def _tensorboard(workdir):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


class _Trainer:
    """One run's fixed parts (mesh, data, checkpoints, phases) and the steps of its loop."""

    def __init__(self, config, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.config, self.workdir, self.mesh = config, workdir, parallel.make_mesh()
        _, self.sources = dataset.load(config, workdir)
        self.batch = config.train.batch_size
        if self.batch % jax.device_count():
            raise UserError(f"train.batch_size={self.batch} does not split over "
                            f"{jax.device_count()} devices; use a multiple of the device count")
        self.steps = (config.train.steps_per_epoch if config.train.steps_per_epoch > 0
                      else len(self.sources["train"]) // self.batch)
        if self.steps < 1:
            raise UserError(f"the train split has {len(self.sources['train'])} images, fewer "
                            f"than one batch of {self.batch}; lower train.batch_size")
        self.plan = phases(config)
        self.rng = jax.random.key(config.seed)
        self.variables, self.rescaling = builder.initial_variables(config, self.rng)
        self.metric = config.train.early_stop_metric
        self.minimise = self.metric.endswith("loss")
        self.ckpt = RunCheckpoints(workdir, self.metric, "min" if self.minimise else "max")
        self.cache = None
        self.writer = _tensorboard(workdir)
        decay = config.optimizer.layer_decay
        self.group_rates = ({} if decay == 1.0
                            else builder.group_rate_factors(config.model.name, decay))

    def start(self):
        """(loop, state, outputs, program, train batches): from the latest checkpoint if any."""
        meta = self.ckpt.latest_meta()
        if meta is not None and meta.get("processes", 1) != jax.process_count():
            raise UserError(
                f"the checkpoint in {self.ckpt.latest.directory} was written by a run of "
                f"{meta.get('processes', 1)} processes and this run has {jax.process_count()}: "
                "each process saved its own place in the data stream. Resume with the same "
                "number of processes (any number of devices each), or train into a new "
                "--workdir; eval, predict and export read the run with any process count")
        loop = LoopState() if meta is None else LoopState.from_meta(meta)
        program = self.compile(self.plan[loop.phase])
        state = TrainState.create(self.variables["params"], self.variables.get("batch_stats", {}),
                                  program.init_opt_state(self.variables["params"]),
                                  ema_on(self.config))
        outputs = TrainOutputs.empty(self.steps * self.batch)
        batches = self.stream(program, state.variables)  # a cached phase's backbone: initial
        if meta is not None:
            state, arrays, _ = self.ckpt.restore_latest(state, outputs.arrays(), batches)
            outputs = TrainOutputs(**{k: np.asarray(v) for k, v in arrays.items()})
            logging.info("resumed from %s at step %d (epoch %d)", self.ckpt.latest.directory,
                         int(state.step), loop.epoch + 1)
        return loop, parallel.replicate(state, self.mesh), outputs, program, batches

    def compile(self, phase: Phase) -> PhaseProgram:
        return compile_phase(self.config, phase, self.rescaling, self.steps, self.mesh)

    def stream(self, program: PhaseProgram, weights):
        """The phase's train batches, continuing the stream where the phase before ended."""
        c, skip = self.config, program.phase.first_epoch * self.steps
        balanced = sampling_balanced(c)
        if not program.cached:
            return iter(train_dataset(self.sources["train"], self.batch, c.seed,
                                      c.data.num_workers, c.data.prefetch, skip, balanced))
        logging.info("phase %d trains the head on cached backbone features (backbone frozen, "
                     "no augmentation)", program.phase.index)
        if self.cache is None:  # no phase before a cached one trains the backbone
            self.cache = feature_cache.FeatureCache.compute(program.model, weights,
                                                            self.sources, c, self.mesh)
        return iter(self.cache.train_dataset(self.batch, c.seed, skip, balanced))

    def meta(self, loop: LoopState) -> dict:
        return dict(dataclasses.asdict(loop), config=self.config.to_dict(),
                    imagenet_rescaling=self.rescaling, kernels=kernels.describe(),
                    processes=jax.process_count())

    def run_epoch(self, loop: LoopState, state, outputs: TrainOutputs, program, batches):
        """The rest of the epoch's steps; the state after them. The host reads from the devices
        only at log steps, checkpoints and the epoch's end (``check``); meanwhile the next
        batches go to the devices ahead of their steps, and at most two calls are in flight
        (a call: one step, or ``train.steps_per_dispatch`` in a row)."""
        c = self.config
        progress = _Progress(loop.epoch, c.train.epochs, self.steps, self.batch,
                             c.train.log_every)
        step = int(state.step)
        plan = dispatch_plan(loop.step_in_epoch, self.steps, step, steps_per_dispatch(c),
                             progress.due, c.train.checkpoint_every)
        feed, in_flight = _Feed(batches, self.mesh, plan), collections.deque()
        for d, run in enumerate(plan):
            batch = feed.take(d)
            train = program.train_step if run.count == 1 else program.train_chain
            state, loss, logits = train(state, batch, self.rng)
            step += run.count
            outputs.put(run.first, logits, batch["label"])
            loop.step_in_epoch = run.end
            in_flight.append(loss)
            if len(in_flight) > 2:
                in_flight.popleft().block_until_ready()
            if loop.first_loss is None:  # the run's very first step: one read, for ``watch``
                loop.first_loss = float(np.asarray(loss).reshape(-1)[0])
            if run.logs:
                self.check(state)
                value = float(np.asarray(loss).reshape(-1)[-1])
                self.watch(loop, value, step)
                lr = float(program.lr(step - 1))  # the rate this step used
                progress.log(run.end - 1, value, lr)
                if self.writer:
                    self.writer.add_scalar("train/loss_step", value, step)
                    self.writer.add_scalar("train/lr", lr, step)
                    for group, factor in self.group_rates.items():
                        self.writer.add_scalar(f"lr_by_block/{group}", lr * factor, step)
            if run.saves and run.end < self.steps:
                self.check(state)
                self.ckpt.save_latest(step, state, outputs.arrays(), batches, self.meta(loop))
            if self.stop_requested(run.logs or run.saves):
                self.stop(loop, state, outputs, batches, feed)
        return state

    @staticmethod
    def stop_requested(agreed_step: bool) -> bool:
        """Whether a signal asked the run to stop. With several processes they agree at log and
        checkpoint steps only (one signalled process stops them all, at the same step)."""
        if jax.process_count() == 1:
            return bool(interrupt.requested())
        return agreed_step and parallel.any_process(bool(interrupt.requested()))

    def stop(self, loop: LoopState, state, outputs: TrainOutputs, batches, feed: "_Feed"):
        """A signal asked the run to stop: save where it is, then raise ``Interrupted``."""
        self.check(state)
        feed.rewind()
        step = int(state.step)
        if self.ckpt.latest.latest_step() != step:  # (a checkpoint step saved itself)
            self.ckpt.save_latest(step, state, outputs.arrays(), batches, self.meta(loop))
        signum = interrupt.requested() or signal.SIGTERM  # (another process's signal)
        raise interrupt.Interrupted(
            signum, f"stopped by {signal.Signals(signum).name} at step {step} (epoch "
            f"{loop.epoch + 1}, step {loop.step_in_epoch} of {self.steps}); the checkpoint is in "
            f"{self.ckpt.latest.directory}: run the same command again to resume")

    def watch(self, loop: LoopState, loss: float, step: int):
        """Stop when the loss has stayed over ``DIVERGED`` times the first step's."""
        if loop.watch(loss):
            raise UserError(
                f"the loss diverged: {loss:.4g} at step {step}, over {DIVERGED:g}x the first "
                f"step's {loop.first_loss:.4g} at {DIVERGED_READS} reads in a row; training "
                f"stopped (the best epoch so far is in {self.ckpt.best.directory}). Lower "
                "optimizer.lr or set optimizer.grad_clip")

    def check(self, state):
        """Stop, with the last good checkpoint kept, if a step was not finite (a sync)."""
        bad = int(state.bad_step)
        if bad:
            loss = float(state.bad_loss)
            what = (f"loss is {loss}" if not math.isfinite(loss)
                    else f"the update is not finite (loss {loss:.4g})")
            raise UserError(
                f"{what} at step {bad} (epoch {(bad - 1) // self.steps + 1}); training "
                f"stopped, the last good checkpoint is in {self.ckpt.latest.directory}. "
                "Lower optimizer.lr or set optimizer.grad_clip")

    def end_epoch(self, loop: LoopState, state, outputs: TrainOutputs, program, batches):
        """Val metrics, history, early stopping's count and the epoch's checkpoints."""
        self.check(state)
        step = int(state.step)
        metrics = {"epoch": loop.epoch + 1, "lr": float(program.lr(step - 1))}
        metrics |= outputs.metrics()
        if program.cached:
            val = self.cache.val_logits(program.head_forward, state.eval_variables,
                                        self.batch, self.mesh)
        else:
            val = self.predict(program, state, self.sources["val"])
        if not np.isfinite(val[0]).all():
            raise UserError(
                f"the model diverged: its val outputs are not finite after epoch "
                f"{loop.epoch + 1} (train loss {metrics['train_loss']:.4g}); training stopped "
                f"(the best epoch so far is in {self.ckpt.best.directory}). Lower optimizer.lr "
                "or set optimizer.grad_clip")
        metrics |= epoch_metrics(*val, "val")
        logging.info("epoch %d: %s", loop.epoch + 1,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"))
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(k.replace("_", "/", 1), v, loop.epoch + 1)
        self.watch(loop, metrics["train_loss"], step)
        value = metrics[self.metric]
        improved = loop.end_epoch(metrics, value, self.minimise)
        _write_json(self.workdir, "history.json", loop.history)
        arrays, meta = outputs.arrays(), self.meta(loop)
        self.ckpt.save_latest(step, state, arrays, batches, meta)
        if improved:
            self.ckpt.save_best(step, state, arrays, batches, meta, {self.metric: value})

    def predict(self, program, state, source):
        c = self.config
        return predict(program.forward, state.eval_variables, source, self.batch, self.mesh,
                       c.data.num_workers, c.data.prefetch)

    def finish(self, loop: LoopState, state, program):
        """The best state restored, scored on val and test; everything closed."""
        if loop.bad_epochs >= self.config.train.patience:
            logging.info("early stopping: %s did not improve for %d epochs", self.metric,
                         self.config.train.patience)
        best = self.ckpt.restore_best_weights()
        if best is not None:
            # (with EMA on, the best checkpoint's weights are its EMA: scored as they are)
            state = parallel.replicate(jax.device_get(state).replace(**best, ema=None), self.mesh)
            logging.info("restored the best state (%s %.4f, step %d)", self.metric, loop.best,
                         int(state.step))
        final = {split: epoch_metrics(*self.predict(program, state, source), split)
                 for split, source in self.sources.items() if split != "train"}
        _write_json(self.workdir, "final_metrics.json", final)
        for split, m in final.items():
            logging.info("final %s: %s", split, ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        return state

    def close(self, batches):
        if self.writer:
            self.writer.close()
        self.ckpt.close()
        batches.close()  # stops grain's worker processes and frees their shared memory


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Ends with the best state (by ``train.early_stop_metric``) restored and returned, the
    history in ``workdir/history.json`` and final metrics in ``workdir/final_metrics.json``.
    """
    started = time.perf_counter()
    run = _Trainer(config, workdir)
    loop, state, outputs, program, batches = run.start()
    try:
        with interrupt.graceful():  # a first Ctrl-C or SIGTERM: checkpoint, then stop
            while loop.running(config):
                phase = phase_at(run.plan, loop.epoch)
                if phase.index != program.phase.index:  # the two-phase recipe unfreezes
                    logging.info("phase %d from epoch %d: %d frozen layers, lr x%g",
                                 phase.index, loop.epoch + 1, len(phase.frozen), phase.lr_scale)
                    program, loop.phase = run.compile(phase), phase.index
                    host = jax.device_get(state)
                    state = parallel.replicate(
                        host.replace(opt_state=program.init_opt_state(host.params)), run.mesh)
                    batches.close()
                    batches = run.stream(program, state.variables)
                state = run.run_epoch(loop, state, outputs, program, batches)
                run.end_epoch(loop, state, outputs, program, batches)
        state = run.finish(loop, state, program)
    finally:
        run.close(batches)
    print(f"training done in {_duration(time.perf_counter() - started)} (since this start): "
          f"history {os.path.join(workdir, 'history.json')}, metrics "
          f"{os.path.join(workdir, 'final_metrics.json')}, checkpoints "
          f"{os.path.join(workdir, 'checkpoints')}, TensorBoard "
          f"{os.path.join(workdir, 'tensorboard')}")
    return jax.device_get(state)
