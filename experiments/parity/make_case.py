"""Make a parity case (npz in the layout of tests/data/parity/cases/official_128.npz, or with
`--trajectory` of trajectory_128.npz) with the independent PyTorch reference of `torch_reference.py`.

Needs a venv with torch (torch is not a dependency of the package), e.g.

    VENV/bin/python -m experiments.parity.make_case \
        --salt unseen --image-size 64 --modalities 1,3,2 --loss-weights 0.5,1,10 \
        --epoch 37 --seed 3 --out tests/data/parity/cases/unseen_64.npz
    VENV/bin/python -m experiments.parity.make_case --trajectory \
        --salt trajmix --image-size 64 --modalities "4,1,2;1,1,3;2,4,1;3,2,2" \
        --loss-weights "1,0.5,10;1,1,1;10,0.5,1;0.5,0.5,10" --epochs 2 --steps-per-epoch 2 \
        --eval-modalities 3,1,4 --seed 11 --out tests/data/parity/cases/trajectory_mix_64.npz

Weights are the deterministic ones of `reference_checkpoint.py` (salt, size) and can be
written as a reference checkpoint folder with `--write-checkpoint DIR` (the writer
lives in `reference_checkpoint.py`, numpy + safetensors only).

Layout (names, dtypes and shapes as in official_128.npz): inputs `img`,
`specific_images`, `modality_num`, `loss_weight`, `pair_sample`, `pair_slot`,
`epoch`, `salt`; eval-mode float32 outputs `eval_prior_l{l}`, `eval_decompressed_l{l}`,
`eval_gate_idx_{l}_{b}`, `eval_gate_score_{l}_{b}`, `eval_anomaly_map_raw`,
`eval_anomaly_map`, `eval_image_score`; train-mode losses `train_{total,cos,moe}_loss`
(float32) and `train64_*` (float64); float64 gradients `grad/<part>/<key>`;
`min_gate_margin` (smallest gap, over levels, branches and pairs of the float32 eval
run, between the K-th and (K+1)-th largest router LOGIT).

A trajectory case is a float64 training run (`compute_trajectory_case`): Adam (lr 1e-3, betas
0.9/0.999, eps 1e-8) over the trained parts, `CosineAnnealingLR(T_max=epochs)` stepped after
each epoch, the 0-based epoch passed to the MoE annealing; then every BatchNorm buffer, the L2
norm of every parameter's change, and eval-mode maps and scores one sample at a time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from experiments.parity import reference_checkpoint as rc
from experiments.parity import torch_reference as tr

DEFAULT_GRAD_KEYS = (
    "general_multimodal_encoder/1.final.0.weight",
    "general_multimodal_encoder/0.model.conv1.weight",
    "general_multimodal_encoder/1.bn3.post.0.weight",
    "input_embedding/shortcut.weight",
    "input_embedding/stem.6.weight",
    "input_embedding/input_embedding",
    "c_moes/0.MoEs.1.gate.gate.weight",
    "c_moes/2.MoEs.0.experts",
    "c_moes/1.conv_out_first.0.weight",
    "c_moes/0.expert_bases.0",
)


def build_model(weights, size: int, dtype=torch.float32) -> tr.UniMMAD:
    """`weights`: {part: numpy state dict} (see reference_checkpoint.reference_weights), or the
    path of a reference checkpoint folder holding also `prior_wide_resnet50_2.safetensors`."""
    m = tr.UniMMAD(size)
    if isinstance(weights, (str, Path)):
        m.load_checkpoint(weights, Path(weights) / rc.PRIOR_FILE)
    else:
        m.load_numpy(
            weights["general_multimodal_encoder"], weights["input_embedding"], weights["c_moes"], weights["prior"]
        )
    return m.to(dtype)


def make_inputs(modalities, size: int, seed: int, m_slots: int = tr.M_SLOTS):
    rng = np.random.default_rng(seed)
    b = len(modalities)
    si = np.zeros((b, m_slots, 3, size, size), np.float32)
    for i, n in enumerate(modalities):
        if not 1 <= n <= m_slots:
            raise ValueError(f"modality count {n} not in 1..{m_slots}")
        si[i, :n] = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    img = np.concatenate([si[:, m] for m in range(m_slots)], axis=1)  # [B, 3M, H, W]
    return img.astype(np.float32), si


def logit_margin(out) -> float:
    m = np.inf
    for lvl in out["gates"]:
        for g in lvl:
            s = torch.sort(g["logits"].detach(), dim=-1, descending=True).values
            m = min(m, float((s[:, tr.TOP_K - 1] - s[:, tr.TOP_K]).min()))
    return m


def run_eval(weights, size, img, si, mn):
    model = build_model(weights, size).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(img), torch.from_numpy(si), mn)
        raw, blurred, score = model.anomaly_maps(out, img.shape[0])
    return model, out, raw, blurred, score


def run_train(weights, size, img, si, mn, lw, epoch, dtype, grad_keys=()):
    model = build_model(weights, size, dtype).train()
    out = model(torch.from_numpy(img).to(dtype), torch.from_numpy(si).to(dtype), mn)
    tot, cos, moe = model.losses(out, torch.from_numpy(lw).to(dtype), epoch)
    grads = {}
    if grad_keys:
        tot.backward()
        parts = model.parts()
        for gk in grad_keys:
            part, key = gk.split("/", 1)
            p = dict(parts[part].named_parameters())[key]
            grads[f"grad/{part}/{key}"] = p.grad.detach().cpu().numpy().astype(np.float64)
    return out, (tot, cos, moe), grads


def compute_case(
    weights, size, img, si, modality_num, loss_weight, epoch, salt="", grad_keys=DEFAULT_GRAD_KEYS, verbose=True
):
    """All entries of a case file (inputs included), computed with the torch reference."""
    mn = [int(n) for n in modality_num]
    t0 = time.time()
    _, out, raw, blurred, score = run_eval(weights, size, img, si, mn)
    if verbose:
        print(f"eval done ({time.time() - t0:.1f}s)", flush=True)
    case = {
        "img": img.astype(np.float32),
        "specific_images": si.astype(np.float32),
        "modality_num": np.asarray(mn, np.int32),
        "loss_weight": np.asarray(loss_weight, np.float32),
        "pair_sample": np.asarray(out["pair_sample"], np.int32),
        "pair_slot": np.asarray(out["pair_slot"], np.int32),
        "epoch": np.asarray(epoch, np.int32),
        "salt": np.asarray(salt),
    }
    for lvl in range(3):
        case[f"eval_prior_l{lvl}"] = out["prior"][lvl].numpy().astype(np.float32)
        case[f"eval_decompressed_l{lvl}"] = out["decompressed"][lvl].numpy().astype(np.float32)
    for lvl in range(3):
        for br in range(3):
            g = out["gates"][lvl][br]
            case[f"eval_gate_idx_{lvl}_{br}"] = g["idx"].numpy().astype(np.int32)
            case[f"eval_gate_score_{lvl}_{br}"] = g["scores"].numpy().astype(np.float32)
    case["eval_anomaly_map_raw"] = raw.numpy().astype(np.float32)
    case["eval_anomaly_map"] = blurred.numpy().astype(np.float32)
    case["eval_image_score"] = score.numpy().astype(np.float32)
    eval_margin = logit_margin(out)

    t0 = time.time()
    out32, losses32, _ = run_train(weights, size, img, si, mn, case["loss_weight"], epoch, torch.float32)
    for name, v in zip(("total", "cos", "moe"), losses32):
        case[f"train_{name}_loss"] = np.asarray(v.item(), np.float32)
    if verbose:
        print(f"train float32 done ({time.time() - t0:.1f}s)", flush=True)
    t0 = time.time()
    out64, losses64, grads = run_train(
        weights, size, img, si, mn, case["loss_weight"], epoch, torch.float64, tuple(grad_keys)
    )
    for name, v in zip(("total", "cos", "moe"), losses64):
        case[f"train64_{name}_loss"] = np.asarray(v.item(), np.float64)
    case.update(grads)
    if verbose:
        print(f"train float64 + backward done ({time.time() - t0:.1f}s)", flush=True)
    case["min_gate_margin"] = np.asarray(eval_margin, np.float32)
    margins = {"eval": eval_margin, "train32": logit_margin(out32), "train64": logit_margin(out64)}
    # the train-mode gates must agree between float32 and float64
    for lvl in range(3):
        for br in range(3):
            if not torch.equal(out32["gates"][lvl][br]["idx"], out64["gates"][lvl][br]["idx"]):
                margins["train_gates_differ"] = True
    return case, margins


FILES = {"general_multimodal_encoder": "model", "input_embedding": "model_1", "c_moes": "model_2"}
"""The checkpoint file of each part, as the trajectory case names them."""


def train_run(model, batches, epochs: int, steps_per_epoch: int, verbose=True):
    """Train `model` (float64, train mode) on `batches` [(img, si, modality_num, loss_weight)], one per step.

    Returns losses `[steps, 3]` (total, DeC, MoE before each update), learning rates `[steps]` and the
    smallest router logit margin of each step."""
    params = [p for part in model.parts().values() for p in part.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses, rates, margins = [], [], []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            img, si, mn, lw = batches[len(losses)]
            out = model(torch.from_numpy(img).double(), torch.from_numpy(si).double(), mn)
            total, cos, moe = model.losses(out, torch.from_numpy(np.asarray(lw, np.float64)), epoch)
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append([total.item(), cos.item(), moe.item()])
            margins.append(logit_margin(out))
            if verbose:
                print(f"step {len(losses) - 1}: loss {losses[-1][0]:.10g} (lr {rates[-1]:.3g})", flush=True)
        schedule.step()
    return np.asarray(losses), np.asarray(rates), np.asarray(margins)


def compute_trajectory_case(weights, size, batches, epochs, steps_per_epoch, eval_batch, salt="", verbose=True):
    """All entries of a trajectory case; `batches` and `eval_batch` as (img, si, modality_num, loss_weight)."""
    if len(batches) != epochs * steps_per_epoch:
        raise ValueError(f"{len(batches)} batches for {epochs} epochs of {steps_per_epoch} steps")
    model = build_model(weights, size, torch.float64).train()
    initial = {
        part: {k: p.detach().clone() for k, p in module.named_parameters()} for part, module in model.parts().items()
    }
    losses, rates, margins = train_run(model, batches, epochs, steps_per_epoch, verbose)
    case = {
        "epochs": np.asarray(epochs),
        "steps_per_epoch": np.asarray(steps_per_epoch),
        "size": np.asarray(size),
        "salt": np.asarray(salt),
        "train_losses": losses,
        "train_lr": rates,
        "train_min_routing_margin": margins,
    }
    for name, (_img, si, mn, lw) in [(f"batch{i}", b) for i, b in enumerate(batches)] + [("eval_batch", eval_batch)]:
        case[f"{name}/specific_images"] = si.astype(np.float32)
        case[f"{name}/modality_num"] = np.asarray(mn, np.int32)
        case[f"{name}/loss_weight"] = np.asarray(lw, np.float64)
    for part, module in model.parts().items():
        for key, buffer in module.named_buffers():
            if key.endswith(("running_mean", "running_var")):
                case[f"buffer/{FILES[part]}/{key}"] = buffer.detach().numpy().astype(np.float64)
        for key, p in module.named_parameters():
            case[f"delta_norm/{FILES[part]}/{key}"] = np.asarray(
                torch.linalg.norm(p.detach() - initial[part][key]).item()
            )

    model.eval()
    img, si, mn, _ = eval_batch
    maps = []
    with torch.no_grad():
        for b in range(len(mn)):
            out = model(
                torch.from_numpy(img[b : b + 1]).double(), torch.from_numpy(si[b : b + 1]).double(), mn[b : b + 1]
            )
            maps.append([t.numpy() for t in model.anomaly_maps(out, 1)])
    for i, name in enumerate(("eval_anomaly_map_raw", "eval_anomaly_map", "eval_image_score")):
        case[name] = np.concatenate([m[i] for m in maps]).astype(np.float64)
    return case


def screen_margins(weights, size, img, si, mn) -> dict:
    """Gate logit margins of the float32 eval and train-mode forwards (no backward)."""
    mn = [int(n) for n in mn]
    _, out, *_ = run_eval(weights, size, img, si, mn)
    model = build_model(weights, size).train()
    with torch.no_grad():
        out32 = model(torch.from_numpy(img), torch.from_numpy(si), mn)
    return {"eval": logit_margin(out), "train32": logit_margin(out32)}


def parse_counts(text: str, kind=int) -> list[list]:
    """ "2,1;1,3" -> [[2, 1], [1, 3]]: one list per batch."""
    return [[kind(v) for v in batch.split(",")] for batch in text.split(";")]


def main_trajectory(a, weights) -> dict:
    batch_modalities = parse_counts(a.modalities)
    weights_per_batch = (
        [[1.0] * len(b) for b in batch_modalities] if a.loss_weights is None else parse_counts(a.loss_weights, float)
    )
    if [len(b) for b in weights_per_batch] != [len(b) for b in batch_modalities]:
        raise SystemExit("--loss-weights needs one value per sample of every batch (batches separated by ';')")
    batches = [
        (*make_inputs(mods, a.image_size, a.seed + i), mods, lw)
        for i, (mods, lw) in enumerate(zip(batch_modalities, weights_per_batch))
    ]
    eval_modalities = [int(v) for v in a.eval_modalities.split(",")]
    eval_batch = (
        *make_inputs(eval_modalities, a.image_size, a.seed + len(batches)),
        eval_modalities,
        [1.0] * len(eval_modalities),
    )
    case = compute_trajectory_case(weights, a.image_size, batches, a.epochs, a.steps_per_epoch, eval_batch, a.salt)
    print(f"routing margins per step {case['train_min_routing_margin'].tolist()}")
    return case


def main(argv=None):
    ap = argparse.ArgumentParser(description="make a parity case with the torch reference")
    ap.add_argument("--salt", default="")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument(
        "--modalities",
        default="2,1",
        help="modality count per sample, e.g. 1,3,2; with --trajectory per batch too, e.g. '2,1;1,3'",
    )
    ap.add_argument(
        "--loss-weights", default=None, help="per sample, e.g. 0.5,1,10 (default all 1); ';' between batches"
    )
    ap.add_argument("--epoch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trajectory", action="store_true", help="a float64 training run instead of one step")
    ap.add_argument("--epochs", type=int, default=3, help="--trajectory: epochs of the run")
    ap.add_argument("--steps-per-epoch", type=int, default=1, help="--trajectory: steps of each epoch")
    ap.add_argument("--eval-modalities", default="2,1", help="--trajectory: the evaluated samples' modality counts")
    ap.add_argument(
        "--min-margin",
        type=float,
        default=0.0,
        help="if > 0, try seeds seed, seed+1, ... until the eval and float32 train gate logit margins are both >= this",
    )
    ap.add_argument("--max-tries", type=int, default=50)
    ap.add_argument("--out", default=None, help="npz file to write (np.savez_compressed)")
    ap.add_argument(
        "--grad-keys",
        nargs="*",
        default=list(DEFAULT_GRAD_KEYS),
        help="'<part>/<key>' with part in general_multimodal_encoder, input_embedding, c_moes",
    )
    ap.add_argument(
        "--write-checkpoint",
        default=None,
        help="also write the reference checkpoint folder (+ prior file) for salt/size here",
    )
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    size = a.image_size
    if a.write_checkpoint:
        for part, p in rc.write_reference_checkpoint(a.write_checkpoint, a.salt, size).items():
            print("wrote", part, p)
    if a.out is None:
        return
    weights = rc.reference_weights(a.salt, size)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.trajectory:
        np.savez_compressed(out, **main_trajectory(a, weights))
        print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
        return

    mods = [int(s) for s in a.modalities.split(",")]
    lw = [1.0] * len(mods) if a.loss_weights is None else [float(s) for s in a.loss_weights.split(",")]
    if len(lw) != len(mods):
        raise SystemExit("--loss-weights needs one value per sample")
    seed = a.seed
    if a.min_margin > 0:  # cheap search first: eval and float32 train gates only
        for _ in range(a.max_tries):
            img, si = make_inputs(mods, size, seed)
            m = screen_margins(weights, size, img, si, mods)
            print(f"seed {seed}: gate logit margins {m}", flush=True)
            if min(m.values()) >= a.min_margin:
                break
            seed += 1
        else:
            raise SystemExit(f"no seed in {a.seed}..{seed} reached margin {a.min_margin}")
    img, si = make_inputs(mods, size, seed)
    case, margins = compute_case(weights, size, img, si, mods, lw, a.epoch, a.salt, a.grad_keys)
    print(f"seed {seed}: gate logit margins {margins}", flush=True)
    if margins.get("train_gates_differ", False):
        raise SystemExit("float32 and float64 train-mode gates differ; pick another seed")

    np.savez_compressed(out, **case)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB), seed {seed}, "
        f"min_gate_margin {float(case['min_gate_margin']):.6g}, pairs {case['pair_sample'].size}"
    )
    for k in ("train_total_loss", "train_cos_loss", "train_moe_loss", "train64_total_loss"):
        print(f"  {k} = {float(case[k]):.10g}")


if __name__ == "__main__":
    main()
