"""Default configuration: every key the program reads, with its default and its meaning."""

import math

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameter init, shuffling, augmentation and dropout

    c.data = d = ml_collections.ConfigDict()
    d.root = ""  # folder with {train,val,test}/{fractured,not_fractured}/ images
    d.synthetic = False  # generate the phantom data set into `root` (or workdir/phantoms)
    d.synthetic_per_class = 120  # phantom images per class in the train split
    d.synthetic_size = 256  # phantom image side in pixels
    d.prepared_dir = ""  # where the TFDS ArrayRecord copy goes (default: <workdir>/tfds)
    d.decoded_side = 0  # side of the images decoded once and stored as uint8 (0: the model's
    # image_size; larger keeps detail for zoom crops, at side^2 * 3 bytes per image on disk)
    d.num_workers = 2  # grain worker processes reading batches (0: in the main process)
    d.prefetch = 2  # batches read ahead, by that many threads (0: read when the loop asks)
    d.sampling = "shuffled"  # shuffled, or balanced: every batch half fractured, half not
    d.mixup_alpha = 0.0  # MixUp: Beta(alpha, alpha) blend weight (0: off; 0.2-0.4 is usual)
    d.cutmix_alpha = 0.0  # CutMix: Beta(alpha, alpha) box share (0: off; 1.0 is usual)
    d.mix_prob = 1.0  # share of train batches mixed when MixUp or CutMix is on
    d.folds = 5  # --mode=cv: stratified folds over train+val
    d.group_column = ""  # --mode=cv: a metadata column (eval.metadata's table) whose images
    # stay in one fold, e.g. a patient id
    d.fold_val_share = 0.2  # --mode=cv: share of a fold's training images kept for its val
    # (early stopping, threshold), so the held-out fold is only scored
    d.augment = a = ml_collections.ConfigDict()  # on the device, in the train step
    a.flip = True  # random horizontal flip
    a.rotate_deg = 10.0  # max rotation in degrees (0: off)
    a.zoom = 0.1  # max random zoom-in fraction, as a random crop (0: off)
    a.brightness = 0.1  # max brightness change as a fraction of 255 (0: off)
    a.contrast = 0.1  # max contrast change factor around 1 (0: off)

    c.model = m = ml_collections.ConfigDict()
    m.name = "efficientnetb2"  # efficientnetb0..b7, resnet50, vgg16 (or smallcnn, no weights)
    m.image_size = 260  # input side in pixels (the seed: 260)
    m.pretrained = ml_collections.config_dict.placeholder(str)  # None, "imagenet" or an .h5 path
    m.weights_cache = "~/.cache/fracture_jax"  # where downloaded Keras weight files are kept
    m.dropout = 0.2  # dropout before the one-logit head
    m.dtype = "float32"  # compute dtype: float32, or bfloat16 for GPU/TPU (params stay float32)

    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "adam"  # adam, adamw or sgd
    o.lr = 1e-4  # peak learning rate (the seed: Adam 1e-4)
    o.weight_decay = 0.0  # decoupled weight decay (adamw)
    o.grad_clip = 0.0  # global-norm gradient clipping (0: off)
    o.momentum = 0.9  # sgd: momentum (0: plain SGD)
    o.layer_decay = 1.0  # layer-wise rates: the last backbone block x this, each earlier block
    # x this once more, the head x 1 (1.0: off; 0.7-0.9 is usual)

    c.schedule = s = ml_collections.ConfigDict()
    s.name = "constant"  # constant, step_exp (the seed's) or warmup_cosine
    s.constant_epochs = 3  # step_exp: epochs at the peak before the exponential decay
    s.decay_rate = math.exp(-0.1)  # step_exp: decay per epoch afterwards (the seed's 0.905)
    s.warmup_epochs = 1.0  # warmup_cosine: linear warmup length in epochs

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 32  # global batch, split across all devices
    t.epochs = 7  # maximum number of epochs (the seed: 7)
    t.freeze = "none"  # none, all (backbone), or a number of leading backbone layers
    t.head_epochs = 0  # two-phase recipe: epochs with the backbone frozen before unfreezing
    t.unfreeze_lr_scale = 0.1  # learning-rate factor after unfreezing
    t.accumulate_steps = 1  # gradient accumulation: one update per this many batches
    t.ema_decay = 0.0  # EMA of the weights (0: off; e.g. 0.999): validated, kept and exported
    t.ema_warmup = True  # EMA decay min(ema_decay, (1 + step) / (10 + step)), as timm warms up
    t.pos_weight = 1.0  # weight of the fractured class in the loss (imbalance)
    t.label_smoothing = 0.0  # binary label smoothing
    t.early_stop_metric = "val_auroc"  # watched by early stopping and the best checkpoint
    # (val_auroc, val_accuracy: higher is better; val_loss: lower is better)
    t.patience = 3  # epochs without improvement before stopping
    t.log_every = 10  # steps between progress lines
    t.checkpoint_every = 200  # steps between mid-epoch checkpoints (0: only at epoch ends)
    t.steps_per_epoch = -1  # -1: one pass over the train split
    t.steps_per_dispatch = 1  # train steps per call to the devices (lax.scan over stacked
    # batches): over 1 where a step takes milliseconds and the host's per-call cost shows. Runs
    # end at log and checkpoint steps: make log_every and checkpoint_every multiples of it
    t.allow_chance = False  # --mode=train exits 0 even if the best val ROC AUC's interval
    # contains 0.5 (otherwise: exit code 2, after the report is written)
    t.cache_features = "auto"  # backbone wholly frozen and no augmentation: train the head on
    # features computed once. auto: where that changes nothing; force: also EfficientNet, whose
    # drop-connect then stays off in training; off

    c.lr_find = f = ml_collections.ConfigDict()  # --mode=lr_find: the learning-rate range test
    f.min_lr = 1e-7  # the sweep's first rate
    f.max_lr = 1.0  # and its last
    f.steps = 100  # steps of the sweep (it stops early once the loss blows up)
    f.smoothing = 0.9  # exponential smoothing of the loss
    f.stop_factor = 4.0  # stop once the smoothed loss is this many times its minimum

    c.eval = e = ml_collections.ConfigDict()
    e.after_train = True  # --mode=train ends with --mode=eval's report
    e.batch_size = 64  # global eval batch (rounded up to a multiple of the device count)
    e.threshold = "youden"  # operating threshold chosen on val: youden, or sensitivity
    e.target_sensitivity = 0.9  # threshold=sensitivity: the highest threshold reaching this
    e.bootstrap = 1000  # bootstrap resamples for the 95% confidence intervals
    e.flip_tta = False  # test-time augmentation: mean probability of the image and its mirror
    e.ensemble = ""  # comma-separated workdirs scored with this one, probabilities averaged
    e.samples = 16  # images in the sample-prediction grid
    e.gradcam_per_group = 4  # Grad-CAM overlays per group (true pos., false pos., false neg.)
    e.metadata = "auto"  # CSV of per-image attributes keyed by `file` (path relative to the
    # data root) for the subgroup tables; auto: <data root>/metadata.csv if there; "": none
    e.metadata_columns = ""  # the columns to break down (default: all but file, split, label)
    e.shortcut_column = "hardware"  # a suspected shortcut: metrics without it beside overall
    e.subgroup_min_class = 5  # images of a class a subgroup metric needs (fewer: too small)
    e.boxes = "auto"  # CSV of fracture boxes (file, x_min, y_min, x_max, y_max in stored-image
    # pixels) to score Grad-CAM against; auto: <data root>/fracture_boxes.csv if there; "": none
    e.localization_overlays = 8  # Grad-CAM overlays with the boxes drawn in the report
    e.output_dir = ""  # where the report goes (default: <workdir>/eval, or for another data
    # folder than the run's, <workdir>/eval_<folder name>)

    c.export = x = ml_collections.ConfigDict()
    x.formats = "h5,keras,onnx"  # what --mode=export writes (keras and onnx need those packages)

    c.predict = p = ml_collections.ConfigDict()
    p.output = ""  # CSV path (default: <workdir>/predictions.csv)
    p.gradcam = False  # also write a Grad-CAM overlay PNG per image next to the CSV
    return c


def seed_setup(model: str) -> ml_collections.ConfigDict:
    """The seed notebook's recipe for ``model``: ImageNet weights, 260 px, batch 32, Adam 1e-4
    held for 3 epochs then multiplied by exp(-0.1) each epoch (``step_exp``), 7 epochs, early
    stopping after 3 epochs without a better val AUROC."""
    c = get_config()
    c.model.name, c.model.image_size, c.model.pretrained = model, 260, "imagenet"
    c.train.batch_size, c.optimizer.name, c.optimizer.lr = 32, "adam", 1e-4
    c.schedule.name = "step_exp"
    c.train.epochs, c.train.patience = 7, 3
    return c
