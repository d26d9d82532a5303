"""EfficientNetB2 with the seed notebook's recipe (see `default.seed_setup`)."""

from configs import default


def get_config():
    return default.seed_setup("efficientnetb2")
