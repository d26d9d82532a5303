"""Loading Keras weight files: every problem reported by name; downloads verified and atomic."""

import hashlib
import http.server
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from keras_reference import keras_model, save_legacy_h5

from fracture_jax.models.registry import WeightsFile
from fracture_jax.weights import WeightsError, backbone_variables, download, fetch_published
from fracture_jax.weights import read_layers, resolve_weights


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    return save_legacy_h5(keras_model("vgg16", 64), tmp_path_factory.mktemp("w") / "vgg.h5")


def _copy_h5(src, dst, edit):
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        for name in f:
            f.copy(f[name], g, name)
        edit(g)
    return dst


def test_reads_layers_in_keras_order(vgg_file):
    layers = read_layers(vgg_file)
    assert list(layers)[:2] == ["block1_conv1", "block1_conv2"]
    assert [a.shape for a in layers["block1_conv1"]] == [(3, 3, 3, 64), (64,)]


def test_file_for_another_model_is_named_as_such(vgg_file):
    with pytest.raises(WeightsError, match="another model") as e:
        backbone_variables("resnet50", vgg_file)
    assert "conv1_conv" in str(e.value) and "block1_conv1" in str(e.value)


def test_misshaped_array_is_reported_by_name(vgg_file, tmp_path):
    def edit(g):
        del g["block3_conv2/block3_conv2/kernel"]
        g["block3_conv2/block3_conv2/kernel"] = np.zeros((3, 3, 256, 128), "f4")
    bad = _copy_h5(vgg_file, tmp_path / "bad.h5", edit)
    with pytest.raises(WeightsError, match=r"block3_conv2/kernel: shape \(3, 3, 256, 128\)"):
        backbone_variables("vgg16", bad)


def test_missing_and_unexpected_layers_are_listed(vgg_file, tmp_path):
    def edit(g):
        names = [n for n in g.attrs["layer_names"]
                 if n not in ("block5_conv3", b"block5_conv3")] + ["extra_dense"]
        g.attrs["layer_names"] = [str(n) for n in names]
        g.create_group("extra_dense").attrs["weight_names"] = [b"extra_dense/kernel:0"]
        g["extra_dense/extra_dense/kernel:0"] = np.zeros((2, 2), "f4")
    bad = _copy_h5(vgg_file, tmp_path / "bad.h5", edit)
    with pytest.raises(WeightsError) as e:
        backbone_variables("vgg16", bad)
    msg = str(e.value)
    assert "missing from the file (1): block5_conv3" in msg
    assert "unexpected in the file (1): extra_dense" in msg


@pytest.mark.parametrize("content,match", [(b"", "not a readable HDF5"),
                                           (b"hello, not hdf5", "not a readable HDF5")])
def test_not_an_h5_file(tmp_path, content, match):
    p = tmp_path / "w.h5"
    p.write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        backbone_variables("vgg16", p)


def test_truncated_h5_file(vgg_file, tmp_path):
    p = tmp_path / "cut.h5"
    p.write_bytes(Path(vgg_file).read_bytes()[:50_000])
    with pytest.raises(WeightsError, match="cut.h5"):
        backbone_variables("vgg16", p)


def test_keras3_weights_layout_is_explained(tmp_path):
    p = tmp_path / "model.weights.h5"
    with h5py.File(p, "w") as f:
        f.create_group("layers")
    with pytest.raises(WeightsError, match="not a legacy Keras weights file"):
        backbone_variables("vgg16", p)


class _Server:
    """A loopback HTTP server serving ``files`` (path -> bytes); ``cut`` paths stop midway."""

    def __init__(self, files, cut=()):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in cut else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    payload = bytes(range(256)) * 4096
    s = _Server({"/w.h5": payload, "/cut.h5": payload}, cut={"/cut.h5"})
    s.payload, s.md5 = payload, hashlib.md5(payload).hexdigest()
    yield s
    s.close()


def test_download_verifies_and_renames(server, tmp_path):
    dest = download(server.url + "/w.h5", tmp_path / "w.h5", server.md5)
    assert dest.read_bytes() == server.payload
    assert list(tmp_path.iterdir()) == [dest]


def test_download_with_wrong_hash_leaves_nothing(server, tmp_path):
    with pytest.raises(WeightsError, match="md5"):
        download(server.url + "/w.h5", tmp_path / "w.h5", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing(server, tmp_path):
    with pytest.raises(WeightsError, match="nothing was kept"):
        download(server.url + "/cut.h5", tmp_path / "w.h5", server.md5)
    assert list(tmp_path.iterdir()) == []


def test_file_url_and_cache(server, tmp_path):
    src = tmp_path / "src.h5"
    src.write_bytes(server.payload)
    spec = WeightsFile("w.h5", src.as_uri(), server.md5)
    cache = tmp_path / "cache"
    first = fetch_published(spec, cache)
    src.unlink()  # the cached, verified copy is used from now on
    assert fetch_published(spec, cache) == first
    first.write_bytes(b"corrupted")  # a bad cached copy is fetched again, which now fails
    with pytest.raises(WeightsError):
        fetch_published(spec, cache)


def test_offline_without_local_file_names_file_and_key(tmp_path):
    spec = WeightsFile("efficientnetb2_notop.h5", "http://127.0.0.1:9/x.h5", "0" * 32)
    with pytest.raises(WeightsError) as e:
        fetch_published(spec, tmp_path)
    assert "efficientnetb2_notop.h5" in str(e.value)
    assert "--config.model.pretrained=" in str(e.value)


def test_resolve_weights(tmp_path, monkeypatch):
    assert resolve_weights("vgg16", None) is None
    assert resolve_weights("vgg16", "None") is None  # as --config.model.pretrained=None gives it
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights("vgg16", str(tmp_path / "nope.h5"))
    local = tmp_path / "mine.h5"
    local.write_bytes(b"x")
    assert resolve_weights("vgg16", str(local)) == local
    monkeypatch.setattr("fracture_jax.weights.hub.fetch_published",
                        lambda file, cache: Path(cache) / file.filename)
    assert resolve_weights("resnet50", "imagenet", tmp_path).name == \
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
