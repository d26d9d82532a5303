"""ResNet50 at 260 px, batch 32, Adam 1e-4, 7 epochs: the seed notebook's setup."""

from configs import default


def get_config():
    c = default.get_config()
    c.model.name = "resnet50"
    c.model.image_size = 260
    c.model.pretrained = "imagenet"
    c.train.batch_size = 32
    c.optimizer.lr = 1e-4
    c.train.epochs = 7
    c.train.patience = 3
    return c
