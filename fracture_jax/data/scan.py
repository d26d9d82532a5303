"""Scan and validate the seed's folder layout: <root>/{train,val,test}/{fractured,not_fractured}/.

Every file is decoded once: unreadable ones are skipped and reported with the reason, exact
duplicates (same bytes) are reported, across splits as leakage. Layout problems (a missing
split or class folder, an empty class, an unknown folder) raise ``UserError`` naming the path.
"""

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fracture_jax.data.decode import DecodeError, decode
from fracture_jax.errors import UserError

CLASS_NAMES = ("not_fractured", "fractured")  # label 0, label 1
SPLIT_SPELLINGS = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                   "test": ("test", "testing")}
CLASS_SPELLINGS = {"fractured": ("fractured",),
                   "not_fractured": ("not_fractured", "not fractured", "not-fractured")}
REQUIRED_SPLITS = ("train", "val")
LAYOUT = "<root>/{train,val,test}/{fractured,not_fractured}/<images>"
JUNK_FILES = ("__MACOSX", "Thumbs.db", "desktop.ini")  # left by archivers and file browsers


@dataclasses.dataclass
class ScanReport:
    """What a folder holds: the accepted examples per split, and everything that was not."""

    root: str
    folders: dict  # canonical split/class -> the folder name used on disk
    examples: dict  # split -> [(relative path, label, sha256)]
    skipped: list  # [(relative path, reason)]
    duplicates: list  # [[relative paths with the same bytes]]
    leakage: list  # the duplicate groups that span more than one split

    def counts(self) -> dict:
        return {s: {c: sum(1 for _, lab, _ in ex if lab == i) for i, c in enumerate(CLASS_NAMES)}
                for s, ex in self.examples.items()}

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"counts": self.counts()}


def _visible(path: Path):
    return sorted(p for p in path.iterdir() if not p.name.startswith(".")
                  and p.name not in JUNK_FILES)


def _match(name: str, spellings: dict) -> str | None:
    low = name.lower()
    return next((k for k, names in spellings.items() if low in names), None)


def find_layout(root: str | os.PathLike,
                required: tuple = REQUIRED_SPLITS) -> tuple[dict, dict]:
    """(split -> folder, "split/class" -> folder), or a ``UserError`` naming what is wrong
    (a ``required`` split missing among them)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; expected the layout {LAYOUT} "
                        "(set --config.data.root, or --config.data.synthetic=True for phantoms)")
    splits, classes = {}, {}
    for d in _visible(root):
        split = _match(d.name, SPLIT_SPELLINGS)
        if d.is_file():
            continue  # a README or manifest next to the splits is fine
        if split is None:
            raise UserError(f"{d}: unknown folder; expected only {LAYOUT}")
        if split in splits:
            raise UserError(f"{root}: both {splits[split]!r} and {d.name!r} are the {split} split")
        splits[split] = d.name
        for c in _visible(d):
            cls = _match(c.name, CLASS_SPELLINGS)
            if not c.is_dir() or cls is None:
                raise UserError(f"{c}: unknown {'folder' if c.is_dir() else 'file'} in a split; "
                                f"expected only the class folders {' and '.join(CLASS_NAMES)}")
            classes[f"{split}/{cls}"] = f"{d.name}/{c.name}"
    for split in required:
        if split not in splits:
            raise UserError(f"{root / split}: missing split folder; expected the layout {LAYOUT}")
    for split in splits:
        for cls in CLASS_NAMES:
            if f"{split}/{cls}" not in classes:
                raise UserError(f"{root / splits[split] / cls}: missing class folder")
    return splits, classes


def _check(path: Path, root: Path):
    rel = path.relative_to(root).as_posix()
    try:
        data = path.read_bytes()
        img = decode(data, rel, draft_size=256)
        if min(img.size) < 8:
            raise DecodeError(f"{rel}: image of {img.size[0]}x{img.size[1]} pixels is too small")
        return rel, hashlib.sha256(data).hexdigest(), None
    except (DecodeError, OSError) as e:
        return rel, None, str(e).removeprefix(f"{rel}: ")


def scan_folder(root: str | os.PathLike, workers: int = 4,
                required: tuple = REQUIRED_SPLITS) -> ScanReport:
    """Validate every file under ``root`` (decoding each once, in threads)."""
    root = Path(root).expanduser().resolve()
    splits, classes = find_layout(root, required)
    jobs = []
    for key, folder in classes.items():
        split, cls = key.split("/")
        files = [p for p in sorted((root / folder).rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
        jobs += [(p, split, CLASS_NAMES.index(cls)) for p in files]
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda j: _check(j[0], root), jobs))

    examples = {s: [] for s in splits}
    skipped, by_hash = [], {}
    for (_, split, label), (rel, digest, reason) in zip(jobs, results):
        if reason is not None:
            skipped.append((rel, reason))
            continue
        examples[split].append((rel, label, digest))
        by_hash.setdefault(digest, []).append(rel)
    for key, folder in classes.items():
        split, cls = key.split("/")
        if not any(lab == CLASS_NAMES.index(cls) for _, lab, _ in examples[split]):
            raise UserError(f"{root / folder}: no readable images in this class folder")
    duplicates = [paths for paths in by_hash.values() if len(paths) > 1]
    split_of = {rel: s for s, ex in examples.items() for rel, _, _ in ex}
    leakage = [g for g in duplicates if len({split_of[p] for p in g}) > 1]
    folders = dict(splits) | classes
    return ScanReport(str(root), folders, examples, skipped, duplicates, leakage)


def fingerprint(root: str | os.PathLike) -> str:
    """A cheap digest of every file's path (below ``root``), size and mtime: changes when the
    folder's content does, not when the folder moves."""
    root = Path(root).expanduser().resolve()
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
