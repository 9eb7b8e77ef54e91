"""Deterministic reference weights (docs/parity.md#deterministic-weights) as numpy arrays or a checkpoint folder.

numpy + safetensors only (no torch), so tests of the JAX port can build the
exact reference checkpoint folder for any salt and image size:

    folder/model.safetensors     general encoder (`0.model.*` WRN, `1.*` FCM/decoder)
    folder/model_1.safetensors   input embedding (`input_embedding` [12, H, W], stem, shortcut)
    folder/model_2.safetensors   the three C-MoEs (`<level>.*`)
    folder/prior_wide_resnet50_2.safetensors   frozen prior WRN (torchvision naming)

Every tensor is a function of its state-dict key, shape and a salt (`tensor`), applied to the
key/shape manifests in `tests/data/parity/manifests/`; those are for H = 128, and only
`input_embedding` depends on H, so its shape is replaced by `[12, size, size]` for other sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
PARITY_DIR = Path(os.environ.get("UNIMMAD_PARITY_DIR", REPO_ROOT / "tests" / "data" / "parity"))

# file part name (as in the fixtures' `grad/<part>/<key>`) -> (manifest, checkpoint file)
PARTS = {
    "general_multimodal_encoder": ("official_128_model.json", "model.safetensors"),
    "input_embedding": ("official_128_model_1.json", "model_1.safetensors"),
    "c_moes": ("official_128_model_2.json", "model_2.safetensors"),
}
PRIOR_MANIFEST = "prior_wide_resnet50_2.json"
PRIOR_FILE = "prior_wide_resnet50_2.safetensors"


def tensor(key: str, shape: tuple[int, ...], salt: str = "") -> np.ndarray:
    """The value of state-dict entry `key`: drawn from a generator seeded by crc32(salt + key).

    The same recipe made the fixtures on the PyTorch side, so both sides get bit-identical float32 arrays.
    """
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng(zlib.crc32((salt + key).encode()))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return np.zeros(shape, np.int64)
    if leaf == "running_mean":
        value = 0.1 * rng.standard_normal(shape)
    elif leaf == "running_var":
        value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "input_embedding":
        value = 0.02 * rng.standard_normal(shape)
    elif leaf == "experts":  # router logits, softmaxed over the bases
        value = rng.standard_normal(shape)
    elif len(shape) <= 1:  # a norm's scale around 1; a bias or a norm's shift around 0
        value = (1.0 if leaf == "weight" else 0.0) + 0.1 * rng.standard_normal(shape)
    else:  # weights scaled by 1/sqrt(fan-in); an expert basis [N, C, C, k, k] fans in over [C, k, k]
        fan_in = int(np.prod(shape[2:] if "expert_bases" in key and leaf.isdigit() else shape[1:]))
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
    return value.astype(np.float32)


def state_dict(manifest: dict[str, list[int]], salt: str = "") -> dict[str, np.ndarray]:
    """Every entry of a `{key: shape}` manifest."""
    return {key: tensor(key, shape, salt) for key, shape in manifest.items()}


def load_manifest(path: str | Path) -> dict[str, list[int]]:
    return json.loads(Path(path).read_text())


def manifests(size: int = 128, parity_dir: str | Path = PARITY_DIR) -> dict[str, dict[str, list[int]]]:
    """{part: {key: shape}} for the three checkpoint parts and `prior`, at image size `size`."""
    mdir = Path(parity_dir) / "manifests"
    out = {}
    for part, (mfile, _) in PARTS.items():
        man = dict(load_manifest(mdir / mfile))
        if "input_embedding" in man:
            man["input_embedding"] = [12, int(size), int(size)]
        out[part] = man
    out["prior"] = dict(load_manifest(mdir / PRIOR_MANIFEST))
    return out


def reference_weights(
    salt: str = "", size: int = 128, parity_dir: str | Path = PARITY_DIR
) -> dict[str, dict[str, np.ndarray]]:
    """{part: state dict} with parts general_multimodal_encoder, input_embedding, c_moes, prior."""
    if size % 32:
        raise ValueError(f"image size must be divisible by 32, got {size}")
    return {part: state_dict(man, salt) for part, man in manifests(size, parity_dir).items()}


def _contiguous(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # not np.ascontiguousarray: it would turn the 0-d `num_batches_tracked` into shape [1]
    return {k: np.require(v, requirements="C") for k, v in sd.items()}


def write_reference_checkpoint(
    folder: str | Path,
    salt: str = "",
    size: int = 128,
    prior_path: str | Path | None = None,
    parity_dir: str | Path = PARITY_DIR,
) -> dict[str, Path]:
    """Write the reference checkpoint folder (docs/model.md#reference-checkpoints) and the prior file.

    The prior file goes inside the folder unless `prior_path` says otherwise. Returns the paths."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = reference_weights(salt, size, parity_dir)
    paths = {}
    for part, (_, fname) in PARTS.items():
        p = folder / fname
        save_file(_contiguous(weights[part]), str(p))
        paths[part] = p
    prior_path = Path(prior_path) if prior_path is not None else folder / PRIOR_FILE
    prior_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(weights["prior"]), str(prior_path))
    paths["prior"] = prior_path
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--salt", default="")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--prior", default=None, help="prior file (default: inside the folder)")
    a = ap.parse_args(argv)
    for part, p in write_reference_checkpoint(a.out, a.salt, a.image_size, a.prior).items():
        print(part, p)


if __name__ == "__main__":
    main()
