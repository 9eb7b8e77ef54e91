import json

import jax
import numpy as np
import pytest
from helpers import PARITY

from unimmad_jax import convert
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
    back = convert.to_reference_layout(convert.reference_key_map(tiny_config), variables["params"])
    for key, value in back.items():
        part = {v: k for k, v in convert.GRADIENT_PARTS.items()}[key.split("/")[0]]
        np.testing.assert_array_equal(value, state[part][key.split("/", 1)[1]])
    # A conv weight [O, I, kh, kw] lands as [kh, kw, I, O].
    torch_weight = state["model"]["0.model.layer1.0.conv2.weight"]
    np.testing.assert_array_equal(
        variables["params"]["encoder"]["layer1_0"]["conv2"]["kernel"], torch_weight.transpose(2, 3, 1, 0)
    )


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
