"""CPU-friendly demo: generates the synthetic phantom set and fine-tunes a small EfficientNet."""

from configs import default


def get_config():
    c = default.get_config()
    c.data.synthetic = True
    c.data.synthetic_per_class = 120
    c.data.synthetic_size = 192
    c.model.name = "efficientnetb0"
    c.model.image_size = 128
    c.model.pretrained = None  # no download needed; --config.model.pretrained=imagenet to try
    c.optimizer.lr = 1e-3
    c.schedule.name = "warmup_cosine"
    c.train.batch_size = 32
    c.train.epochs = 6
    c.train.patience = 3
    return c
