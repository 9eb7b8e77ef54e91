"""Deterministic reference weights (SPEC 7/8) as numpy arrays or a checkpoint folder.

numpy + safetensors only (no torch), so tests of the JAX port can build the
exact reference checkpoint folder for any salt and image size:

    folder/model.safetensors     general encoder (`0.model.*` WRN, `1.*` FCM/decoder)
    folder/model_1.safetensors   input embedding (`input_embedding` [12, H, W], stem, shortcut)
    folder/model_2.safetensors   the three C-MoEs (`<level>.*`)
    folder/prior_wide_resnet50_2.safetensors   frozen prior WRN (torchvision naming)

The weights come from `/work/shared/parity/recipe.py` (found as
`<repo root>/../shared/parity/recipe.py`) applied to the manifests in
`parity/manifests/`; those are for H = 128, and only `input_embedding`
depends on H, so its shape is replaced by `[12, size, size]` for other sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("UNIMMAD_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))

# file part name (as in the fixtures' `grad/<part>/<key>`) -> (manifest, checkpoint file)
PARTS = {
    "general_multimodal_encoder": ("official_128_model.json", "model.safetensors"),
    "input_embedding": ("official_128_model_1.json", "model_1.safetensors"),
    "c_moes": ("official_128_model_2.json", "model_2.safetensors"),
}
PRIOR_MANIFEST = "prior_wide_resnet50_2.json"
PRIOR_FILE = "prior_wide_resnet50_2.safetensors"


def load_recipe(parity_dir: str | Path = PARITY_DIR):
    path = Path(parity_dir) / "recipe.py"
    spec = importlib.util.spec_from_file_location("parity_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def manifests(size: int = 128, parity_dir: str | Path = PARITY_DIR) -> dict[str, dict[str, list[int]]]:
    """{part: {key: shape}} for the three checkpoint parts and `prior`, at image size `size`."""
    recipe = load_recipe(parity_dir)
    mdir = Path(parity_dir) / "manifests"
    out = {}
    for part, (mfile, _) in PARTS.items():
        man = dict(recipe.load_manifest(mdir / mfile))
        if "input_embedding" in man:
            man["input_embedding"] = [12, int(size), int(size)]
        out[part] = man
    out["prior"] = dict(recipe.load_manifest(mdir / PRIOR_MANIFEST))
    return out


def reference_weights(
    salt: str = "", size: int = 128, parity_dir: str | Path = PARITY_DIR
) -> dict[str, dict[str, np.ndarray]]:
    """{part: state dict} with parts general_multimodal_encoder, input_embedding, c_moes, prior."""
    if size % 32:
        raise ValueError(f"image size must be divisible by 32, got {size}")
    recipe = load_recipe(parity_dir)
    return {part: recipe.state_dict(man, salt) for part, man in manifests(size, parity_dir).items()}


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
    """Write the SPEC 7 folder (+ the prior file, by default inside the folder). Returns the paths."""
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
