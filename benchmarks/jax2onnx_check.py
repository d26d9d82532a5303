"""Can the jax2onnx library export our classifiers, to 1e-5 of our forward pass?

``fracture_jax/export/onnx_graph.py`` translates the classifier's jaxpr to ONNX by hand; this
script checks whether the jax2onnx library would do instead. One JSON line per model: whether
the export ran, onnxruntime's largest relative deviation from the jitted JAX forward pass on
one random image, or the error.

jax2onnx pins ``orbax-checkpoint<0.11.37`` (ours: 0.12.8), so it goes into a folder of its own:

    pip install --no-deps --target /tmp/j2o jax2onnx onnx-ir equinox jaxtyping wadler-lindig \
        dm-pix chex toolz sympy mpmath
    PYTHONPATH=.:/tmp/j2o python benchmarks/jax2onnx_check.py [--models smallcnn,efficientnetb2]
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from fracture_jax.kernels import portable  # noqa: E402
from fracture_jax.models.builder import initial_variables  # noqa: E402
from fracture_jax.models.classifier import FractureClassifier  # noqa: E402

SIZES = {"smallcnn": 64, "efficientnetb2": 260, "resnet50": 224, "vgg16": 224}


def check(name: str) -> dict:
    import jax2onnx
    import onnxruntime as ort

    config = default.get_config()
    config.model.name, config.model.image_size, config.model.pretrained = name, SIZES[name], None
    variables, _ = initial_variables(config, jax.random.key(0))
    model = FractureClassifier(model=name, dropout_rate=0.0)

    def probability(images):
        return jax.nn.sigmoid(model.apply(variables, images, train=False))

    size = SIZES[name]
    x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    start = time.perf_counter()
    try:
        with portable():
            reference = np.asarray(jax.jit(probability)(x))
            proto = jax2onnx.to_onnx(probability, [x.shape], model_name=name)
        session = ort.InferenceSession(proto.SerializeToString())
        out = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as e:  # noqa: BLE001 (what failed is the finding)
        return {"model": name, "exported": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    deviation = float(np.max(np.abs(out - reference) / np.maximum(np.abs(reference), 1e-12)))
    return {"model": name, "exported": True, "max_rel_deviation": deviation,
            "within_1e-5": deviation <= 1e-5, "seconds": round(time.perf_counter() - start, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default=",".join(SIZES))
    for name in p.parse_args().models.split(","):
        print(json.dumps(check(name)), flush=True)


if __name__ == "__main__":
    main()
