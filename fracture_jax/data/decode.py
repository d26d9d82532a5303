"""Image bytes -> a PIL image in mode L, RGB or F (float 0-255), whatever the file format.

JPEG, PNG (8/16-bit, grayscale, RGB, RGBA, palette), BMP, TIFF and DICOM. High bit depths
(16-bit PNG/TIFF, DICOM) stay in float until the final scaling to 0-255, so no precision is
lost before resizing. CMYK, palette and other modes are converted; alpha is composited on black.
"""

import io

import numpy as np
from PIL import Image

from fracture_jax.errors import UserError

Image.MAX_IMAGE_PIXELS = 500_000_000  # large radiographs are fine; absurd headers are not
_DICOM_MAGIC = b"DICM"


class DecodeError(UserError):
    """A file that is not a readable image; the message says why."""


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == _DICOM_MAGIC


def _to_float_image(a: np.ndarray) -> Image.Image:
    """A 2-D array of any range, min-max scaled to float 0-255 (mode F)."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(a.astype(np.float32), mode="F")


def _decode_dicom(data: bytes) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    a = ds.pixel_array
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # colour DICOM (rare for X-rays)
        return Image.fromarray(a[..., :3].astype(np.uint8), "RGB")
    if a.ndim != 2:
        a = a[0]  # a multi-frame series: its first frame
    a = apply_voi_lut(apply_modality_lut(a, ds), ds)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        a = a.max() - a  # MONOCHROME1 shows low values as white
    return _to_float_image(a)


def _normalise_mode(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB", "F"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _to_float_image(np.asarray(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # palette, CMYK, YCbCr, LAB, HSV...


def decode(data: bytes, name: str = "<bytes>", draft_size: int | None = None) -> Image.Image:
    """Decode ``data``; ``draft_size`` lets JPEG decode at a reduced scale no smaller than it.

    Raises ``DecodeError`` naming ``name`` for empty, truncated, non-image or corrupt data.
    """
    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    if name.lower().endswith(".dcm") and not is_dicom(data):
        raise DecodeError(f"{name}: named .dcm but not a DICOM file (no 'DICM' marker at byte "
                          "128): export it again from the PACS, or remove it")
    try:
        if is_dicom(data):
            return _decode_dicom(data)
        img = Image.open(io.BytesIO(data))
        if draft_size and img.format == "JPEG":
            img.draft(img.mode, (draft_size, draft_size))
        img.load()
    except Exception as e:  # PIL and pydicom raise many types for bad data
        reason = str(e).split(" <_io.BytesIO")[0]  # PIL names its buffer object: noise
        raise DecodeError(f"{name}: cannot decode ({type(e).__name__}: {reason})") from None
    return _normalise_mode(img)


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) of the stored image, read from its header where the format allows."""
    if is_dicom(data):
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 (decode names the file and the reason)
        return decode(data, name).size


def to_array(img: Image.Image) -> np.ndarray:
    """A decoded image as float32 (H, W, 3) RGB in 0-255; grayscale replicated to 3 channels."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a


def resize(img: Image.Image, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` (the seed's ``image_size``), antialiased bilinear, as
    float32 (size, size, 3) 0-255."""
    return to_array(img.resize((size, size), Image.BILINEAR))
