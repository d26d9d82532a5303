"""CPU demo in minutes: generates the synthetic phantom set and trains the small CNN on it.

No download: the small CNN trains from random weights. For the real thing on the same data,
add ``--config.model.name=efficientnetb0 --config.model.pretrained=imagenet``.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.synthetic = True
    c.data.synthetic_per_class = 1000
    c.data.synthetic_size = 128
    c.model.name = "smallcnn"
    c.model.image_size = 128
    c.model.pretrained = None
    c.model.dropout = 0.0
    c.optimizer.lr = 3e-3
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_epochs = 0.5
    c.train.batch_size = 32
    c.train.epochs = 12
    c.train.patience = 12
    return c
