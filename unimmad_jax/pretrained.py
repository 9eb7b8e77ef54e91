"""The frozen prior's weights, by name (`train.prior`), for a run that starts fresh.

- `imagenet`: the file the authors' code loads, timm's `wide_resnet50_2.tv2_in1k` (torchvision's
  IMAGENET1K_V2) `model.safetensors`, downloaded once from the Hugging Face Hub into its cache
  (`HF_HOME`; `HF_ENDPOINT` names a mirror, `HF_HUB_OFFLINE=1` never reaches the network) and
  checked against the size and SHA-256 the hub states;
- a path: a torchvision/timm WideResNet-50-2 state dict (`.safetensors`, or `.pth` with torch), or
  a folder of `python -m unimmad_jax.convert prior`;
- `random`: none; `weights.random_variables` draws it.

Process 0 checks a file (every key and shape of the configured WideResNet) and keeps a copy in
`WORKDIR/prior/`, which every process then reads and converts: the workdir is shared or `gs://`,
while each host's Hugging Face cache (or a path on it) is its own.
"""

from __future__ import annotations

import hashlib
import os
import re

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from unimmad_jax import convert, model_io, sharding
from unimmad_jax.config import model_config
from unimmad_jax.models.unimmad import ModelConfig, abstract_variables

IMAGENET = "imagenet"
RANDOM = "random"
IMAGENET_REPO = "timm/wide_resnet50_2.tv2_in1k"
IMAGENET_FILE = "model.safetensors"
PRIOR_FOLDER = "prior"
"""Where in the workdir process 0 keeps a copy of the prior's file for every process to read."""
SHA256 = re.compile(r"[0-9a-f]{64}")


class PriorError(ValueError):
    """`train.prior` cannot be had: the message names it, the file and what to do."""


def prior_variables(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict | None:
    """`{"params": {"prior": ...}, "batch_stats": {"prior": ...}}` of `train.prior` as numpy arrays, the same on
    every process; None for `random`.  A file is copied into `workdir` (module docstring); a folder must be
    readable from every process."""
    source = config.train.prior
    if source == RANDOM:
        return None
    cfg = model_config(config)
    where = f"train.prior={source}"
    if source != IMAGENET and epath.Path(source).is_dir():  # read by every process, as the data are
        if sharding.is_main_process():
            print(f"The prior: the weights of {source} ({where})")
        return read_prior(source, cfg, where)
    suffix = epath.Path(IMAGENET_FILE if source == IMAGENET else source).suffix
    copy = epath.Path(workdir) / PRIOR_FOLDER / f"wide_resnet50_2{suffix}"
    variables, failure = None, None
    if sharding.is_main_process():
        try:
            path = source_file(source)
            variables = converted(path, source, cfg)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
        except Exception as error:  # raised below, once the other processes know
            failure = error
    # Every process learns whether process 0 succeeded: a failure stops them all, none waits forever.
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(failure is not None)):
        failure = failure or PriorError(f"{where}: process 0 could not get the prior; its output says why")
    if failure is not None:
        raise failure
    if variables is None:
        variables = converted(copy, source, cfg)
    return variables


def source_file(source: str) -> epath.Path:
    """The WideResNet file of `train.prior`: the ImageNet file for `imagenet`, else the file at `source`."""
    where = f"train.prior={source}"
    if source == IMAGENET:
        path = epath.Path(imagenet_file())
        print(f"The prior: ImageNet weights ({where}: {IMAGENET_REPO}, {IMAGENET_FILE} in {path})")
    else:
        path = epath.Path(source)
        if not path.is_file():
            raise PriorError(
                f"{where}: no such file or folder; train.prior is '{IMAGENET}', '{RANDOM}', a WideResNet-50-2 "
                "state dict (.safetensors, or .pth with torch) or a folder of `python -m unimmad_jax.convert prior`"
            )
        print(f"The prior: the weights of {path} ({where})")
    return path


def converted(path: epath.Path, source: str, cfg: ModelConfig) -> dict:
    """The prior's variables of the WideResNet file at `path`, checked against the configured model."""
    try:
        return convert.convert_prior(path, cfg)
    except convert.ConversionError as error:
        paper = ModelConfig()
        hint = (
            f" (the ImageNet WideResNet-50-2 has the paper's model.planes={paper.planes}, model.blocks={paper.blocks})"
        )
        raise PriorError(f"train.prior={source}: {error}{hint if source == IMAGENET else ''}") from error


def read_prior(folder: epath.PathLike, cfg: ModelConfig, where: str) -> dict:
    """The prior's variables of a `convert prior` folder, checked against the configured model."""
    kind, _, variables = model_io.load(folder)
    if kind != "prior":
        raise PriorError(f"{where}: {folder} holds a {kind}, not a prior (a complete model is train.init_from's)")
    expected = abstract_variables(cfg)
    model_io.check_compatible(variables, {c: {"prior": expected[c]["prior"]} for c in expected}, where)
    return variables


def imagenet_file() -> str:
    """The ImageNet prior's file in this host's Hugging Face cache, downloaded if it is not there yet, and checked
    against the SHA-256 the hub stated for it."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(IMAGENET_REPO, IMAGENET_FILE)
    if isinstance(cached, str):  # a cached file answers without a request to the hub
        path = cached
    else:
        try:
            path = huggingface_hub.hf_hub_download(IMAGENET_REPO, IMAGENET_FILE)
        # Whatever stops the download (offline, no route, an HTTP error, a body cut short), the run stops the same
        # way; huggingface_hub leaves nothing of a failed download in its cache.
        except Exception as error:
            raise PriorError(_unavailable(error)) from error
    _check_hash(path)
    return path


def _unavailable(error: Exception) -> str:
    from huggingface_hub import constants

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else str(error).splitlines()[0]
    url = f"{constants.ENDPOINT}/{IMAGENET_REPO}/resolve/main/{IMAGENET_FILE}"
    return (
        f"train.prior={IMAGENET}: {IMAGENET_REPO} {IMAGENET_FILE} is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and could not be downloaded ({reason}). Fetch it where there is a network, "
        f"with `hf download {IMAGENET_REPO} {IMAGENET_FILE} --local-dir DIR` or from {url}, and pass "
        f"--config.train.prior=DIR/{IMAGENET_FILE} (or copy that Hugging Face cache here)"
    )


def _check_hash(path: str) -> None:
    """The file's SHA-256 against its blob's name in the cache, which is the hash the hub stated (a file
    kept in Git LFS); a mismatch removes the file from the cache.  huggingface_hub checks only the size."""
    blob = os.path.realpath(path)
    stated = os.path.basename(blob)
    if not SHA256.fullmatch(stated):  # not an LFS file: its name is a Git hash
        return
    digest = hashlib.sha256()
    with open(blob, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != stated:
        for name in (path, blob):
            if os.path.lexists(name):
                os.unlink(name)
        raise PriorError(
            f"train.prior={IMAGENET}: {path} has SHA-256 {digest.hexdigest()}, the hub states {stated}: "
            "removed from the cache; run again to download it anew"
        )
