"""PyTorch weights -> Flax variables: torchvision/timm WideResNet priors and reference checkpoints.

    python -m unimmad_jax.convert prior --weights wide_resnet50_2.safetensors --out DIR
    python -m unimmad_jax.convert official --checkpoint-dir CKPT --prior FILE --image-size 256 --out DIR
    python -m unimmad_jax.convert to-reference --checkpoint WORKDIR|MODEL --out DIR

Every tensor is placed by one declarative key map (`reference_key_map`), used both ways:
checkpoints into Flax variables, and Flax variables (or gradients) back into the reference
layout: the parity comparison and `to-reference`, which writes the reference's checkpoint files.
Unknown, missing or mis-shaped keys are errors that name the file, the key and both shapes;
the keys the reference never uses are skipped silently on the way in and written as
placeholders on the way out (docs/model.md#reference-checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from etils import epath

from unimmad_jax import model_io, weights
from unimmad_jax.models.unimmad import ModelConfig, abstract_variables
from unimmad_jax.models.wide_resnet import EXPANSION

REFERENCE_FILES = {"model": "model.safetensors", "model_1": "model_1.safetensors", "model_2": "model_2.safetensors"}
"""The parts of a reference checkpoint folder: general encoder + FCM/decoder, input embedding, C-MoEs."""

PRIOR_FILE = "wide_resnet50_2.safetensors"
"""The prior's file in a folder written by `to-reference` (torchvision naming)."""

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


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays: `.safetensors`, or `.pth`/`.pt` when torch is installed.

    A `.pth` is read with `weights_only=True`: it never unpickles arbitrary objects.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        import safetensors.numpy

        return safetensors.numpy.load(path.read_bytes())
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as error:
            raise ConversionError(
                f"{path}: reading a PyTorch pickle needs torch, which is not installed; "
                f"convert it to .safetensors, or install torch"
            ) from error
        with path.open("rb") as file:
            state = torch.load(file, map_location="cpu", weights_only=True)
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


def convert_prior(weights_file: epath.PathLike, cfg: ModelConfig | None = None) -> dict:
    """A torchvision/timm WideResNet state dict -> the prior's variables (`params`/`batch_stats` under `prior`)."""
    cfg = cfg or ModelConfig()
    expected = _select(abstract_variables(cfg), ("prior",))
    state_dicts, sources = {"prior": read_state_dict(weights_file)}, {"prior": str(weights_file)}
    return to_variables(prior_key_map(cfg), state_dicts, expected, sources)


def convert_official(
    checkpoint_dir: epath.PathLike, prior: epath.PathLike, image_size: int, cfg: ModelConfig | None = None
) -> tuple[ModelConfig, dict]:
    """A reference checkpoint folder and its prior file -> (model config, all variables)."""
    checkpoint_dir = epath.Path(checkpoint_dir)
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


def to_reference_layout(entries: list[KeyEntry], variables: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """Flax variables -> `{part: {reference key: array}}` for every entry whose collection `variables` holds
    (pass `{"params": grads}` for gradients)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for entry in entries:
        if entry.collection in variables:
            value = np.asarray(_get(variables, (entry.collection,) + entry.path))
            out.setdefault(entry.part, {})[entry.key] = entry.to_reference(value)
    return out


def check_reference_widths(cfg: ModelConfig) -> None:
    """The reference builds the paper's widths only (any image size): fail naming every field that differs."""
    reference = ModelConfig(image_size=cfg.image_size)
    differing = [
        f"model.{f.name}={getattr(cfg, f.name)!r} (the reference: {getattr(reference, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name != "dtype" and getattr(cfg, f.name) != getattr(reference, f.name)
    ]
    if differing:
        raise ConversionError(
            "the reference code cannot load this model: it builds only the paper's widths and depths, and "
            + ", ".join(differing)
        )


def _placeholder(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor the reference stores but never uses: zero weights, identity BatchNorms, no batches tracked."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return np.zeros((), np.int64)
    is_bn_scale = leaf == "weight" and len(shape) == 1
    return np.full(shape, 1.0 if leaf == "running_var" or is_bn_scale else 0.0, np.float32)


def _unused_layer4(prefix: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """torchvision's layer4 of the WideResNet (3 bottlenecks at twice the last stage's planes)."""
    planes = 2 * cfg.planes[-1]
    width, out, inplanes = cfg.width_factor * planes, EXPANSION * planes, EXPANSION * cfg.planes[-1]
    shapes = {}
    for block in range(3):
        t = f"{prefix}layer4.{block}."
        convs = {"conv1": (width, inplanes if block == 0 else out, 1, 1), "conv2": (width, width, 3, 3)}
        convs["conv3"] = (out, width, 1, 1)
        norms = {"bn1": width, "bn2": width, "bn3": out}
        if block == 0:
            convs["downsample.0"] = (out, inplanes, 1, 1)
            norms["downsample.1"] = out
        shapes.update({f"{t}{name}.weight": shape for name, shape in convs.items()})
        for name, channels in norms.items():
            shapes.update(
                {f"{t}{name}.{leaf}": (channels,) for leaf in ("weight", "bias", "running_mean", "running_var")}
            )
    return shapes


def unused_reference_tensors(cfg: ModelConfig) -> dict[str, dict[str, np.ndarray]]:
    """`{part: {key: placeholder}}`: what a reference checkpoint holds besides the key map: layer4 of both
    WideResNets, the prior's classifier, the C-MoEs' unused heads and every BatchNorm's counter
    (docs/model.md#reference-checkpoints)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {
        "prior": {**_unused_layer4("", cfg), "fc.weight": (1000, EXPANSION * 2 * cfg.planes[-1]), "fc.bias": (1000,)},
        "model": _unused_layer4("0.model.", cfg),
        "model_1": {},
        "model_2": {
            f"{level}.{head}.{leaf}": (1, cfg.moe_dim, 1, 1) if leaf == "weight" else (1,)
            for level in range(3)
            for head in ("conv_out_second", "prior_head")
            for leaf in ("weight", "bias")
        },
    }
    running = [(e.part, e.key) for e in reference_key_map(cfg) if e.key.endswith(".running_mean")]
    running += [(part, k) for part, keys in shapes.items() for k in keys if k.endswith(".running_mean")]
    for part, key in running:
        shapes[part][key.removesuffix("running_mean") + "num_batches_tracked"] = ()
    return {part: {k: _placeholder(k, shape) for k, shape in keys.items()} for part, keys in shapes.items()}


def reference_state_dicts(cfg: ModelConfig, variables: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """All variables of a model -> the reference's four state dicts `{part: {key: float32 array}}`, every key
    of the reference's files included: what `load_state_dict(strict=True)` needs."""
    check_reference_widths(cfg)
    state = to_reference_layout(reference_key_map(cfg), variables)
    for part, tensors in unused_reference_tensors(cfg).items():
        state.setdefault(part, {}).update(tensors)
    # np.require, not np.ascontiguousarray: the latter turns a 0-d `num_batches_tracked` into shape [1]
    return {
        part: {
            k: np.require(v if v.dtype == np.int64 else v.astype(np.float32, copy=False), requirements="C")
            for k, v in d.items()
        }
        for part, d in state.items()
    }


def save_reference(cfg: ModelConfig, variables: Mapping, out: epath.PathLike) -> dict[str, epath.Path]:
    """Write `model.safetensors`, `model_1.safetensors`, `model_2.safetensors` and the prior as
    `wide_resnet50_2.safetensors` into `out`; returns the paths by part."""
    import safetensors.numpy

    state = reference_state_dicts(cfg, variables)
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {part: out / name for part, name in {**REFERENCE_FILES, "prior": PRIOR_FILE}.items()}
    for part, path in paths.items():
        path.write_bytes(safetensors.numpy.save(state[part]))
    return paths


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
    to_reference = commands.add_parser(
        "to-reference", help="a trained or converted model -> the reference's checkpoint files"
    )
    to_reference.add_argument(
        "--checkpoint", required=True, help="a training workdir (its latest checkpoint) or a model folder"
    )
    to_reference.add_argument(
        "--out", required=True, help=f"output folder: {', '.join(REFERENCE_FILES.values())}, {PRIOR_FILE}"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "prior":
            cfg = ModelConfig()
            variables = convert_prior(args.weights, cfg)
            model_io.save(args.out, cfg, variables, kind="prior")
        elif args.command == "official":
            cfg, variables = convert_official(args.checkpoint_dir, args.prior, args.image_size)
            model_io.save(args.out, cfg, variables, kind="model")
        else:
            cfg, variables = weights.recorded_model(args.checkpoint)
            paths = save_reference(cfg, variables, args.out)
            print(f"wrote {', '.join(str(p) for p in paths.values())} (image size {cfg.image_size})")
            return 0
    except (ConversionError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    count = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
    print(f"wrote {args.out}: {count / 1e6:.1f} M parameters ({args.command})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
