import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PARITY, load_config

from unimmad_jax import checkpoints, convert, model_io, train, weights
from unimmad_jax.models.unimmad import ModelConfig, abstract_variables


def reference_state_dicts(cfg, rng):
    """Random tensors in the reference layout for every key of the key map, by part."""
    expected = abstract_variables(cfg)
    state = {}
    for entry in convert.reference_key_map(cfg):
        shape = convert._get(expected, (entry.collection,) + entry.path).shape
        value = rng.standard_normal(shape).astype(np.float32)
        state.setdefault(entry.part, {})[entry.key] = entry.to_reference(value)
    return state, expected


SOURCES = {part: f"{part}.safetensors" for part in ("prior", "model", "model_1", "model_2")}


def test_key_map_is_exactly_the_reference_manifests():
    cfg = ModelConfig(image_size=128)
    expected = abstract_variables(cfg)
    files = {
        "model": "official_128_model",
        "model_1": "official_128_model_1",
        "model_2": "official_128_model_2",
        "prior": "prior_wide_resnet50_2",
    }
    entries = convert.reference_key_map(cfg)
    for part, name in files.items():
        manifest = json.loads((PARITY / "manifests" / f"{name}.json").read_text())
        used = {k: v for k, v in manifest.items() if not convert.UNUSED_KEYS.search(k)}
        ours = {e.key: e for e in entries if e.part == part}
        assert set(ours) == set(used), part
        for key, entry in ours.items():
            flax_shape = convert._get(expected, (entry.collection,) + entry.path).shape
            assert list(entry.to_reference(np.empty(flax_shape)).shape) == used[key], key
    skipped = [
        k
        for name in files.values()
        for k in json.loads((PARITY / "manifests" / f"{name}.json").read_text())
        if convert.UNUSED_KEYS.search(k)
    ]
    assert any("layer4" in k for k in skipped) and any("prior_head" in k for k in skipped)
    assert all(
        "layer4" in k or "fc." in k or "num_batches_tracked" in k or "conv_out_second" in k or "prior_head" in k
        for k in skipped
    )


def test_round_trip_to_flax_and_back(tiny_config):
    state, expected = reference_state_dicts(tiny_config, np.random.default_rng(0))
    variables = convert.to_variables(convert.reference_key_map(tiny_config), state, expected, SOURCES)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    back = convert.to_reference_layout(convert.reference_key_map(tiny_config), variables)
    assert back.keys() == state.keys()
    for part, tensors in back.items():
        assert tensors.keys() == state[part].keys()
        for key, value in tensors.items():
            np.testing.assert_array_equal(value, state[part][key])
    # A conv weight [O, I, kh, kw] lands as [kh, kw, I, O].
    torch_weight = state["model"]["0.model.layer1.0.conv2.weight"]
    np.testing.assert_array_equal(
        variables["params"]["encoder"]["layer1_0"]["conv2"]["kernel"], torch_weight.transpose(2, 3, 1, 0)
    )
    gradients = convert.to_reference_layout(convert.reference_key_map(tiny_config), {"params": variables["params"]})
    assert not any(k.endswith("running_var") for tensors in gradients.values() for k in tensors)


def test_errors_name_file_key_and_shapes(tiny_config):
    entries = convert.reference_key_map(tiny_config)
    state, expected = reference_state_dicts(tiny_config, np.random.default_rng(1))

    missing = {p: dict(d) for p, d in state.items()}
    del missing["model_2"]["1.MoEs.2.experts"]
    with pytest.raises(convert.ConversionError, match=r"model_2.safetensors: missing key '1.MoEs.2.experts'"):
        convert.to_variables(entries, missing, expected, SOURCES)

    misshaped = {p: dict(d) for p, d in state.items()}
    misshaped["model"]["1.final.0.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    with pytest.raises(
        convert.ConversionError,
        match=r"model.safetensors: key '1.final.0.weight' has shape \[3, 3, 1, 1\], "
        r"the model expects \[16, 16, 1, 1\]",
    ):
        convert.to_variables(entries, misshaped, expected, SOURCES)

    unknown = {p: dict(d) for p, d in state.items()}
    unknown["model_1"]["stem.9.weight"] = np.zeros(2, np.float32)
    with pytest.raises(convert.ConversionError, match=r"model_1.safetensors: 1 unexpected key\(s\), e.g. \['stem.9"):
        convert.to_variables(entries, unknown, expected, SOURCES)

    unused = {p: dict(d) for p, d in state.items()}
    unused["model"]["0.model.layer4.0.conv1.weight"] = np.zeros(2, np.float32)
    unused["model_2"]["0.prior_head.bias"] = np.zeros(1, np.float32)
    unused["prior"]["fc.weight"] = np.zeros(2, np.float32)
    unused["prior"]["bn1.num_batches_tracked"] = np.zeros((), np.int64)
    convert.to_variables(entries, unused, expected, SOURCES)  # skipped silently


def test_prior_from_safetensors_and_missing_file(tmp_path, tiny_config):
    from safetensors.numpy import save_file

    state, _ = reference_state_dicts(tiny_config, np.random.default_rng(2))
    save_file(state["prior"], str(tmp_path / "wrn.safetensors"))
    variables = convert.convert_prior(tmp_path / "wrn.safetensors", tiny_config)
    assert set(variables["params"]) == {"prior"} and set(variables["batch_stats"]) == {"prior"}
    np.testing.assert_array_equal(variables["batch_stats"]["prior"]["bn1"]["var"], state["prior"]["bn1.running_var"])
    with pytest.raises(convert.ConversionError, match="nothing.safetensors: no such file"):
        convert.read_state_dict(tmp_path / "nothing.safetensors")


def test_pth_needs_torch(tmp_path):
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed here")
    except ImportError:
        pass
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(convert.ConversionError, match="w.pth: reading a PyTorch pickle needs torch"):
        convert.read_state_dict(tmp_path / "w.pth")


MANIFESTS = {
    "model": "official_128_model",
    "model_1": "official_128_model_1",
    "model_2": "official_128_model_2",
    "prior": "prior_wide_resnet50_2",
}


@pytest.mark.slow
def test_official_to_ours_to_reference_is_bit_identical(tmp_path):
    """A reference folder of the parity weights -> `convert official` -> `convert to-reference` at full size, without
    running the model (~1 min, 4 GB): exactly the reference's keys, shapes and dtypes, and every tensor the
    model holds bit for bit (the unused ones are placeholders)."""
    from safetensors.numpy import load_file

    from experiments.parity import reference_checkpoint

    original = reference_checkpoint.write_reference_checkpoint(tmp_path / "reference", salt="export", size=128)
    official = ["--checkpoint-dir", str(tmp_path / "reference"), "--prior", str(original["prior"])]
    assert convert.main(["official", *official, "--image-size", "128", "--out", str(tmp_path / "ours")]) == 0
    assert (
        convert.main(["to-reference", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "written")]) == 0
    )
    parts = {"general_multimodal_encoder": "model", "input_embedding": "model_1", "c_moes": "model_2", "prior": "prior"}
    for part, path in original.items():
        name = convert.REFERENCE_FILES.get(parts[part], "wide_resnet50_2.safetensors")
        written, reference = load_file(tmp_path / "written" / name), load_file(path)
        manifest = json.loads((PARITY / "manifests" / f"{MANIFESTS[parts[part]]}.json").read_text())
        assert {k: list(v.shape) for k, v in written.items()} == manifest, name
        for key, value in written.items():
            assert value.dtype == reference[key].dtype, key
            if not convert.UNUSED_KEYS.search(key):
                assert value.tobytes() == reference[key].tobytes(), key


def test_to_reference_refuses_widths_the_reference_cannot_load(tmp_path, tiny_config, capsys):
    with pytest.raises(
        convert.ConversionError, match=r"reference code cannot load this model.*model\.planes=\(4, 8, 16\)"
    ):
        convert.reference_state_dicts(tiny_config, {})
    model_io.save(tmp_path / "tiny", tiny_config, {"params": {}, "batch_stats": {}})
    assert convert.main(["to-reference", "--checkpoint", str(tmp_path / "tiny"), "--out", str(tmp_path / "out")]) == 2
    assert "reference code cannot load this model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_to_reference_reads_the_latest_checkpoint_of_a_workdir(tmp_path, tiny_config, capsys):
    config = load_config("tiny")
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract_variables(tiny_config)
    )
    tx = train.make_optimizer(config, 1, variables["params"])
    state = train.TrainState(
        jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"], tx.init(variables["params"]), tx
    )
    with checkpoints.checkpoint_manager(tmp_path, config) as manager:
        checkpoints.save(manager, state, {"step": 1, "config": config.to_dict()}, None)
    cfg, loaded = weights.recorded_model(tmp_path)
    assert cfg == tiny_config
    for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))
    assert convert.main(["to-reference", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "model.planes=(4, 8, 16)" in capsys.readouterr().err
