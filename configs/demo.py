"""CPU demo in minutes: generates the synthetic phantom set, trains the small CNN on it and
writes the evaluation report.

No download: the small CNN trains from random weights, on many small images (learning from
scratch needs data more than resolution). For a pretrained backbone on the same data, add
``--config.model.name=efficientnetb0 --config.model.image_size=224
--config.model.pretrained=imagenet``.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.synthetic = True
    c.data.synthetic_per_class = 3000
    c.data.synthetic_size = 96
    c.data.num_workers = 0  # two cores: decoding threads beside the training step, no processes
    c.model.name = "smallcnn"
    c.model.image_size = 96
    c.model.pretrained = None
    c.model.dropout = 0.0
    c.optimizer.lr = 2e-3
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_epochs = 0.3
    c.train.batch_size = 32
    c.train.epochs = 4
    c.train.patience = 4
    c.train.log_every = 25
    c.eval.shortcut_column = "lookalike"  # the phantoms' confounder: scored without it too
    return c
