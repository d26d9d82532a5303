"""Each image decoded and resized once: a uint8 copy of the prepared data set, read by every
epoch, every eval pass and the feature cache, so no JPEG, PNG or DICOM is decoded twice.

``prepare_decoded`` writes, beside the prepared original bytes (and so rebuilt with them when the
folder changes), one ArrayRecord file per split in ``decoded_<side>/``: record ``i`` is example
``i``'s pixels, (side, side, 3) uint8, resized as the original-bytes path resizes (PIL
bilinear, antialiased; 16-bit and DICOM images are rounded to 8 bits after resizing). Labels and
file names go to ``index.json``. The directory appears whole or not at all.
"""

import concurrent.futures
import json
import os
import shutil
from pathlib import Path

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from fracture_jax.data.decode import resize
from fracture_jax.data.decode import decode

INDEX = "index.json"
CHUNK = 256  # examples decoded at a time (their original bytes held in memory meanwhile)


class DecodedSource:
    """Random access to one split's decoded images: ``source[i]`` is ``{"image": (S, S, 3)
    uint8, "label"}``, ``source.take(indices)`` a whole batch of them in one read."""

    def __init__(self, directory: Path, split: str):
        index = json.loads((directory / INDEX).read_text())
        self.side = int(index["side"])
        self.labels = np.asarray(index["splits"][split]["labels"], np.int32)
        self.filenames = list(index["splits"][split]["filenames"])
        self.path = str(directory / f"{split}.array_record")
        self._reader = None

    @property
    def reader(self) -> ArrayRecordReader:
        if self._reader is None:  # opened lazily: the source is pickled into grain's workers
            self._reader = ArrayRecordReader(self.path, "readahead_buffer_size:0")
        return self._reader

    def __getstate__(self):
        return dict(self.__dict__, _reader=None)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        batch = self.take([index])
        return {"image": batch["image"][0], "label": batch["label"][0]}

    def take(self, indices) -> dict:
        """``{"image": (k, S, S, 3) uint8, "label": (k,)}`` of examples ``indices``."""
        indices = [int(i) for i in indices]
        pixels = b"".join(self.reader.read(indices)) if indices else b""
        images = np.frombuffer(pixels, np.uint8).reshape(len(indices), self.side, self.side, 3)
        return {"image": images, "label": self.labels[indices]}


def _name(example) -> str:
    name = example["filename"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _pixels(example, side: int) -> bytes:
    image = resize(decode(example["image"], _name(example), draft_size=2 * side), side)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).tobytes()


def prepare_decoded(dataset_dir: Path, sources: dict, side: int) -> dict:
    """The decoded copy of ``sources`` at ``side`` under ``dataset_dir`` (built now unless it
    exists): {split: DecodedSource}."""
    directory = Path(dataset_dir) / f"decoded_{side}"
    if not (directory / INDEX).is_file():
        _write(directory, sources, side)
    return {split: DecodedSource(directory, split) for split in sources}


def _write(directory: Path, sources: dict, side: int):
    partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    index = {"side": side, "splits": {}}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for split, source in sources.items():
            writer = ArrayRecordWriter(str(partial / f"{split}.array_record"), "group_size:1")
            labels, names = [], []
            for start in range(0, len(source), CHUNK):
                examples = [source[i] for i in range(start, min(start + CHUNK, len(source)))]
                for example, pixels in zip(examples, pool.map(_pixels, examples,
                                                             [side] * len(examples))):
                    writer.write(pixels)
                    labels.append(int(example["label"]))
                    names.append(_name(example))
            writer.close()
            index["splits"][split] = {"labels": labels, "filenames": names}
            logging.info("decoded the %d %s images at %d px", len(labels), split, side)
    (partial / INDEX).write_text(json.dumps(index))
    try:
        os.rename(partial, directory)  # whole or absent
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(partial, ignore_errors=True)
