"""Download, for another machine with no network, the wheels fracture_jax needs beyond what a
CUDA JAX image already has (Python 3.12, x86-64 Linux): grain, tensorflow-datasets, Keras and
the rest, with their own missing dependencies, at the versions pinned in requirements*.txt.

    python benchmarks/fetch_wheels.py .whl      # then carry .whl/ and install with --no-deps
"""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

WANTED = ["grain", "tensorflow-datasets", "array-record", "ml-collections", "keras", "pydicom",
          "tensorboardx"]
# What such an image provides already (installing a second copy would shadow it).
PROVIDED = set("""absl-py attrs certifi charset-normalizer chex click cloudpickle etils flax fsspec
h5py idna jax jaxlib jinja2 markdown-it-py markupsafe matplotlib ml-dtypes msgpack numpy onnx
onnxruntime opt-einsum optax orbax-checkpoint packaging pillow protobuf psutil pyarrow pygments
pyyaml requests rich scikit-learn scipy setuptools six tensorstore tqdm typing-extensions
urllib3 wrapt zipp""".split()) | {"typing"}  # "typing": a backport that would shadow the stdlib
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
ROOT = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict:
    found = {}
    for req in ("requirements.txt", "requirements-export.txt"):
        for line in (ROOT / req).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                found[norm(name)] = version
    return found


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]
            for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line]


def download(spec: str, out: Path) -> list[Path]:
    before = set(out.iterdir())
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out)]
    subprocess.run(pip + ["--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", *plat, spec], capture_output=True)
    new = set(out.iterdir()) - before
    if not new:  # a pure-Python package published as source only: build its wheel here
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                        spec], check=True, capture_output=True)
        new = set(out.iterdir()) - before
    return sorted(new)


def main(out_dir: str):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    versions, todo, seen = pins(), list(WANTED), set()
    while todo:
        name = norm(todo.pop())
        if name in seen or name in PROVIDED:
            continue
        seen.add(name)
        for wheel in download(f"{name}=={versions[name]}" if name in versions else name, out):
            todo += requirements(wheel)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{len(list(out.glob('*.whl')))} wheels, {size:.1f} MiB in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".whl")
