"""`train.prior`'s ImageNet download (`unimmad_jax.pretrained`), through huggingface_hub against a fake hub on
127.0.0.1 that serves a WideResNet of the tiny config's widths: downloaded once, checked, kept in the
workdir; offline without it, a download cut short or altered, and a file of other shapes stop the run, naming it."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import subprocess
import threading
import time

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy
from helpers import REPO, load_config, main_command, subprocess_env
from huggingface_hub import constants

from unimmad_jax import convert, pretrained, weights
from unimmad_jax.config import model_config
from unimmad_jax.models.unimmad import abstract_variables

RESOLVE = f"/{pretrained.IMAGENET_REPO}/resolve/main/{pretrained.IMAGENET_FILE}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def prior_of(cfg, seed: int) -> dict:
    """Random prior variables of `cfg`'s widths, each leaf distinct."""
    rng = np.random.default_rng(seed)
    abstract = abstract_variables(cfg)
    return {
        c: {"prior": jax.tree_util.tree_map(lambda a: rng.random(a.shape, np.float32), abstract[c]["prior"])}
        for c in abstract
    }


def wide_resnet_file(cfg, prior: dict) -> bytes:
    """`prior` as a torchvision/timm WideResNet `.safetensors`, with the keys the model never reads (layer4, fc,
    BatchNorm counters) as a real file has them."""
    tensors = convert.to_reference_layout(convert.prior_key_map(cfg), prior)["prior"]
    tensors.update(convert.unused_reference_tensors(cfg)["prior"])
    return safetensors.numpy.save({k: np.require(v, requirements="C") for k, v in tensors.items()})


class FakeHub(http.server.ThreadingHTTPServer):
    """The one file of `timm/wide_resnet50_2.tv2_in1k` as the Hugging Face Hub answers for it: HEAD states its
    commit, SHA-256 (the ETag of a Git LFS file) and size; GET sends it.  `fault` spoils the answer: "dropped"
    (the connection closes halfway and the resumption is refused), "short" (fewer bytes than the hub stated),
    "altered" (other bytes than the hub's SHA-256)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.content, self.fault, self.requests = b"", None, []  # the requests for the file

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body: bool) -> None:
        hub: FakeHub = self.server
        if self.path != RESOLVE:  # huggingface_hub may also ask for other things, e.g. a registry
            self.send_error(404)
            return
        hub.requests.append(self.command)
        content, fault = hub.content, hub.fault
        if send_body and self.headers.get("Range"):  # a resumption of a dropped download
            self.send_error(503)
            return
        stated = hashlib.sha256(b"other bytes" if fault == "altered" else content).hexdigest()
        sent = content[: len(content) // 2] if send_body and fault in ("dropped", "short") else content
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{stated}"')
        self.send_header("X-Linked-Etag", f'"{stated}"')
        self.send_header("X-Linked-Size", str(len(content)))
        self.send_header("Content-Length", str(len(content) if fault != "short" else len(sent)))
        self.end_headers()
        if send_body:
            self.wfile.write(sent)
            self.wfile.flush()
            self.close_connection = True


def use_hub_environment(monkeypatch, **variables: str) -> None:
    """Set huggingface_hub's environment variables as a new process would see them (it reads them on import)."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    importlib.reload(constants)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub serving the tiny config's prior, as HF_ENDPOINT, with an empty cache in HF_HOME."""
    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    use_hub_environment(monkeypatch, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0")
    yield server
    server.shutdown()
    server.server_close()
    monkeypatch.undo()
    importlib.reload(constants)


@pytest.fixture
def config():
    config = load_config("tiny")
    config.train.prior = pretrained.IMAGENET
    return config


def assert_same(ours, theirs) -> None:
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_the_imagenet_prior_is_downloaded_once_checked_and_kept_in_the_workdir(hub, config, tmp_path):
    prior = prior_of(model_config(config), seed=1)
    hub.content = wide_resnet_file(model_config(config), prior)
    assert_same(pretrained.prior_variables(config, tmp_path / "run"), prior)
    assert hub.requests == ["HEAD", "GET"]
    assert (tmp_path / "run" / pretrained.PRIOR_FOLDER / "wide_resnet50_2.safetensors").read_bytes() == hub.content

    # A second run reads the cache and asks the hub nothing.
    assert_same(pretrained.prior_variables(config, tmp_path / "second"), prior)
    assert len(hub.requests) == 2


def test_offline_without_the_file_stops_at_once_naming_it_and_the_way_out(hub, config, tmp_path, monkeypatch):
    hub.content = wide_resnet_file(model_config(config), prior_of(model_config(config), seed=2))
    use_hub_environment(monkeypatch, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    with pytest.raises(pretrained.PriorError) as error:
        pretrained.prior_variables(config, tmp_path / "run")
    assert time.monotonic() - start < 5
    message = str(error.value)
    for part in (pretrained.IMAGENET_REPO, pretrained.IMAGENET_FILE, "HF_HUB_OFFLINE", "--config.train.prior="):
        assert part in message
    assert hub.requests == []
    assert not (tmp_path / "run" / pretrained.PRIOR_FOLDER).exists()


@pytest.mark.parametrize("fault", ["dropped", "short", "altered"])
def test_a_download_cut_short_or_altered_is_rejected_and_nothing_is_cached(hub, config, tmp_path, fault):
    prior = prior_of(model_config(config), seed=3)
    hub.content, hub.fault = wide_resnet_file(model_config(config), prior), fault
    with pytest.raises(pretrained.PriorError, match=pretrained.IMAGENET_REPO if fault != "altered" else "SHA-256"):
        pretrained.prior_variables(config, tmp_path / "run")
    cache = tmp_path / "hf_home"
    assert huggingface_hub.try_to_load_from_cache(pretrained.IMAGENET_REPO, pretrained.IMAGENET_FILE) is None
    assert not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 1000], "a partial file is cached"
    assert not (tmp_path / "run" / pretrained.PRIOR_FOLDER).exists()
    hub.fault = None  # the next run downloads it whole
    assert_same(pretrained.prior_variables(config, tmp_path / "run"), prior)


def test_a_file_of_other_shapes_is_an_error_naming_the_key(hub, config, tmp_path):
    other = model_config(load_config("demo"))
    hub.content = wide_resnet_file(other, prior_of(other, seed=4))
    with pytest.raises(
        pretrained.PriorError,
        match=r"key 'conv1.weight' has shape \[16, 3, 7, 7\], the model expects \[8, 3, 7, 7\]"
        r".*model.planes=\(64, 128, 256\)",
    ):
        pretrained.prior_variables(config, tmp_path / "run")


def test_the_command_line_starts_from_the_hub_prior_and_resumes_offline(hub, config, tmp_path, synthetic_data_dir):
    """A fresh run downloads the prior (rc 0, the prior frozen in its checkpoint); running the command again resumes
    with the hub unreachable and no cache; a fresh run there stops at once with rc 2."""
    prior = prior_of(model_config(config), seed=5)
    hub.content = wide_resnet_file(model_config(config), prior)
    fields = {"train.prior": "imagenet", "train.num_epochs": 1}
    env = {**subprocess_env(), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}

    def run(workdir, **changes):
        command = main_command(workdir, synthetic_data_dir, **fields)
        return subprocess.run(command, cwd=REPO, env={**env, **changes}, capture_output=True, text=True)

    first = run(tmp_path / "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "The prior: ImageNet weights (train.prior=imagenet" in first.stdout
    assert hub.requests == ["HEAD", "GET"]
    trained = weights.recorded_checkpoint(tmp_path / "run")[2]
    for collection in trained:
        assert_same(trained[collection]["prior"], prior[collection]["prior"])

    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    again = run(tmp_path / "run", **offline)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Resumed from step" in again.stdout and "The prior" not in again.stdout
    fresh = run(tmp_path / "fresh", **offline)
    assert fresh.returncode == 2, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert "--config.train.prior=" in fresh.stderr and pretrained.IMAGENET_REPO in fresh.stderr
    assert len(hub.requests) == 2


TWO_HOSTS_WORKER = """
import importlib, os, sys
import jax
import numpy as np
from helpers import load_config
from huggingface_hub import constants
from unimmad_jax import pretrained, sharding

address, process_id, hf_homes, workdir, out = sys.argv[1:]
sharding.initialize_distributed(coordinator_address=address, num_processes=2, process_id=int(process_id))
config = load_config("tiny")
config.train.prior = "imagenet"
for offline in ("1", "0"):  # each host a Hugging Face cache of its own
    os.environ.update(HF_HUB_OFFLINE=offline, HF_HOME=os.path.join(hf_homes, f"host_{process_id}"))
    importlib.reload(constants)
    try:
        variables = pretrained.prior_variables(config, workdir)
    except pretrained.PriorError as error:
        print(f"offline={offline}: {error}")
np.savez(f"{out}_{process_id}.npz", *jax.tree_util.tree_leaves(variables))
"""


def test_on_two_processes_process_0_fetches_and_every_process_reads_the_workdir(hub, config, tmp_path):
    """Offline, process 0 names the file and process 1 stops too; online, only process 0 asks the hub, and both
    read the same prior from the workdir."""
    from test_multihost import run_processes

    prior = prior_of(model_config(config), seed=6)
    hub.content = wide_resnet_file(model_config(config), prior)
    out = tmp_path / "prior"
    outputs = run_processes(
        2, ["-c", TWO_HOSTS_WORKER, str(tmp_path / "hf_homes"), str(tmp_path / "run"), str(out)], tmp_path / "logs"
    )
    assert "offline=1: train.prior=imagenet: timm/wide_resnet50_2.tv2_in1k" in outputs[0]
    assert "offline=1: train.prior=imagenet: process 0 could not get the prior" in outputs[1]
    assert hub.requests == ["HEAD", "GET"]
    assert not (tmp_path / "hf_homes" / "host_1" / "hub").exists()
    for process in (0, 1):
        read = np.load(f"{out}_{process}.npz")
        for index, leaf in enumerate(jax.tree_util.tree_leaves(prior)):
            np.testing.assert_array_equal(read[f"arr_{index}"], leaf)
