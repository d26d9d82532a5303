"""Data: folder scan and validation, the TFDS dataset, grain pipelines, synthetic phantoms."""
