"""Getting the published Keras weight files: cache, md5 check, atomic download, offline use."""

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from fracture_jax.models import get_spec
from fracture_jax.models.registry import WeightsFile
from fracture_jax.weights.keras_h5 import WeightsError

DEFAULT_CACHE = Path(os.environ.get("FRACTURE_JAX_CACHE", "~/.cache/fracture_jax")).expanduser()


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, md5: str | None = None, timeout: float = 60) -> Path:
    """Fetch ``url`` (http, https or file) to ``dest`` atomically, verifying ``md5``.

    The bytes go to a temporary file beside ``dest`` that is renamed only once complete and
    verified, so a killed or failed download never leaves a file that looks complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if md5 is not None and h.hexdigest() != md5:
            raise WeightsError(f"{url}: md5 {h.hexdigest()} != expected {md5}; the download is "
                               "corrupt or not the published file (nothing was kept)")
        os.replace(tmp, dest)
    except http.client.HTTPException as e:  # the connection closed before the announced end
        Path(tmp).unlink(missing_ok=True)
        raise WeightsError(f"{url}: the download was cut off ({e!r}); nothing was kept") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def fetch_published(file: WeightsFile, cache_dir: str | os.PathLike = DEFAULT_CACHE,
                    url: str | None = None) -> Path:
    """The cached, md5-verified copy of a published file, downloading it when needed."""
    dest = Path(cache_dir).expanduser() / file.filename
    if dest.is_file():
        if md5sum(dest) == file.md5:
            return dest
        logging.warning("%s fails its md5 check; fetching it again", dest)
    try:
        return download(url or file.url, dest, file.md5)
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(
            f"cannot fetch {file.filename} from {url or file.url} ({e}). Download it on a "
            f"machine with network access, then either put it at {dest} or set "
            f"--config.model.pretrained=/path/to/{file.filename}") from None


def resolve_weights(model: str, pretrained: str | None, cache_dir: str | os.PathLike = DEFAULT_CACHE,
                    include_top: bool = False) -> Path | None:
    """The weights file for ``pretrained``: None (random init), 'imagenet' or a local path."""
    if not pretrained or str(pretrained).lower() in ("none", "random"):
        return None  # the command line gives the string "None"
    if pretrained == "imagenet":
        spec = get_spec(model)
        if spec.notop is None:
            raise WeightsError(f"{spec.name} has no published ImageNet weights; "
                               "set model.pretrained=None")
        return fetch_published(spec.top if include_top else spec.notop, cache_dir)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.pretrained={pretrained!r}: no such file; give a Keras .h5 "
                           "weights file, 'imagenet', or None for random init")
    return path
