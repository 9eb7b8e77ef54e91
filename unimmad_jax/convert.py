"""PyTorch weights -> Flax variables: torchvision/timm WideResNet priors and reference checkpoints.

    python -m unimmad_jax.convert prior --weights wide_resnet50_2.safetensors --out DIR
    python -m unimmad_jax.convert official --checkpoint-dir CKPT --prior FILE --image-size 256 --out DIR

Every tensor is placed by one declarative key map (`reference_key_map`), used both ways:
checkpoints into Flax variables, and Flax gradients back into the reference layout
(for the parity comparison).  Unknown, missing or mis-shaped keys are errors that name
the file, the key and both shapes; the keys the reference never uses are skipped silently
(docs/model.md#reference-checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import numpy as np

from unimmad_jax import model_io
from unimmad_jax.models.unimmad import ModelConfig, abstract_variables

REFERENCE_FILES = {"model": "model.safetensors", "model_1": "model_1.safetensors", "model_2": "model_2.safetensors"}
"""The parts of a reference checkpoint folder: general encoder + FCM/decoder, input embedding, C-MoEs."""

GRADIENT_PARTS = {"model": "general_multimodal_encoder", "model_1": "input_embedding", "model_2": "c_moes"}
"""The names the parity fixtures give the reference's files."""

UNUSED_KEYS = re.compile(r"(^|\.)num_batches_tracked$|^(0\.model\.)?(layer4|fc)\.|^\d+\.(conv_out_second|prior_head)\.")
"""Keys the reference stores but never uses: layer4 and fc of the WideResNets, unused heads, BN counters."""

# How a PyTorch tensor is laid out in Flax: a transposition, or a 1x1 conv taken as a matrix.
LAYOUTS = {
    "conv": (2, 3, 1, 0),  # [O, I, kh, kw] (conv-transpose [I, O, kh, kw]) -> [kh, kw, I, O] ([kh, kw, O, I])
    "linear": (1, 0),  # [O, I] -> [I, O]
    "bases": (0, 3, 4, 2, 1),  # [N, O, I, k, k] -> [N, k, k, I, O]
    "embedding": (1, 2, 0),  # [C, H, W] -> [H, W, C]
    "same": None,  # vectors and the leader experts' logits [R, N, C]
}


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One tensor: where it is in the reference (`part`, `key`) and in the Flax variables."""

    part: str
    key: str
    collection: str
    path: tuple[str, ...]
    layout: str

    def to_flax(self, value: np.ndarray) -> np.ndarray:
        if self.layout == "matrix":  # a 1x1 conv weight [O, I, 1, 1] used as the matrix [I, O]
            return value[:, :, 0, 0].T
        axes = LAYOUTS[self.layout]
        return value if axes is None else value.transpose(axes)

    def to_reference(self, value: np.ndarray) -> np.ndarray:
        if self.layout == "matrix":
            return value.T[:, :, None, None]
        axes = LAYOUTS[self.layout]
        return value if axes is None else value.transpose(np.argsort(axes))


class _Builder:
    """Appends the key entries of one reference part, under a torch key prefix and a Flax path."""

    def __init__(self, entries: list[KeyEntry], part: str, prefix: str, path: tuple[str, ...]):
        self.entries, self.part, self.prefix, self.path = entries, part, prefix, path

    def add(self, key: str, layout: str, *path: str, collection: str = "params") -> None:
        self.entries.append(KeyEntry(self.part, self.prefix + key, collection, self.path + path, layout))

    def conv(self, prefix: str, *path: str, bias: bool = False) -> None:
        self.add(f"{prefix}.weight", "conv", *path, "kernel")
        if bias:
            self.add(f"{prefix}.bias", "same", *path, "bias")

    def norm(self, prefix: str, *path: str, running: bool = False) -> None:
        """GroupNorm, or with `running` a BatchNorm with its statistics."""
        self.add(f"{prefix}.weight", "same", *path, "scale")
        self.add(f"{prefix}.bias", "same", *path, "bias")
        if running:
            self.add(f"{prefix}.running_mean", "same", *path, "mean", collection="batch_stats")
            self.add(f"{prefix}.running_var", "same", *path, "var", collection="batch_stats")

    def conv_norm_act(self, prefix: str, *path: str) -> None:
        """A reference `Sequential(conv, Sequential(GroupNorm, ReLU))`."""
        self.conv(f"{prefix}.0", *path, "conv")
        self.norm(f"{prefix}.1.0", *path, "norm")


def _wide_resnet(b: _Builder, cfg: ModelConfig) -> None:
    b.conv("conv1", "conv1")
    b.norm("bn1", "bn1", running=True)
    for stage, blocks in enumerate(cfg.blocks):
        for block in range(blocks):
            t, f = f"layer{stage + 1}.{block}.", f"layer{stage + 1}_{block}"
            for i in (1, 2, 3):
                b.conv(f"{t}conv{i}", f, f"conv{i}")
                b.norm(f"{t}bn{i}", f, f"bn{i}", running=True)
            if block == 0:
                b.conv(f"{t}downsample.0", f, "downsample_conv")
                b.norm(f"{t}downsample.1", f, "downsample_bn", running=True)


def _embedding(b: _Builder, cfg: ModelConfig) -> None:
    b.add("input_embedding", "embedding", "input_embedding")
    for i in range(len(cfg.embedding_widths)):
        b.conv(f"stem.{3 * i}", f"stem_conv{i}", bias=True)
        b.norm(f"stem.{3 * i + 1}", f"stem_bn{i}", running=True)
    last = len(cfg.embedding_widths)
    b.conv(f"stem.{3 * last}", f"stem_conv{last}", bias=True)
    b.conv("shortcut", "shortcut", bias=True)


def _feature_decompressor(b: _Builder, cfg: ModelConfig) -> None:
    for level, name in ((0, "down_level0"), (1, "down_level1"), (2, "up_level2")):
        t = f"conv_x{level + 1}.0."
        for i in (1, 2):
            b.conv(f"{t}conv{i}", name, f"conv{i}")
            b.norm(f"{t}bn{i}", name, f"bn{i}", running=True)
        if level < 2:
            b.conv(f"{t}downsample", name, "shortcut")
        else:
            b.conv(f"{t}upsample", name, "shortcut", bias=True)
    for k in (1, 3, 5):
        t, f = f"bn{k}.", f"bottleneck_k{k}"
        for level in range(3):
            b.conv(f"{t}b{level + 1}.dw", f, f"level{level}", "depthwise")
            b.conv(f"{t}b{level + 1}.pw", f, f"level{level}", "pointwise", "conv")
            b.norm(f"{t}b{level + 1}.na.0", f, f"level{level}", "pointwise", "norm")
        b.conv(f"{t}post.0", f, "post_conv", bias=True)
        b.norm(f"{t}post.1.0", f, "post", "norm")
    b.conv_norm_act("out_bn3.proj", "fuse")
    b.conv_norm_act("out_bn3.head", "head")
    for stage, blocks in enumerate(cfg.blocks):
        for block in range(blocks):
            t, f = f"decoder.layer{stage + 1}.{block}.", f"decoder{stage + 1}_{block}"
            for i in (1, 2, 3):
                b.conv(f"{t}conv{i}", f, f"conv{i}")
                b.norm(f"{t}bn{i}", f, f"bn{i}", running=True)
            if block == 0:
                b.conv(f"{t}upsample.0", f, "upsample_conv")
                b.norm(f"{t}upsample.1", f, "upsample_bn", running=True)
    for level in range(3):
        b.conv(f"final.{level}", f"final{level}")


def _cross_moe(b: _Builder, cfg: ModelConfig) -> None:
    b.conv_norm_act("conv_share", "key")
    b.conv_norm_act("conv_prior", "query")
    b.conv("conv_cond.0.0", "cond_conv")
    b.norm("conv_cond.0.1", "cond_bn", running=True)
    b.norm("conv_cond.1.0", "cond_act", "norm")
    b.conv("conv_cond.2", "cond_proj", "conv")
    b.norm("conv_cond.3.0", "cond_proj", "norm")
    for branch, k in enumerate(cfg.moe_kernels):
        t, f = f"MoEs.{branch}.", f"mimoe_k{k}"
        b.add(f"{t}soft_expert", "conv", f, "fixed_expert")
        b.add(f"{t}experts", "same", f, "leader_logits")
        b.add(f"{t}gate.gate.weight", "linear", f, "router", "gate", "kernel")
        b.add(f"{t}gate.gate.bias", "same", f, "router", "gate", "bias")
        b.conv_norm_act(f"{t}pre", f, "pre")
        b.add(f"{t}post.0.weight", "matrix", f, "post")
        b.norm(f"{t}post.1.0", f, "post_norm", "norm")
        b.add(f"expert_bases.{branch}", "bases", f"base_k{k}")
    b.conv_norm_act("conv_out_first", "out")


def prior_key_map(cfg: ModelConfig) -> list[KeyEntry]:
    """The tensors of a torchvision/timm WideResNet file that make the frozen prior."""
    entries: list[KeyEntry] = []
    _wide_resnet(_Builder(entries, "prior", "", ("prior",)), cfg)
    return entries


def reference_key_map(cfg: ModelConfig) -> list[KeyEntry]:
    """Every tensor of a reference checkpoint folder plus its prior file."""
    entries = prior_key_map(cfg)
    _wide_resnet(_Builder(entries, "model", "0.model.", ("encoder",)), cfg)
    _feature_decompressor(_Builder(entries, "model", "1.", ("fcm",)), cfg)
    _embedding(_Builder(entries, "model_1", "", ("embedding",)), cfg)
    for level in range(3):
        _cross_moe(_Builder(entries, "model_2", f"{level}.", (f"cmoe{level}",)), cfg)
    return entries


class ConversionError(ValueError):
    """A checkpoint does not fit the model: the message names the file, the key and the shapes."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays: `.safetensors`, or `.pth`/`.pt` when torch is installed.

    A `.pth` is read with `weights_only=True`: it never unpickles arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as error:
            raise ConversionError(
                f"{path}: reading a PyTorch pickle needs torch, which is not installed; "
                f"convert it to .safetensors, or install torch"
            ) from error
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    raise ConversionError(f"{path}: unknown weight format {path.suffix!r} (expected .safetensors or .pth)")


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, prefix + (name,))
        else:
            yield prefix + (name,)


def to_variables(
    entries: list[KeyEntry],
    state_dicts: Mapping[str, Mapping[str, np.ndarray]],
    expected: Mapping,
    sources: Mapping[str, str],
) -> dict:
    """Place the tensors of `state_dicts` (by part) into Flax variables shaped like `expected`.

    `sources` names each part's file for the error messages.
    """
    variables: dict = {}
    for entry in entries:
        source, tensors = sources[entry.part], state_dicts[entry.part]
        want = _get(expected, (entry.collection,) + entry.path).shape
        want_reference = entry.to_reference(np.empty(want, np.float32)).shape
        if entry.key not in tensors:
            raise ConversionError(
                f"{source}: missing key {entry.key!r} (the model expects shape {list(want_reference)})"
            )
        value = np.asarray(tensors[entry.key])
        if value.shape != want_reference:
            raise ConversionError(
                f"{source}: key {entry.key!r} has shape {list(value.shape)}, the model expects {list(want_reference)}"
            )
        _set(variables, (entry.collection,) + entry.path, entry.to_flax(value).astype(np.float32))
    for part, tensors in state_dicts.items():
        placed = {e.key for e in entries if e.part == part}
        unknown = sorted(k for k in tensors if k not in placed and not UNUSED_KEYS.search(k))
        if unknown:
            raise ConversionError(
                f"{sources[part]}: {len(unknown)} unexpected key(s), e.g. "
                f"{unknown[:5]} (with shapes {[list(tensors[k].shape) for k in unknown[:5]]})"
            )
    wanted = {p for p in _leaf_paths(expected)}
    if not {p for p in _leaf_paths(variables)} >= wanted:
        missing = sorted("/".join(p) for p in wanted - set(_leaf_paths(variables)))
        raise ConversionError(f"the key map does not cover {missing[:5]}")
    return variables


def _select(tree: Mapping, roots: tuple[str, ...]) -> dict:
    return {c: {r: tree[c][r] for r in roots if r in tree[c]} for c in tree}


def convert_prior(weights: str | Path, cfg: ModelConfig | None = None) -> dict:
    """A torchvision/timm WideResNet state dict -> the prior's variables (`params`/`batch_stats` under `prior`)."""
    cfg = cfg or ModelConfig()
    expected = _select(abstract_variables(cfg), ("prior",))
    return to_variables(prior_key_map(cfg), {"prior": read_state_dict(weights)}, expected, {"prior": str(weights)})


def convert_official(
    checkpoint_dir: str | Path, prior: str | Path, image_size: int, cfg: ModelConfig | None = None
) -> tuple[ModelConfig, dict]:
    """A reference checkpoint folder and its prior file -> (model config, all variables)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConversionError(
            f"{checkpoint_dir}: not a folder (expected a reference checkpoint folder "
            f"with {', '.join(REFERENCE_FILES.values())})"
        )
    cfg = dataclasses.replace(cfg or ModelConfig(), image_size=image_size)
    sources = {part: str(checkpoint_dir / name) for part, name in REFERENCE_FILES.items()}
    sources["prior"] = str(prior)
    state_dicts = {part: read_state_dict(path) for part, path in sources.items()}
    return cfg, to_variables(reference_key_map(cfg), state_dicts, abstract_variables(cfg), sources)


def to_reference_layout(entries: list[KeyEntry], tree: Mapping) -> dict[str, np.ndarray]:
    """Flax-shaped arrays (e.g. gradients of `params`) -> `{"<fixture part>/<reference key>": array}`."""
    out = {}
    for entry in entries:
        if entry.collection != "params" or entry.part not in GRADIENT_PARTS:
            continue
        value = np.asarray(_get(tree, entry.path))
        out[f"{GRADIENT_PARTS[entry.part]}/{entry.key}"] = entry.to_reference(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimmad_jax.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prior = commands.add_parser("prior", help="a torchvision/timm wide_resnet50_2 state dict -> prior variables")
    prior.add_argument("--weights", required=True, help=".safetensors (or .pth with torch installed)")
    prior.add_argument("--out", required=True, help="output folder (orbax)")
    official = commands.add_parser("official", help="a reference checkpoint folder + prior -> a model checkpoint")
    official.add_argument("--checkpoint-dir", required=True, help="folder with model{,_1,_2}.safetensors")
    official.add_argument("--prior", required=True, help="the prior WideResNet file")
    official.add_argument("--image-size", required=True, type=int, help="the image size the checkpoint was trained at")
    official.add_argument("--out", required=True, help="output folder (orbax)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prior":
            cfg = ModelConfig()
            variables = convert_prior(args.weights, cfg)
            model_io.save(args.out, cfg, variables, kind="prior")
        else:
            cfg, variables = convert_official(args.checkpoint_dir, args.prior, args.image_size)
            model_io.save(args.out, cfg, variables, kind="model")
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    count = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
    print(f"wrote {args.out}: {count / 1e6:.1f} M parameters ({args.command})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
