"""Data: folder validation with a corpus of bad files, decoding, the TFDS copy, grain pipelines."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from fracture_jax.data.builder import data_sources, dataset_dir, prepare
from fracture_jax.data.decode import DecodeError, decode, resize, to_array
from fracture_jax.data.decoded import prepare_decoded
from fracture_jax.data.pipeline import (cached_train_dataset, eval_dataset, example_at,
                                        train_dataset)
from fracture_jax.data.scan import find_layout, scan_folder
from fracture_jax.data.synthetic import phantom, write_phantoms
from fracture_jax.errors import UserError


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(array) -> bytes:
    return _save(Image.fromarray(array), "PNG")  # uint16 arrays make 16-bit PNGs


def _jpeg(img: Image.Image) -> bytes:
    return _save(img, "JPEG", quality=90)


def _dicom(pixels: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


GRADIENT = np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (48, 1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder in the seed's layout holding good images and every kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    gray = Image.fromarray(phantom(rng, 96, fractured=True))
    good_jpeg = _jpeg(gray)
    files = {
        "train/fractured/good.jpg": good_jpeg,
        "train/fractured/cmyk.jpg": _jpeg(gray.convert("RGB").convert("CMYK")),
        "train/fractured/sixteen.png": _png(GRADIENT),
        "train/fractured/rgba.png": _png(np.dstack([np.asarray(gray.convert("RGB")),
                                                    np.full((96, 96), 200, np.uint8)])),
        "train/fractured/palette.png": _save(gray.convert("P"), "PNG"),
        "train/fractured/scan.dcm": _dicom(GRADIENT[:, :48], "MONOCHROME1", slope=2.0, intercept=-10),
        "train/fractured/huge.jpg": _jpeg(Image.new("L", (10_000, 10_000), 90)),
        "train/not_fractured/good.bmp": _save(gray, "BMP"),
        "train/not_fractured/good.tif": _save(gray, "TIFF"),
        "train/not_fractured/truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "train/not_fractured/empty.jpg": b"",
        "train/not_fractured/notes.jpg": b"this is a text file named .jpg\n" * 10,
        "val/fractured/copy_of_train.jpg": good_jpeg,  # leakage: same bytes as a train image
        "val/not_fractured/v.png": _png(phantom(rng, 64)),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_bad_files_are_reported_good_ones_kept(corpus):
    report = scan_folder(corpus)
    skipped = dict(report.skipped)
    assert set(skipped) == {"train/not_fractured/truncated.jpg", "train/not_fractured/empty.jpg",
                            "train/not_fractured/notes.jpg"}
    assert "empty" in skipped["train/not_fractured/empty.jpg"]
    assert "truncated" in skipped["train/not_fractured/truncated.jpg"]
    kept = {rel: label for split in report.examples.values() for rel, label, _ in split}
    assert kept == {"train/fractured/good.jpg": 1, "train/fractured/cmyk.jpg": 1,
                    "train/fractured/sixteen.png": 1, "train/fractured/rgba.png": 1,
                    "train/fractured/palette.png": 1, "train/fractured/scan.dcm": 1,
                    "train/fractured/huge.jpg": 1, "train/not_fractured/good.bmp": 0,
                    "train/not_fractured/good.tif": 0, "val/fractured/copy_of_train.jpg": 1,
                    "val/not_fractured/v.png": 0}
    assert report.leakage == [["train/fractured/good.jpg", "val/fractured/copy_of_train.jpg"]]


def test_every_good_file_decodes_to_rgb_0_255(corpus):
    for path in corpus.rglob("*"):
        if path.is_file() and path.name not in ("truncated.jpg", "empty.jpg", "notes.jpg"):
            a = to_array(decode(path.read_bytes(), path.name, draft_size=128))
            assert a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.float32, path.name
            assert 0 <= a.min() and a.max() <= 255, path.name


def test_sixteen_bit_keeps_its_range_until_scaling(corpus):
    img = decode((corpus / "train/fractured/sixteen.png").read_bytes())
    assert img.mode == "F"
    row = np.asarray(img)[0]
    assert row[0] == 0 and row[-1] == pytest.approx(255) and len(np.unique(row)) == 64


def test_dicom_rescale_and_monochrome1_inversion(corpus):
    img = np.asarray(decode((corpus / "train/fractured/scan.dcm").read_bytes()))
    row = img[0]
    assert row[0] == pytest.approx(255) and row[-1] == pytest.approx(0)  # inverted
    assert np.all(np.diff(row) <= 0)


def test_decode_errors_name_the_file():
    with pytest.raises(DecodeError, match="x.jpg: empty file"):
        decode(b"", "x.jpg")
    with pytest.raises(DecodeError, match="y.png: cannot decode"):
        decode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "y.png")


def test_layout_errors_name_the_path(tmp_path, phantom_root):
    with pytest.raises(UserError, match="does not exist"):
        find_layout(tmp_path / "nope")
    root = tmp_path / "r"
    shutil.copytree(phantom_root, root)
    shutil.rmtree(root / "val")
    with pytest.raises(UserError, match=r"val: missing split folder"):
        find_layout(root)
    shutil.copytree(phantom_root / "val", root / "valid")
    (root / "train" / "maybe").mkdir()
    with pytest.raises(UserError, match=r"train/maybe: unknown folder"):
        find_layout(root)
    (root / "train" / "maybe").rmdir()
    (root / "extras").mkdir()
    with pytest.raises(UserError, match=r"extras: unknown folder"):
        find_layout(root)
    (root / "extras").rmdir()
    shutil.move(root / "test" / "not_fractured", root / "test" / "not fractured")
    splits, classes = find_layout(root)
    assert splits["val"] == "valid" and classes["test/not_fractured"] == "test/not fractured"
    for f in (root / "test" / "fractured").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"test/fractured: no readable images"):
        scan_folder(root)


def test_real_xrays_are_loaded_with_their_labels(xray_root, tmp_path):
    report = prepare(str(xray_root), str(tmp_path / "tfds"))
    sources = data_sources(str(tmp_path / "tfds"))
    for split, examples in report.examples.items():
        assert len(sources[split]) == len(examples)
        for rel, label, _ in examples:
            assert rel.split("/")[1] == ("fractured" if label else "not_fractured")
    assert not report.skipped
    src = sources["val"]
    ex = src[0]
    name = ex["filename"].decode() if isinstance(ex["filename"], bytes) else ex["filename"]
    assert (xray_root / name).read_bytes() == ex["image"]  # the original bytes, lossless
    assert int(ex["label"]) == (0 if "not_fractured" in name else 1)


def test_prepare_is_a_noop_when_unchanged_and_rebuilds_when_changed(phantom_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    prepare(str(root), str(tmp_path / "tfds"))
    shard = next((tmp_path / "tfds").rglob("*train.array_record*"))
    mtime = shard.stat().st_mtime_ns
    prepare(str(root), str(tmp_path / "tfds"))
    assert shard.stat().st_mtime_ns == mtime
    extra = root / "train" / "fractured" / "new.jpg"
    shutil.copy(next((root / "train" / "fractured").glob("*.jpg")), extra)
    report = prepare(str(root), str(tmp_path / "tfds"))
    assert len(data_sources(str(tmp_path / "tfds"))["train"]) == 25
    assert any("new.jpg" in " ".join(g) for g in report.duplicates)


@pytest.fixture(scope="module")
def sources(phantom_root, tmp_path_factory):
    """The phantoms decoded once at 48 px."""
    out = tmp_path_factory.mktemp("tfds")
    prepare(str(phantom_root), str(out))
    return prepare_decoded(dataset_dir(out), data_sources(str(out)), 48)


def test_decoded_once_as_the_original_bytes_path_resizes(phantom_root, tmp_path):
    """The stored uint8 images are the decoded, resized originals (the phantoms are 8-bit:
    exactly); kept while the folder is unchanged, one copy per side, rebuilt with the folder."""
    prepare(str(phantom_root), str(tmp_path))
    originals = data_sources(str(tmp_path))
    decoded = prepare_decoded(dataset_dir(tmp_path), originals, 40)
    for split in ("train", "val", "test"):
        assert len(decoded[split]) == len(originals[split])
        for i in (0, len(originals[split]) - 1):
            ex, name = originals[split][i], decoded[split].filenames[i]
            want = resize(decode(ex["image"], name, draft_size=80), 40)
            assert decoded[split][i]["image"].dtype == np.uint8
            np.testing.assert_array_equal(decoded[split][i]["image"], want)
            assert int(decoded[split][i]["label"]) == int(ex["label"])
            assert name == ex["filename"].decode()
    stored = dataset_dir(tmp_path) / "decoded_40" / "train.array_record"
    mtime = stored.stat().st_mtime_ns
    prepare_decoded(dataset_dir(tmp_path), originals, 40)
    assert stored.stat().st_mtime_ns == mtime  # decoded once
    prepare_decoded(dataset_dir(tmp_path), originals, 56)
    assert sorted(p.name for p in dataset_dir(tmp_path).glob("decoded_*")) == [
        "decoded_40", "decoded_56"]
    assert not list(dataset_dir(tmp_path).glob("*.partial"))


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_deterministic_and_resumes_exactly(sources, workers):
    def stream():
        return iter(train_dataset(sources["train"], 8, seed=3, num_workers=workers))
    a, b = stream(), stream()
    first, second = _take(a, 4), _take(b, 4)
    for x, y in zip(first, second):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert first[0]["image"].shape == (8, 48, 48, 3) and first[0]["image"].dtype == np.uint8
    state = a.get_state()
    expected = _take(a, 3)
    c = stream()
    c.set_state(state)
    for x, y in zip(expected, _take(c, 3)):
        assert np.array_equal(x["image"], y["image"])
    other = iter(train_dataset(sources["train"], 8, seed=4))
    assert not np.array_equal(next(other)["image"], first[0]["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_cover_every_example_and_reshuffle(sources, workers):
    n = len(sources["train"])  # 24
    it = iter(train_dataset(sources["train"], 8, seed=0, num_workers=workers))
    epochs = [np.concatenate([next(it)["label"] for _ in range(n // 8)]) for _ in range(2)]
    labels = np.array([int(sources["train"][i]["label"]) for i in range(n)])
    assert sorted(epochs[0]) == sorted(labels) == sorted(epochs[1])
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


@pytest.mark.parametrize("batch", [1, 5, 8, 16, 64])
def test_eval_sees_each_example_exactly_once(sources, batch):
    src = sources["val"]
    batches = list(eval_dataset(src, batch))
    assert all(b["image"].shape[0] == batch for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == len(src) and mask[: len(src)].all()
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert labels.tolist() == [int(src[i]["label"]) for i in range(len(src))]


def test_phantoms_are_deterministic(tmp_path):
    a = write_phantoms(tmp_path / "a", per_class=4, size=48, seed=7)
    b = write_phantoms(tmp_path / "b", per_class=4, size=48, seed=7)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.*") if p.name[0] != ".")
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.*") if p.name[0] != ".")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert len([f for f in files_a if f.parts[0] == "train"]) == 8
    c = write_phantoms(tmp_path / "c", per_class=4, size=48, seed=8)
    assert (c / files_a[0]).read_bytes() != (a / files_a[0]).read_bytes()


@pytest.mark.parametrize("skip", [0, 4])
def test_skipped_batches_continue_the_same_stream(sources, skip):
    """A later phase's stream (``skip_batches``) is the rest of the phase before's, and the
    cached-feature stream follows it example for example."""
    whole = _take(iter(train_dataset(sources["train"], 8, seed=2)), skip + 3)
    later = _take(iter(train_dataset(sources["train"], 8, seed=2, skip_batches=skip)), 3)
    for x, y in zip(whole[skip:], later):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    src = sources["train"]
    features = np.stack([example_at(src, i)[0].ravel() for i in range(len(src))])
    labels = np.array([int(src[i]["label"]) for i in range(len(src))], np.int32)
    plain = _take(iter(train_dataset(src, 8, seed=2, skip_batches=skip)), 5)
    cached = _take(iter(cached_train_dataset(features, labels, 8, seed=2, skip_batches=skip)), 5)
    for x, y in zip(plain, cached):
        assert np.array_equal(x["image"].reshape(8, -1), y["image"])
        assert np.array_equal(x["label"], y["label"])
