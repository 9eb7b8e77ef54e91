"""What `tpu_compile.py` and `gpu_compile.py` share: the step lowered from shapes alone, and of the
compiled HLO the bytes by instruction and model layer, the collectives and the library calls."""

from __future__ import annotations

import collections
import os
import re


def compile_for_tpu_here() -> None:
    """Set up this process to compile for a TPU without one; call it before importing JAX.

    JAX itself runs on the CPU and must not look for a TPU; the TPU_* variables only silence libtpu's
    start-up warnings about the (absent) TPU host.  No TPU is held, so libtpu's one-process lockfile
    (/tmp/libtpu_lockfile) must not stop a second compile.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\](?:\{([^}]*)\})?")
MEMORY_SPACE = re.compile(r"S\((\d+)\)")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
NO_TRAFFIC = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id"}
NO_TRAFFIC |= {f"{c}-done" for c in COLLECTIVES} | {"copy-done", "slice-done", "opt-barrier"}
CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
FUSION_KIND = re.compile(r'"fusion_backend_config":\{"kind":"([^"]+)"')
NOT_LAYERS = {"UniMMAD", "checkpoint", "remat", "rematted_computation", "shard_map"}
NOT_LAYERS |= {"train_step", "score_step", "loss_fn"}


def arrays(text: str) -> list[tuple[int, int]]:
    """The arrays of an HLO shape (a tuple's, in order): their bytes (layouts and tiling ignored) and
    memory space (0, HBM, unless the layout names another: S(1) is the TPU's on-chip memory)."""
    found = []
    for dtype, dims, layout in SHAPE.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        space = MEMORY_SPACE.search(layout)
        found.append((count * DTYPE_BYTES[dtype], int(space.group(1)) if space else 0))
    return found


def shape_bytes(text: str) -> int:
    """Bytes of an HLO shape (a tuple's: all its elements), layouts and tiling ignored."""
    return sum(size for size, _ in arrays(text))


def hbm_bytes(text: str) -> int:
    """Bytes of the arrays of an HLO shape that live in HBM (memory space 0)."""
    return sum(size for size, space in arrays(text) if space == 0)


def layer_of(metadata: str) -> str:
    """The model layer an instruction comes from: the module path of its `op_name`, " (backward)" for a
    gradient, without JAX's transformations, its primitive and the repetitions that rematerialising adds."""
    match = re.search(r'op_name="([^"]*)"', metadata)
    if not match:
        return "(no source)"
    tokens = match.group(1).split("/")[1:-1]
    backward = any(t.startswith("transpose(") for t in tokens)
    path = []
    for token in tokens:
        while re.fullmatch(r"\w+\((.*)\)", token):
            token = re.fullmatch(r"\w+\((.*)\)", token).group(1)
        if re.fullmatch(r"\w+", token) and token not in NOT_LAYERS:
            path.append(token)
    for size in range(len(path) // 2, 0, -1):  # A/B/A/B/C -> A/B/C
        for start in range(len(path) - 2 * size + 1):
            if path[start : start + size] == path[start + size : start + 2 * size]:
                del path[start : start + size]
                break
    return ("/".join(path) or "(step)") + (" (backward)" if backward else "")


def hlo_traffic(hlo: str) -> tuple[list[dict], list[dict]]:
    """The instructions of the compiled module's non-fused computations, with the bytes they read and
    write (operands + result: what XLA's cost model counts for a fusion), and its collectives."""
    fused = set(re.findall(r"calls=%([\w.\-]+)", hlo))
    shapes, instructions, collectives = {}, [], []
    computation = ""
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if header:
            computation = header.group(1)
            continue
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands, rest = match.groups()
        shapes[name] = shape
        operand_shapes = [shapes.get(o, "") for o in re.findall(r"%([\w.\-]+)", operands)]
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not computation.startswith("all-reduce-scatter"):
            # Also inside fusions (the TPU wraps some in asynchronous custom calls).
            sent = shape_bytes(shape) if base == opcode else sum(map(shape_bytes, operand_shapes))
            collectives.append({"opcode": base, "bytes": sent})
        elif re.search(r"calls=%all-reduce-scatter", rest):
            # The TPU's reduce-scatter: an all-reduce and each device's slice of it, fused.
            collectives.append({"opcode": "reduce-scatter", "bytes": sum(map(shape_bytes, operand_shapes))})
        if computation in fused or opcode in NO_TRAFFIC or 'custom_call_target="ConcatBitcast"' in rest:
            continue  # ConcatBitcast joins slices already side by side in on-chip memory
        if opcode in ("copy-start", "slice-start"):
            # Asynchronous moves: a copy's result is (destination, source, context), a slice's
            # ((operand), slice, context); each reads and writes the moved array once.
            result = arrays(shape)
            source, (moved, destination) = (result[1], result[0]) if opcode == "copy-start" else (result[0], result[-2])
            total, in_hbm = 2 * moved, moved * ((source[1] == 0) + (destination == 0))
        else:
            total = sum(map(shape_bytes, operand_shapes)) + shape_bytes(shape)
            in_hbm = sum(map(hbm_bytes, operand_shapes)) + hbm_bytes(shape)
        layer = layer_of(rest)
        if layer == "(no source)" and opcode in ("copy-start", "slice-start") and "S(1)" in shape:
            # The TPU compiler's own prefetches and evictions between HBM and on-chip memory (memory space 1).
            layer = "(on-chip memory copies)"
        entry = {"name": name, "opcode": opcode, "layer": layer, "bytes": total, "hbm_bytes": in_hbm}
        instructions.append(entry)
    return instructions, collectives


def hlo_summary(hlo: str, top: int) -> dict:
    """The compiled module's collectives (count, bytes), the bytes its instructions access in all and in
    HBM, and the `top` instructions and layers by bytes accessed."""
    instructions, collectives = hlo_traffic(hlo)
    per_collective = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for c in collectives:
        per_collective[c["opcode"]]["count"] += 1
        per_collective[c["opcode"]]["bytes"] += c["bytes"]
    per_layer = collections.defaultdict(lambda: {"bytes": 0, "hbm_bytes": 0})
    for i in instructions:
        per_layer[i["layer"]]["bytes"] += i["bytes"]
        per_layer[i["layer"]]["hbm_bytes"] += i["hbm_bytes"]
    return {
        "collectives": dict(per_collective),
        "instruction_bytes": sum(i["bytes"] for i in instructions),
        "instruction_hbm_bytes": sum(i["hbm_bytes"] for i in instructions),
        "top_instructions": sorted(instructions, key=lambda i: -i["bytes"])[:top],
        "top_layers": [{"layer": k, **v} for k, v in sorted(per_layer.items(), key=lambda kv: -kv[1]["bytes"])[:top]],
    }


def print_hlo_summary(result: dict) -> None:
    for opcode, c in sorted(result["collectives"].items()):
        print(f"collective {opcode}: {c['count']} ops, {c['bytes'] / 2**20:.1f} MiB")
    print(
        f"the compiled instructions read and write {result['instruction_bytes'] / 1e9:.2f} GB, "
        f"{result['instruction_hbm_bytes'] / 1e9:.2f} GB of it in HBM"
    )
    print("bytes accessed by layer (operands + results of the compiled instructions; in HBM):")
    for entry in result["top_layers"]:
        print(f"  {entry['bytes'] / 1e9:8.3f} GB  {entry['hbm_bytes'] / 1e9:8.3f} GB  {entry['layer']}")
    print("largest instructions (bytes; in HBM):")
    for entry in result["top_instructions"]:
        print(
            f"  {entry['bytes'] / 1e9:8.3f} GB  {entry['hbm_bytes'] / 1e9:8.3f} GB  "
            f"{entry['opcode']:<12} {entry['name']:<28} {entry['layer']}"
        )


def kernel_counts(hlo: str) -> dict:
    """Library calls and generated kernels in a compiled GPU module, each instruction counted once
    however often it runs: custom calls by target, custom fusions by kind, and their totals by library."""
    targets = collections.Counter(CUSTOM_CALL.findall(hlo))
    fusions = collections.Counter(FUSION_KIND.findall(hlo))
    return {
        "cudnn_convolutions": sum(n for t, n in targets.items() if t.startswith("__cudnn$conv")),
        "cublas_gemms": sum(n for t, n in targets.items() if t.startswith("__cublas")),
        "triton_fusions": sum(n for k, n in fusions.items() if k.startswith("__triton")),
        "custom_calls": dict(targets.most_common()),
        "fusion_kinds": dict(fusions.most_common()),
    }


def train_pair_budget(config, mesh, global_batch: int) -> int | None:
    """The pairs per device of the packed train step `main` runs (`data.pack_pairs`), from the prepared
    indexes or the builders' declarations (`dealing.training_records`); None without packing."""
    from unimmad_jax.data.dealing import choose_pair_budget, training_records
    from unimmad_jax.sharding import DATA_AXIS

    if not config.data.pack_pairs:
        return None
    keys, counts, _ = training_records(config)
    return choose_pair_budget(keys, counts, global_batch, mesh.shape[DATA_AXIS], config.data.num_slots).pairs


def abstract_inputs(config, mode: str, mesh, model, global_batch: int):
    """ShapeDtypeStructs (with shardings) of the step's arguments, as the loop and evaluation pass them."""
    import jax
    import jax.numpy as jnp

    from unimmad_jax import sharding, train
    from unimmad_jax.models.unimmad import abstract_variables

    replicated = sharding.replicated(mesh)
    batch = train.abstract_batch(config, mesh, global_batch, train_pair_budget(config, mesh, global_batch))
    if mode == "eval":
        variables = abstract_variables(model.config, config.data.num_slots)
        variables = sharding.placed(variables, sharding.state_sharding(variables, mesh, fsdp=False))
        return variables, batch["specific_images"], batch["modality_mask"], None
    abstract = train.abstract_train_state(model, config, steps_per_epoch=1)
    state = sharding.placed(abstract, sharding.state_sharding(abstract, mesh, config.train.fsdp))
    return state, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)


def accelerator_forms(config) -> None:
    """Compile the accelerator's layer forms: "auto" picks by the backend JAX runs on, which is the CPU here."""
    if config.model.conv_impl == "auto":
        config.model.conv_impl = "native"


def tpu_topology(name: str, chip_config: str | None = None):
    """A deviceless TPU topology, e.g. "v5e:2x4", or "v4:2x2x2" with chip config "megacore"."""
    from jax.experimental import topologies

    options = {"chip_config_name": chip_config} if chip_config else {}
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **options)


def topology_mesh(topology):
    """The data mesh of a deviceless topology's devices, on the axis the model splits its batch over."""
    from jax.experimental import topologies

    from unimmad_jax.sharding import DATA_AXIS

    return topologies.make_mesh(topology, (len(topology.devices),), (DATA_AXIS,))


def lower_step(config, mode: str, mesh, global_batch: int):
    """The step `unimmad_jax.main` runs (train) or evaluation's scoring step (eval), lowered from shapes alone."""
    from unimmad_jax import evaluate, sharding, train
    from unimmad_jax.config import loss_config, model_config
    from unimmad_jax.models.unimmad import UniMMAD

    model = UniMMAD(model_config(config))
    inputs = abstract_inputs(config, mode, mesh, model, global_batch)
    if mode == "train":
        placement = sharding.state_sharding(inputs[0], mesh, config.train.fsdp)
        step = train.make_train_step(model, loss_config(config), mesh, placement)
    else:
        step = evaluate.make_score_fn(model, mesh)
    return step.trace(*inputs).lower()


def compile_step(config, mode: str, mesh, global_batch: int):
    """The compiled step, or the compiler's message when it does not fit (or does not compile)."""
    import jax

    try:
        return lower_step(config, mode, mesh, global_batch).compile(), None
    except jax.errors.JaxRuntimeError as error:
        return None, str(error)


def step_description(config, mode: str, topology: str, device_kind: str, devices: int, global_batch: int) -> dict:
    """What a report compiled: the step, the devices, the batch and the model's settings."""
    return {
        "topology": topology,
        "device_kind": device_kind,
        "devices": devices,
        "mode": mode,
        "global_batch": global_batch,
        "batch_per_device": global_batch // devices,
        "conv_impl": config.model.conv_impl,
        "dtype": config.model.dtype,
        "image_size": config.image_size,
        "num_slots": config.data.num_slots,
        "pack_pairs": config.data.pack_pairs,
        "fsdp": config.train.fsdp,
    }


def roofline(flops: float, traffic: float, peak_flops: float, bytes_per_s: float, images_per_device: float) -> dict:
    """The step's lower bound on one device: its FLOPs at peak FLOP/s or its bytes at peak bandwidth."""
    compute_s, memory_s = flops / peak_flops, traffic / bytes_per_s
    step_s = max(compute_s, memory_s)
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "step_s": step_s,
        "bound": "memory" if memory_s > compute_s else "compute",
        "images_per_s_per_device": images_per_device / step_s,
    }


TEMPORARIES_OVER_HBM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMG])\) exceeds available HBM")


def compiler_peak(error: str | None, argument_bytes: float) -> float | None:
    """The peak HBM a step that does not fit would need: the temporaries the TPU compiler's
    out-of-memory message names, plus the arguments (the train state and the batch)."""
    match = TEMPORARIES_OVER_HBM.search(error or "")
    if not match:
        return None
    return float(match.group(1)) * 1024 ** (1 + "KMG".index(match.group(2))) + argument_bytes


def next_batch(low: int, high: int | None, peaks: dict[int, float], hbm: float) -> int:
    """The next per-device batch to try, strictly between the largest batch that fits (`low`) and
    the smallest that does not (`high`): where the line through two known peaks meets the chip's
    HBM (`low`'s and `high`'s, else the two nearest `low`), at most double `low`.  Peak memory grows
    about linearly with the batch until the compiler starts rematerialising, where it flattens;
    without a rising line the search doubles or bisects."""
    if high in peaks and low in peaks:
        nearest = [low, high]
    else:
        nearest = sorted(peaks, key=lambda b: (abs(b - low), -b))[:2]
    guess = 2 * low if high is None else (low + high) // 2
    if len(nearest) == 2:
        (b1, m1), (b2, m2) = sorted((b, peaks[b]) for b in nearest)
        if m2 > m1:
            guess = b1 + int((hbm - m1) // ((m2 - m1) / (b2 - b1)))
    return max(low + 1, min(guess, 2 * low if high is None else high - 1))
