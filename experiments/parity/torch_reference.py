"""Independent PyTorch reading of the UniMMAD reference model as docs/model.md describes it.

Written from that description alone, for parity work only: it is never
imported by the `unimmad_jax` package and torch is not a dependency of it.
It runs in float32 or, after `.double()`, in float64.

Module trees are laid out so that the state-dict keys are exactly those of
the reference checkpoint (docs/model.md#reference-checkpoints, `tests/data/parity/manifests/`):

- `GeneralMultimodalEncoder` (model.safetensors): `0.model.<torchvision WRN>` and
  `1.<FCM / decoder>`;
- `InputEmbedding` (model_1.safetensors): `input_embedding`, `stem.<i>.*`, `shortcut.*`;
- `CMoEs` (model_2.safetensors): `<level>.<...>`;
- `WideResNet50_2(with_fc=True)` for the frozen prior (`conv1.weight`, ..., `fc.*`).

Ambiguities of the description, resolved by the fixture `tests/data/parity/cases/official_128.npz`.
Numbers in brackets are what the rejected alternative gives against the fixture
(chosen reading: decompressed max-abs 1.4e-5, float64 total loss rel. 1.8e-15):

- resolved by the fixture: MiMoE kernel mixing.  `experts` `[R, N, C]` is softmaxed
  over N (dim 1 of the parameter, dim 0 of `L_r`), and the channel index `c` of
  `softmax_n(L_r)[n, c]` addresses dim 1 of `Base_k [N, C, C, k, k]`, i.e. the OUTPUT
  channel of the conv weight:
  `W_r[o, i, :, :] = sum_n softmax_n(L_r)[n, o] * Base_k[n, o, i, :, :]`.
  [mix over dim 2 / input channel: 1.85; softmax over C instead of N: 1.80]
- resolved by the fixture: the mixed kernel `W_r` and the fixed expert `soft_expert`
  are both plain `F.conv2d` weights `[O, I, k, k]` (cross-correlation, pad k//2).
  [W_r transposed: 2.74; soft_expert transposed: 4.21]
- resolved by the fixture: top-K indices in descending probability order;
  `s_j = p_{i_j} / (p_{i_1} + p_{i_2} + 1e-8)` [without the 1e-8: float64 total loss
  rel. 1.15e-9, just over the 1e-9 tolerance].  Routing is per pair (each pair has its
  own `gml`; the fixture's scores differ between pairs of one sample).
- resolved by the fixture: GELU is exact erf [tanh form: eval decompressed 3.7e-5
  (would pass 5e-4!) but float64 total loss rel. 4.3e-6].
- resolved by the fixture: the C-MoE's only BN (`conv_cond.0.1`) sees a batch made of
  exactly the P valid pairs (padded slots are not in the batch at all); in training
  it uses the batch statistics over those P pairs (mean/biased variance over P*h*w).
  [C-MoE run on all B*M slots incl. zero padded images: float64 loss rel. 4.9e-3;
  running statistics in training: 4.6e-2]
- resolved by the fixture: train mode = batch-statistics BN in the input-embedding
  stem, the general WRN and the FCM/decoder (batch = the B samples) and the C-MoEs
  (batch = the P pairs); the prior WRN always uses running statistics.
  [general BN eval: 1.1e-2; embedding BN eval: 7.1e-4; prior BN train: 3.6e-2]
- NOT resolvable by the fixture: cosine eps placement.  `F.cosine_similarity(eps=1e-8)`
  over channels (torch: per-vector norm clamp) and `x.y / max(|x||y|, eps)` agree
  to 1e-15 in the float64 losses (every norm is far above 1e-8).  The gradient must
  include the norm of `y` (y is not re-normalised); `u` is the L2-normalised prior.
- resolved by the fixture: `L_DeC = 3 * mean over all (level, pair) of
  mean_pixels(d * stop_grad(d)^2) * mean_b(loss_weight)` -- the batch MEAN of the
  loss weight for every pair.  [each pair its own sample's weight: 2.615 vs 3.602;
  per-sample mean of t then batch mean: 3.6000 vs 3.6023 (rel. 6e-4)]
- resolved by the fixture: `L_MoE = a(epoch) * mean over levels of (sum over the 3
  branches of cv2 + z)`, `a(e) = max(1 - e/200, 1e-3)` with the stored `epoch` as is
  (epoch 10 -> 0.95) [(1 - e/200)^2: 0.6989 vs 0.7357; a(e+1): 0.7318; sum over
  levels: 2.207]; cv2 uses the population variance over R.
- resolved by the fixture: anomaly maps per sample at batch size 2: each level's
  and modality's `1 - cos` map bilinearly resized with align_corners=True, squared,
  summed over levels and modalities, square-rooted; blur = 15x15 Gaussian (taps
  -7..7, sigma 4, normalised) with ZERO padding 7; image score = mean of the top
  `H*W // 1000` blurred pixels.  [align_corners=False: raw map 4.0e-2;
  reflect / replicate padding: blurred map 1.04]
- resolved by the fixture: decoded features and priors are `F.normalize(dim=1,
  eps=1e-12)`; the prior sees each valid (sample, slot) image, packed slot-first.
- resolved by the fixture: `min_gate_margin` is the smallest, over levels, branches
  and pairs of the float32 EVAL run, of the gap between the K-th and (K+1)-th largest
  router LOGIT (official: 0.0021219 vs stored 0.0021217); it is not a probability
  gap (that would be 1.4e-4 for the same case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

M_SLOTS = 4
EMBED_C = 256
BASE_N = 8
ROUTER_R = 32
TOP_K = 2
KERNELS = (1, 3, 5)
LEVEL_DIMS = (256, 512, 1024)


def gn_groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def norm_act(c: int) -> nn.Sequential:
    """`norm_act(C)`: GroupNorm (keys `.0.*`) then ReLU."""
    return nn.Sequential(nn.GroupNorm(gn_groups(c), c, eps=1e-5), nn.ReLU())


def conv_na(i: int, o: int, k: int = 1, stride: int = 1, bias: bool = False) -> nn.Sequential:
    """conv (key `.0`) then norm_act (keys `.1.0`)."""
    return nn.Sequential(nn.Conv2d(i, o, k, stride, k // 2 if stride == 1 else 0, bias=bias), norm_act(o))


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


# --------------------------------------------------------------------------- WRN-50-2
class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 128):
        super().__init__()
        width = planes * width_per_group // 64
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = bn(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = bn(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), bn(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class WideResNet50_2(nn.Module):
    """torchvision `wide_resnet50_2` naming; forward returns layer1..layer3 (layer4/fc unused)."""

    def __init__(self, with_fc: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = bn(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inpl = 64
        layers = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            mods = []
            for b in range(blocks):
                mods.append(Bottleneck(inpl, planes, stride if b == 0 else 1))
                inpl = planes * 4
            layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        if with_fc:
            self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [F.relu(f1), F.relu(f2), F.relu(f3)]


class _EncoderWrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = WideResNet50_2(with_fc=False)

    def forward(self, x):
        return self.model(x)


# --------------------------------------------------------------------------- FCM + decoder
class DownBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = bn(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = bn(o)
        self.downsample = nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.downsample(x))


class UpBlock(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(i, o, 2, 2, bias=False)
        self.bn1 = bn(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = bn(o)
        self.upsample = nn.ConvTranspose2d(i, o, 4, 2, 1, bias=True)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.upsample(x))


class DSConv(nn.Module):
    """depthwise KxK (groups = C) -> pointwise C -> O -> norm_act(O)."""

    def __init__(self, c: int, o: int, k: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False)
        self.pw = nn.Conv2d(c, o, 1, bias=False)
        self.na = norm_act(o)

    def forward(self, x):
        return self.na(self.pw(self.dw(x)))


class InnerBottleneck(nn.Module):
    def __init__(self, k: int, e: int = 512):
        super().__init__()
        o = e // 3
        self.b1 = DSConv(e, o, k)
        self.b2 = DSConv(e, o, k)
        self.b3 = DSConv(e, o, k)
        self.post = nn.Sequential(nn.Conv2d(3 * o, e, 2, 2, bias=True), norm_act(e))

    def forward(self, x1, x2, x3):
        ys = []
        for blk, x in ((self.b1, x1), (self.b2, x2), (self.b3, x3)):
            y = blk(x)
            if y.shape[-2:] != x3.shape[-2:]:
                raise ValueError("image size must be divisible by 32")
            ys.append(y)
        return self.post(torch.cat(ys, 1))


class OuterBottleneck(nn.Module):
    def __init__(self, e: int = 512):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3 * e, e, 1, bias=False), norm_act(e))
        self.head = nn.Sequential(nn.Conv2d(e, 2048, 2, 2, bias=False), norm_act(2048))

    def forward(self, b1, b3, b5):
        return self.head(self.proj(torch.cat([b1, b3, b5], 1)))


class DeconvBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, up: bool):
        super().__init__()
        width = planes * 2
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = bn(width)
        if up:
            self.conv2 = nn.ConvTranspose2d(width, width, 2, 2, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = bn(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = bn(out)
        self.upsample = None
        if up:
            self.upsample = nn.Sequential(nn.ConvTranspose2d(inplanes, out, 2, 2, bias=False), bn(out))

    def forward(self, x):
        idt = x if self.upsample is None else self.upsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + idt)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        inpl = 2048
        stages = []
        for planes, blocks in ((256, 3), (128, 4), (64, 6)):
            mods = []
            for b in range(blocks):
                mods.append(DeconvBottleneck(inpl, planes, up=(b == 0)))
                inpl = planes * 4
            stages.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3 = stages

    def forward(self, x):
        d1 = self.layer1(x)  # 1024 @ H/16
        d2 = self.layer2(d1)  # 512 @ H/8
        d3 = self.layer3(d2)  # 256 @ H/4
        return [d3, d2, d1]


class MultiScaleFusionWithEmbedding(nn.Module):
    def __init__(self, e: int = 512):
        super().__init__()
        self.decoder = Decoder()
        self.conv_x1 = nn.Sequential(DownBlock(256, e, 2))
        self.conv_x2 = nn.Sequential(DownBlock(512, e, 1))
        self.conv_x3 = nn.Sequential(UpBlock(1024, e))
        self.bn1 = InnerBottleneck(1, e)
        self.bn3 = InnerBottleneck(3, e)
        self.bn5 = InnerBottleneck(5, e)
        self.out_bn3 = OuterBottleneck(e)
        self.final = nn.ModuleList([nn.Conv2d(c, c, 1, bias=False) for c in (256, 512, 1024)])

    def forward(self, feats):
        x1 = self.conv_x1(feats[0])
        x2 = self.conv_x2(feats[1])
        x3 = self.conv_x3(feats[2])
        z = self.out_bn3(self.bn1(x1, x2, x3), self.bn3(x1, x2, x3), self.bn5(x1, x2, x3))
        dec = self.decoder(z)
        return [f(d) for f, d in zip(self.final, dec)]


class GeneralMultimodalEncoder(nn.ModuleList):
    """keys `0.model.*` (WRN) and `1.*` (FCM/decoder)."""

    def __init__(self):
        super().__init__([_EncoderWrap(), MultiScaleFusionWithEmbedding()])

    def forward(self, x):
        return self[1](self[0](x))


class InputEmbedding(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.input_embedding = nn.Parameter(torch.zeros(12, size, size))
        self.stem = nn.Sequential(
            nn.Conv2d(12, 24, 3, 1, 1, bias=True),
            bn(24),
            nn.ReLU(),
            nn.Conv2d(24, 48, 3, 1, 1, bias=True),
            bn(48),
            nn.ReLU(),
            nn.Conv2d(48, 3, 3, 1, 1, bias=True),
        )
        self.shortcut = nn.Conv2d(12, 3, 1, bias=True)

    def forward(self, img):
        e = img + self.input_embedding[None]
        return self.stem(e) + self.shortcut(e)


# --------------------------------------------------------------------------- C-MoE
class Gate(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.gate = nn.Linear(c, r)

    def forward(self, x):
        return self.gate(x)


class MiMoE(nn.Module):
    def __init__(self, k: int, c: int = EMBED_C, n: int = BASE_N, r: int = ROUTER_R):
        super().__init__()
        self.k = k
        self.soft_expert = nn.Parameter(torch.zeros(c, c, k, k))
        self.experts = nn.Parameter(torch.zeros(r, n, c))
        self.gate = Gate(c, r)
        self.pre = conv_na(c, c, 1)
        self.post = conv_na(2 * c, c, 1)

    def leader_kernel(self, base: torch.Tensor, r: int) -> torch.Tensor:
        # W_r[o, i] = sum_n softmax_n(L_r)[n, o] * Base[n, o, i]   (c = dim 1 = output channel)
        mix = torch.softmax(self.experts[r], dim=0)  # [N, C]
        return torch.einsum("no,noikl->oikl", mix, base)

    def forward(self, key, gml, base):
        """key [P, C, h, w], gml [P, C]; returns out, logits, probs, idx, scores."""
        x = self.pre(key)
        logits = self.gate(gml)  # [P, R]
        probs = torch.softmax(logits, dim=-1)
        top_p, idx = torch.topk(probs, TOP_K, dim=-1)
        scores = top_p / (top_p.sum(-1, keepdim=True) + 1e-8)
        pad = self.k // 2
        outs = []
        for p in range(x.shape[0]):
            xp = x[p : p + 1]
            fixed = F.conv2d(xp, self.soft_expert, padding=pad)
            routed = 0
            for j in range(TOP_K):
                w = self.leader_kernel(base, int(idx[p, j]))
                routed = routed + scores[p, j] * F.conv2d(xp, w, padding=pad)
            outs.append(torch.cat([fixed, routed], 1))
        out = self.post(torch.cat(outs, 0))
        return out, logits, probs, idx, scores


def load_balance_loss(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    imp = probs.mean(0)
    cv2 = imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-8)
    z = 1e-4 * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return cv2 + z


class CMoE(nn.Module):
    def __init__(self, d: int, c: int = EMBED_C):
        super().__init__()
        self.conv_share = conv_na(d, c, 1)
        self.conv_prior = conv_na(d, c, 1)
        self.conv_cond = nn.Sequential(
            nn.Sequential(nn.Conv2d(2 * c, c, 3, 1, 1, bias=False), bn(c), nn.GELU(approximate="none")),
            norm_act(c),
            nn.Conv2d(c, c, 1, bias=False),
            norm_act(c),
        )
        self.MoEs = nn.ModuleList([MiMoE(k, c) for k in KERNELS])
        self.expert_bases = nn.ParameterList([nn.Parameter(torch.zeros(BASE_N, c, c, k, k)) for k in KERNELS])
        self.conv_out_first = conv_na(3 * c, d, 1)
        self.conv_out_second = nn.Conv2d(c, 1, 1, bias=True)  # unused
        self.prior_head = nn.Conv2d(c, 1, 1, bias=True)  # unused

    def forward(self, g, u):
        """g, u: [P, D, h, w] (general feature of each pair's sample, prior of the pair)."""
        key = self.conv_share(g)
        query = self.conv_prior(u)
        cond = self.conv_cond(torch.cat([key, query], 1))
        gml = cond.mean(dim=(2, 3))
        outs, gates, loss = [], [], 0
        for moe, base in zip(self.MoEs, self.expert_bases):
            o, logits, probs, idx, scores = moe(key, gml, base)
            outs.append(o)
            gates.append(dict(logits=logits, probs=probs, idx=idx, scores=scores))
            loss = loss + load_balance_loss(logits, probs)
        y = self.conv_out_first(torch.cat(outs, 1))
        return y, gates, loss


class CMoEs(nn.ModuleList):
    def __init__(self):
        super().__init__([CMoE(d) for d in LEVEL_DIMS])


# --------------------------------------------------------------------------- full model
def gaussian_kernel(ks: int = 15, sigma: float = 4.0, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(ks, dtype=torch.float64) - ks // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


def pair_order(modality_num: Sequence[int], m_slots: int = M_SLOTS):
    """slot-first packing: all samples' slot 0, then slot 1, ..."""
    ps, pm = [], []
    for m in range(m_slots):
        for b, n in enumerate(modality_num):
            if m < int(n):
                ps.append(b)
                pm.append(m)
    return ps, pm


def moe_anneal(epoch: int, horizon: int = 200, mode: str = "reference") -> float:
    if mode == "paper":
        return (1 - epoch / horizon) ** 2
    return max(1 - epoch / horizon, 0.001)


class UniMMAD(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.general = GeneralMultimodalEncoder()
        self.embed = InputEmbedding(size)
        self.cmoes = CMoEs()
        self.prior = WideResNet50_2(with_fc=True)
        for p in self.prior.parameters():
            p.requires_grad_(False)

    # parts in the reference checkpoint layout
    def parts(self):
        return {"general_multimodal_encoder": self.general, "input_embedding": self.embed, "c_moes": self.cmoes}

    def train(self, mode: bool = True):
        super().train(mode)
        self.prior.eval()  # frozen, always running statistics
        return self

    def load_numpy(self, general: dict, embed: dict, cmoes: dict, prior: dict):
        def cv(sd):
            return {k: torch.from_numpy(v.copy()) for k, v in sd.items()}

        self.general.load_state_dict(cv(general), strict=True)
        self.embed.load_state_dict(cv(embed), strict=True)
        self.cmoes.load_state_dict(cv(cmoes), strict=True)
        self.prior.load_state_dict(cv(prior), strict=True)

    def load_checkpoint(self, folder: str | Path, prior_file: str | Path):
        from safetensors.torch import load_file

        folder = Path(folder)
        self.general.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        self.embed.load_state_dict(load_file(folder / "model_1.safetensors"), strict=True)
        self.cmoes.load_state_dict(load_file(folder / "model_2.safetensors"), strict=True)
        self.prior.load_state_dict(load_file(str(prior_file)), strict=True)

    def forward(self, img, specific_images, modality_num):
        modality_num = [int(n) for n in modality_num]
        ps, pm = pair_order(modality_num, specific_images.shape[1])
        e = self.embed(img)
        gen = [F.normalize(f, dim=1, eps=1e-12) for f in self.general(e)]
        pair_imgs = specific_images[torch.tensor(ps), torch.tensor(pm)]
        with torch.no_grad():
            pri = [F.normalize(f, dim=1, eps=1e-12) for f in self.prior(pair_imgs)]
        ys, gates, moe_losses = [], [], []
        idx = torch.tensor(ps)
        for lvl, cm in enumerate(self.cmoes):
            y, g, moe_loss = cm(gen[lvl][idx], pri[lvl])
            ys.append(y)
            gates.append(g)
            moe_losses.append(moe_loss)
        return dict(
            pair_sample=ps, pair_slot=pm, prior=pri, decompressed=ys, gates=gates, moe_losses=moe_losses, general=gen
        )

    @staticmethod
    def losses(out, loss_weight, epoch: int, anneal: str = "reference"):
        ts = []
        for u, y in zip(out["prior"], out["decompressed"]):
            d = 1 - F.cosine_similarity(u, y, dim=1, eps=1e-8)  # [P, h, w]
            f = d * d.detach() ** 2
            ts.append(f.flatten(1).mean(1))
        t = torch.stack(ts)  # [3, P]
        cos_loss = 3 * t.mean() * loss_weight.mean()
        moe_loss = moe_anneal(epoch, mode=anneal) * torch.stack(out["moe_losses"]).mean()
        return cos_loss + moe_loss, cos_loss, moe_loss

    def anomaly_maps(self, out, batch: int):
        H = W = self.size
        ps = out["pair_sample"]
        raw = []
        for b in range(batch):
            acc = 0
            for u, y in zip(out["prior"], out["decompressed"]):
                for p, s in enumerate(ps):
                    if s != b:
                        continue
                    a = 1 - F.cosine_similarity(u[p : p + 1], y[p : p + 1], dim=1, eps=1e-8)
                    a = F.interpolate(a[:, None], size=(H, W), mode="bilinear", align_corners=True)
                    acc = acc + a**2
            raw.append(torch.sqrt(acc))
        raw = torch.cat(raw, 0)  # [B, 1, H, W]
        k = gaussian_kernel(dtype=raw.dtype)[None, None]
        blurred = F.conv2d(raw, k, padding=7)
        flat = blurred.flatten(1)
        topk = max(H * W // 1000, 1)
        score = flat.topk(topk, dim=1).values.mean(1)
        return raw[:, 0], blurred[:, 0], score


def gate_margin(out) -> float:
    m = math.inf
    for lvl in out["gates"]:
        for g in lvl:
            sp = torch.sort(g["probs"], dim=-1, descending=True).values
            m = min(m, float((sp[:, TOP_K - 1] - sp[:, TOP_K]).min()))
    return m
