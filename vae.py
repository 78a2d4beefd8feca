"""Video autoencoders: videos x (B, 3, T, H, W) in [-1, 1] <-> latents z (B, C, T', H', W').

Diffusion runs on the latents. Every kind is one small class with the same interface:

    vae = build_vae("sd", device="cuda", dtype=torch.bfloat16)
    z = vae.encode(x)                            # (B, 4, T, H/8, W/8)
    x = vae.decode(z)                            # (B, 3, T, H, W), about [-1, 1]
    vae.out_channels, vae.compression            # 4, (1, 8, 8): what train.py needs to size the model
    vae.latent_shape(16, 256, 256)               # (16, 32, 32)

Kinds: "raw" (pixels, identity: for tiny debug runs), "sd" (Stable Diffusion's image VAE applied to each
frame, as Open-Sora v1.0 does), "vqvae" (VideoGPT's video VQ-VAE, x2 in time and x4 in space, whose
continuous code embeddings the March 2024 release diffused) and "video" (Wan 2.1's causal 3D VAE from
diffusers, x4 in time and x8 in space). No VQ-VAE weights can be downloaded here, so train_vqvae.py trains one
(`python vae.py train` forwards to it):

    python vae.py train --demo --out outputs/vqvae          # demo clips, PSNR on held-out clips
    python vae.py train --data data.csv --out outputs/vqvae  # any manifest (see data.py)
    python train.py --data data.csv --vae vqvae --vae-path outputs/vqvae

Shape letters as in model.py's docstring: B batch, C channels, T frames, H, W.
"""
import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pickle import UnpicklingError

import huggingface_hub
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file

from text import hub_offline

SD_VAE = "stabilityai/sd-vae-ft-ema"   # Open-Sora v1.0's VAE: SD's KL-f8 with an EMA fine-tuned decoder
# SD's latents have a standard deviation of about 1/0.18215 (measured by the latent-diffusion authors on
# their training set); diffusion noise schedules assume unit-variance data, so latents are scaled by it.
SD_SCALE = 0.18215
# Wan 2.1's VAE, in the vae/ folder of its Diffusers pipeline (the 1.3B and 14B text-to-video models share it)
WAN_VAE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


class VideoVAE(nn.Module):
    """What every kind shares: its latent channels, its (t, h, w) compression and the size checks."""
    kind = "video"
    out_channels = 3
    compression = (1, 1, 1)       # (frames, height, width) downsampling factors

    def check_size(self, T, H, W):
        ct, ch, cw = self.compression
        if T % ct or H % ch or W % cw:
            raise ValueError(f"the {self.kind} VAE cannot compress {T} frames of {H}x{W}: frames, height and "
                             f"width must be multiples of {ct}, {ch} and {cw}; resize or crop the videos to "
                             f"such a size (e.g. 16 frames of 256x256)")

    def latent_shape(self, T, H, W):
        """(T', H', W') of the latents for T frames of H x W pixels."""
        self.check_size(T, H, W)
        ct, ch, cw = self.compression
        return T // ct, H // ch, W // cw


class RawVAE(VideoVAE):
    """No autoencoder: the model diffuses pixels directly (tiny CPU runs, tests), standardised with the data's mean
    and standard deviation (pixel_norm) as latent VAEs scale theirs to about unit variance (SD's 0.18215)."""
    kind = "raw"

    def __init__(self, pixel_norm=(0.0, 1.0)):
        super().__init__()
        self.mean, self.std = map(float, pixel_norm)
        if not self.std > 0:
            raise ValueError(f"--pixel-norm {self.mean:g} {self.std:g}: the standard deviation must be positive")

    def encode(self, x, sample=True):
        return (x - self.mean) / self.std

    def decode(self, z):
        return z * self.std + self.mean


def _missing_weights(path, why):
    return FileNotFoundError(
        f"VAE weights '{path}' not found ({why}): pass --vae-path with a local folder holding the model's "
        f"config.json and weights, or a hub id this machine can reach, or use --vae raw which needs none")


def _check_folder(path):
    """A local path that is not a model folder is a typo, not a hub id: say so without a network round trip."""
    if os.path.isabs(path) or path.startswith(".") or os.path.isdir(path):
        if not os.path.isdir(path):
            raise _missing_weights(path, "no such folder")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise _missing_weights(path, "the folder has no config.json")


class SDVAE(VideoVAE):
    """Stable Diffusion's image VAE (diffusers AutoencoderKL) applied frame by frame.

    Frames are independent images to it, so a video of B x T frames is a batch of B*T images, which is
    run in micro-batches of `micro_batch` frames: at 64 frames of 512x512 one batch would need tens of
    GB of activations. Open-Sora v1.0 does the same (opensora/models/vae/vae.py: VideoAutoencoderKL's
    micro_batch_size).
    """
    kind = "sd"

    def __init__(self, path=SD_VAE, micro_batch=32, dtype=torch.float32):
        super().__init__()
        path = os.path.expanduser(path)
        _check_folder(path)
        from diffusers import AutoencoderKL   # imported here so 'raw' runs need no diffusers import
        try:
            self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=hub_offline(path))
        except OSError:
            # diffusers raises OSError for an unknown hub id and an unreachable hub alike;
            # `from None` keeps the screen to the one sentence that says what to do
            raise _missing_weights(path, "not a folder here, and the hub lacks it or cannot be reached") from None
        self.vae.eval().requires_grad_(False)             # a frozen feature extractor, never trained here
        self.micro_batch = micro_batch
        self.out_channels = self.vae.config.latent_channels                    # 4 for SD
        # every encoder block but the last halves the resolution: 4 blocks -> x8 for SD
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.compression = (1, factor, factor)

    def compile_for_speed(self):
        """Channels-last weights and compiled encoder and decoder (GroupNorm + SiLU fused into few kernels): 1.86x
        the plain calls' frames/s on an H100 in bf16 at 256x256 (bench.py --encoders); channels-last alone is slower
        (docs/LOG.md, compiling the SD-VAE)."""
        self.vae.to(memory_format=torch.channels_last)
        self.vae.encoder.compile()
        self.vae.decoder.compile()
        return self

    def _frames(self, x, fn):
        """Apply fn to the frames of x (B, C, T, H, W) in micro-batches; returns (B, C', T, H', W')."""
        B = x.shape[0]
        frames = rearrange(x, "B C T H W -> (B T) C H W").to(self.vae.dtype)
        step = self.micro_batch or frames.shape[0]     # 0 / None: all frames in one batch
        out = torch.cat([fn(chunk) for chunk in frames.split(step)])
        # float32 out, whatever the VAE ran in: callers cast to their own training dtype
        return rearrange(out, "(B T) C H W -> B C T H W", B=B).float()

    @torch.no_grad()
    def encode(self, x, sample=True):
        """x (B, 3, T, H, W) in [-1, 1] -> z (B, 4, T, H/8, W/8), scaled to about unit variance.

        Draws from the posterior N(mean, std) as Open-Sora v1.0 does (a little noise that regularises
        training); sample=False returns its mean, deterministic, for evaluation and tests.
        """
        self.check_size(*x.shape[2:])

        def encode_frames(frames):
            posterior = self.vae.encode(frames).latent_dist
            return (posterior.sample() if sample else posterior.mode()) * SD_SCALE
        return self._frames(x, encode_frames)

    @torch.no_grad()
    def decode(self, z):
        """z (B, 4, T, H', W') -> x (B, 3, T, 8H', 8W'), about [-1, 1] (not clamped: savers clamp)."""
        return self._frames(z, lambda frames: self.vae.decode(frames / SD_SCALE).sample)


class WanVAE(VideoVAE):
    """Wan 2.1's video VAE (diffusers AutoencoderKLWan): 3D causal convolutions, 16 channels, x4 in time, x8 in space.

    Causal in time: the first frame is encoded alone (so it is also an image's latent), then every 4 frames
    give one latent frame, seeing only the frames before them. A clip of T = 1 + 4k frames has 1 + k latent
    frames: 17 -> 5, 33 -> 9, 1 (an image) -> 1. Other lengths would silently lose their last frames inside
    diffusers, so check_size refuses them.
    """
    kind = "video"

    def __init__(self, path=WAN_VAE, micro_batch=32, dtype=torch.float32):
        super().__init__()
        path = os.path.expanduser(path)
        # a Diffusers pipeline (hub id or folder) keeps its VAE in vae/; a folder may also hold the VAE alone
        subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else "vae"
        _check_folder(os.path.join(path, subfolder or ""))
        from diffusers import AutoencoderKLWan   # imported here so other kinds need no diffusers import
        try:
            self.vae = AutoencoderKLWan.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype,
                                                        local_files_only=hub_offline(path))
        except OSError:
            raise _missing_weights(path, "not a folder here, and the hub lacks it or cannot be reached") from None
        self.vae.eval().requires_grad_(False)
        cfg = self.vae.config
        self.micro_batch = micro_batch
        self.out_channels = cfg.z_dim
        # every level but the last halves H and W; temperal_downsample (sic, diffusers' name) marks the levels
        # that also halve T: [False, True, True] -> x4
        self.compression = (2 ** sum(cfg.temperal_downsample), *(2 ** (len(cfg.dim_mult) - 1),) * 2)
        # Wan's pipelines bring each latent channel to zero mean and unit variance with statistics measured
        # on its training data (the config's latents_mean / latents_std): SD's single 0.18215, per channel
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    def check_size(self, T, H, W):
        ct, ch, cw = self.compression
        if (T - 1) % ct or H % ch or W % cw:
            raise ValueError(f"the video VAE cannot compress {T} frames of {H}x{W}: it is causal in time and takes "
                             f"1 + {ct}k frames (1, {1 + ct}, {1 + 2 * ct}, ..., 17, 33) of a height and width that are "
                             f"multiples of {ch} and {cw}; use e.g. --num-frames 17 --image-size 256 256")

    def latent_shape(self, T, H, W):
        self.check_size(T, H, W)
        ct, ch, cw = self.compression
        return 1 + (T - 1) // ct, H // ch, W // cw

    def _videos(self, x, fn):
        """Apply fn to whole videos of x (B, C, T, H, W), as many per call as fit in micro_batch frames."""
        step = max(1, (self.micro_batch or x.shape[0] * x.shape[2]) // x.shape[2])
        return torch.cat([fn(chunk.to(self.vae.dtype)).float() for chunk in x.split(step)])

    @torch.no_grad()
    def encode(self, x, sample=True):
        """x (B, 3, 1 + 4k, H, W) in [-1, 1] -> z (B, 16, 1 + k, H/8, W/8), normalised per channel."""
        self.check_size(*x.shape[2:])

        def encode_videos(videos):
            posterior = self.vae.encode(videos).latent_dist
            return posterior.sample() if sample else posterior.mode()
        return (self._videos(x, encode_videos) - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z):
        """z (B, 16, 1 + k, H', W') -> x (B, 3, 1 + 4k, 8H', 8W'), about [-1, 1]."""
        return self._videos(z * self.std + self.mean, lambda videos: self.vae.decode(videos).sample)


# VideoGPT's VQ-VAE (Yan et al., 2021), the video-native autoencoder behind the March 2024 Open-Sora release.
# Module and buffer names follow VideoGPT's videogpt/vqvae.py (and Open-Sora-Plan's copy of it), so its
# checkpoints load with a plain load_state_dict: encoder.convs.{i}.conv, encoder.conv_last.conv,
# encoder.res_stack.{i}.block.{j}, pre_vq_conv.conv, codebook.{embeddings, N, z_avg}, post_vq_conv.conv,
# decoder.res_stack.{i}.block.{j}, decoder.convts.{i}.convt; attention projections w_qs, w_ks, w_vs, fc.

def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def _same_pad(kernel, stride):
    """F.pad widths (last axis first) that make a conv's output size exactly input / stride: k - s in all on
    each axis, the odd one in front. VideoGPT pads this way, and its weights expect exactly this alignment."""
    widths = []
    for k, s in zip(kernel[::-1], stride[::-1]):
        widths += [(k - s + 1) // 2, (k - s) // 2]
    return tuple(widths)


class SamePadConv3d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, bias=True):
        super().__init__()
        kernel, stride = _triple(kernel), _triple(stride)
        self.pad = _same_pad(kernel, stride)
        self.conv = nn.Conv3d(cin, cout, kernel, stride, bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class SamePadConvTranspose3d(nn.Module):
    """Upsampling by exactly `stride`: the input is padded as SamePadConv3d pads it, and the transposed conv's
    padding k - 1 trims the border that padding adds, so (n + k - s - 1) s - k + 2 = s n outputs per axis."""

    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        kernel, stride = _triple(kernel), _triple(stride)
        self.pad = _same_pad(kernel, stride)
        self.convt = nn.ConvTranspose3d(cin, cout, kernel, stride, padding=tuple(k - 1 for k in kernel))

    def forward(self, x):
        return self.convt(F.pad(x, self.pad))


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis of x (B, T, H, W, C); the other two axes join the batch.
    No position embedding: the convolutions around it already know where each feature is."""
    SPLIT = {"t": "B T H W (h d) -> (B H W) h T d", "h": "B T H W (h d) -> (B T W) h H d",
             "w": "B T H W (h d) -> (B T H) h W d"}

    def __init__(self, dim, heads, axis):
        super().__init__()
        self.heads, self.axis = heads, axis
        self.w_qs = nn.Linear(dim, dim, bias=False)
        self.w_ks = nn.Linear(dim, dim, bias=False)
        self.w_vs = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, dim)
        for linear in (self.w_qs, self.w_ks, self.w_vs, self.fc):
            nn.init.normal_(linear.weight, std=dim ** -0.5)       # VideoGPT's init: N(0, 1/dim)

    def forward(self, x):
        B, T, H, W, _ = x.shape
        split = self.SPLIT[self.axis]
        q, k, v = (rearrange(proj(x), split, h=self.heads) for proj in (self.w_qs, self.w_ks, self.w_vs))
        out = F.scaled_dot_product_attention(q, k, v)                 # softmax(q k^T / sqrt(d)) v
        merge = " -> ".join(split.split(" -> ")[::-1])                # the same pattern backwards
        return self.fc(rearrange(out, merge, B=B, T=T, H=H, W=W))


class AxialBlock(nn.Module):
    """Attention along width, height and time, summed: three short sequences instead of one of T*H*W."""

    def __init__(self, dim, heads=2):                                 # VideoGPT's VQ-VAE uses 2 heads
        super().__init__()
        self.attn_w = AxialAttention(dim, heads, "w")
        self.attn_h = AxialAttention(dim, heads, "h")
        self.attn_t = AxialAttention(dim, heads, "t")

    def forward(self, x):
        x = rearrange(x, "B C T H W -> B T H W C")
        x = self.attn_w(x) + self.attn_h(x) + self.attn_t(x)
        return rearrange(x, "B T H W C -> B C T H W")


class AttentionResidualBlock(nn.Module):
    """x + (BN, ReLU, 3x3x3 conv to C/2, BN, ReLU, 1x1x1 conv back to C, BN, ReLU, axial attention)(x).
    The Sequential's indices (block.0 ... block.8) are VideoGPT's key names."""

    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm3d(dim), nn.ReLU(), SamePadConv3d(dim, dim // 2, 3, bias=False),
            nn.BatchNorm3d(dim // 2), nn.ReLU(), SamePadConv3d(dim // 2, dim, 1, bias=False),
            nn.BatchNorm3d(dim), nn.ReLU(), AxialBlock(dim))

    def forward(self, x):
        return x + self.block(x)


def _halvings(factors):
    """(2, 4, 4) -> strides [(2, 2, 2), (1, 2, 2)]: each layer halves every axis that still needs halving."""
    if any(f < 1 or f & (f - 1) for f in factors) or max(factors) < 2:
        raise ValueError(f"VQ-VAE downsampling {tuple(factors)} must be powers of 2, at least one above 1 (e.g. 2 4 4)")
    left = [int(math.log2(f)) for f in factors]
    strides = []
    while max(left) > 0:
        strides.append(tuple(2 if n > 0 else 1 for n in left))
        left = [max(n - 1, 0) for n in left]
    return strides


def _res_stack(dim, layers):
    return nn.Sequential(*[AttentionResidualBlock(dim) for _ in range(layers)], nn.BatchNorm3d(dim), nn.ReLU())


class Encoder(nn.Module):
    """Strided 4x4x4 convs down to (T, H, W) / downsample, a 3x3x3 conv, then the residual attention blocks."""

    def __init__(self, hidden, res_layers, downsample):
        super().__init__()
        strides = _halvings(downsample)
        self.convs = nn.ModuleList(SamePadConv3d(3 if i == 0 else hidden, hidden, 4, s) for i, s in enumerate(strides))
        self.conv_last = SamePadConv3d(hidden, hidden, 3)
        self.res_stack = _res_stack(hidden, res_layers)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.res_stack(self.conv_last(x))


class Decoder(nn.Module):
    """The residual attention blocks, then strided 4x4x4 transposed convs back up to pixels (no final ReLU)."""

    def __init__(self, hidden, res_layers, upsample):
        super().__init__()
        strides = _halvings(upsample)
        self.res_stack = _res_stack(hidden, res_layers)
        self.convts = nn.ModuleList(SamePadConvTranspose3d(hidden, 3 if i == len(strides) - 1 else hidden, 4, s)
                                    for i, s in enumerate(strides))

    def forward(self, h):
        h = self.res_stack(h)
        for i, convt in enumerate(self.convts):
            h = convt(h)
            if i < len(self.convts) - 1:
                h = F.relu(h)
        return h


class Codebook(nn.Module):
    """n_codes vectors, each the exponential moving average of the encoder outputs assigned to it (the EMA
    variant of VQ-VAE, van den Oord et al. 2017, appendix A.1; decay 0.99), not trained by gradients.
    Buffers: embeddings (n_codes, C) the codes, N (n_codes,) EMA of how many outputs each code got per step,
    z_avg (n_codes, C) EMA of their sum, so embeddings = z_avg / N."""

    def __init__(self, n_codes, dim, decay=0.99):
        super().__init__()
        self.register_buffer("embeddings", torch.randn(n_codes, dim))
        self.register_buffer("N", torch.zeros(n_codes))               # all zero = never initialised
        self.register_buffer("z_avg", self.embeddings.clone())
        self.decay, self.ready = decay, False

    def nearest(self, flat):
        """(M, C) vectors -> (M,) indices of their nearest codes: |z|^2 - 2 z.e + |e|^2 with one matmul."""
        e = self.embeddings
        return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]).argmin(1)

    def random_outputs(self, flat, n):
        """n encoder outputs at random; a batch smaller than n repeats, jittered so that no two codes are equal."""
        if flat.shape[0] < n:
            flat = flat.repeat(math.ceil(n / flat.shape[0]), 1)
            flat = flat + torch.randn_like(flat) * 0.01 / math.sqrt(flat.shape[1])
        return flat[torch.randperm(flat.shape[0], device=flat.device)[:n]]

    def quantize(self, z):
        """z (B, C, T, H, W) -> its nearest codes, same shape (no update: decoding a diffusion sample)."""
        B, _, T, H, W = z.shape
        flat = rearrange(z.float(), "B C T H W -> (B T H W) C")
        return rearrange(self.embeddings[self.nearest(flat)], "(B T H W) C -> B C T H W", B=B, T=T, H=H, W=W)

    def forward(self, z):
        """z (B, C, T, H, W) encoder outputs -> (codes with straight-through gradient, commitment loss, perplexity).
        In training mode the codes move towards the outputs assigned to them."""
        B, _, T, H, W = z.shape
        with torch.autocast(z.device.type, enabled=False):           # distances and averages in fp32
            z = z.float()
            flat = rearrange(z, "B C T H W -> (B T H W) C")
            if self.training and not self.ready:
                self.ready = bool(self.N.sum() > 0)                    # loaded weights are initialised already
                if not self.ready:                                     # start on the data: random encoder outputs
                    start = self.random_outputs(flat.detach(), self.N.numel())
                    self.embeddings.copy_(start), self.z_avg.copy_(start), self.N.fill_(1)
                    self.ready = True
            index = self.nearest(flat.detach())
            codes = rearrange(self.embeddings[index], "(B T H W) C -> B C T H W", B=B, T=T, H=H, W=W)
            # the encoder commits to its codes (beta 0.25, VQ-VAE eq. 3); the codes themselves follow by EMA
            commitment = 0.25 * F.mse_loss(z, codes)
            if self.training:
                self.update(flat.detach(), index)
            usage = torch.bincount(index, minlength=self.N.numel()).float() / index.numel()
            perplexity = torch.exp(-(usage * (usage + 1e-10).log()).sum())  # codes in use, effectively
        # straight-through estimator: the decoder sees the codes, the encoder gets the decoder's gradient as is
        return z + (codes - z).detach(), commitment, perplexity

    @torch.no_grad()
    def update(self, flat, index):
        n = self.N.numel()
        counts = torch.bincount(index, minlength=n).float()
        sums = torch.zeros_like(self.z_avg).index_add_(0, index, flat)
        self.N.lerp_(counts, 1 - self.decay)                           # N = 0.99 N + 0.01 counts
        self.z_avg.lerp_(sums, 1 - self.decay)
        # Laplace smoothing (1e-7, as VideoGPT) so that a code with N near 0 does not divide by 0
        total = self.N.sum()
        self.embeddings.copy_(self.z_avg / ((self.N + 1e-7) / (total + n * 1e-7) * total)[:, None])
        # dead-code restart (VideoGPT): a code picked less than once per step on average moves onto a random
        # encoder output; here it restarts as if picked once per step, so it survives while it keeps being picked
        dead = (self.N < 1)[:, None]                                   # torch.where: no host sync on GPUs
        fresh = self.random_outputs(flat, n)
        self.embeddings.copy_(torch.where(dead, fresh, self.embeddings))
        self.z_avg.copy_(torch.where(dead, fresh, self.z_avg))
        self.N.copy_(torch.where(dead[:, 0], 1.0, self.N))


@dataclass
class VQVAEConfig:
    """VideoGPT's hyperparameters under its own names (what its checkpoints and Open-Sora-Plan's config.json hold).
    Defaults: VideoGPT's VQ-VAE (240 hidden, 4 residual attention layers, 2048 codes of 256 dimensions) with the
    (2, 4, 4) downsampling of its kinetics_stride2x4x4 checkpoint (its argparse default is (4, 4, 4))."""
    n_hiddens: int = 240
    n_res_layers: int = 4
    downsample: tuple = (2, 4, 4)
    embedding_dim: int = 256
    n_codes: int = 2048
    # latents are multiplied by it to about unit variance (SD's 0.18215 plays this role); measured at the end
    # of `python vae.py train`, estimated from the codebook for published checkpoints that lack it (load_vqvae)
    scaling_factor: float = 1.0

    @classmethod
    def from_dict(cls, d):
        """From VideoGPT's args / a config.json: extra keys (resolution, sequence_length, ...) are ignored."""
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None}
        if isinstance(d.get("downsample"), str):                       # Open-Sora-Plan writes "2,4,4"
            d["downsample"] = [int(s) for s in d["downsample"].split(",")]
        return cls(**{**d, "downsample": tuple(d.get("downsample", cls.downsample))})


class VQVAE(VideoVAE):
    """VideoGPT's VQ-VAE. For diffusion, encode() returns the continuous encoder outputs in code space
    (pre_vq_conv, before quantisation) and decode() snaps them to the nearest codes before decoding, as the March
    2024 release's wrapper did; decode(encode(x)) is the VQ-VAE's reconstruction. VideoGPT works on videos in
    [-0.5, 0.5], so inputs are halved and outputs doubled."""
    kind = "vqvae"

    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or VQVAEConfig()
        self.encoder = Encoder(c.n_hiddens, c.n_res_layers, c.downsample)
        self.pre_vq_conv = SamePadConv3d(c.n_hiddens, c.embedding_dim, 1)
        self.codebook = Codebook(c.n_codes, c.embedding_dim)
        self.post_vq_conv = SamePadConv3d(c.embedding_dim, c.n_hiddens, 1)
        self.decoder = Decoder(c.n_hiddens, c.n_res_layers, c.downsample)
        self.out_channels, self.compression = c.embedding_dim, tuple(c.downsample)

    def forward(self, x):
        """Training: x (B, 3, T, H, W) in [-1, 1] -> (reconstruction, reconstruction loss, commitment loss, perplexity)."""
        x = x / 2
        codes, commitment, perplexity = self.codebook(self.pre_vq_conv(self.encoder(x)))
        recon = self.decoder(self.post_vq_conv(codes))
        # VideoGPT divides the MSE by 0.06, about the pixel variance of its [-0.5, 0.5] videos: the loss starts near 1
        return recon * 2, F.mse_loss(recon.float(), x.float()) / 0.06, commitment, perplexity

    @torch.no_grad()
    def encode(self, x, sample=True):
        """x (B, 3, T, H, W) in [-1, 1] -> z (B, embedding_dim, T/2, H/4, W/4), deterministic (sample is ignored)."""
        self.check_size(*x.shape[2:])
        dtype = self.pre_vq_conv.conv.weight.dtype
        return self.pre_vq_conv(self.encoder(x.to(dtype) / 2)).float() * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, z):
        """z (B, embedding_dim, T', H', W') -> x (B, 3, 2T', 4H', 4W'), about [-1, 1]: nearest codes, then the decoder."""
        codes = self.codebook.quantize(z / self.config.scaling_factor).to(self.pre_vq_conv.conv.weight.dtype)
        return self.decoder(self.post_vq_conv(codes)).float() * 2


VQVAE_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")


def _vqvae_weights(path):
    """(config dict, state dict) from a folder (config.json + weights) or from VideoGPT's own .ckpt file."""
    if os.path.isfile(path):
        # VideoGPT's PyTorch Lightning checkpoint: hyper_parameters.args is an argparse.Namespace, which is
        # data, not code; anything else needing unpickling is refused (weights_only)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except UnpicklingError:
            raise ValueError(f"{path} holds more than weights and settings and is not unpickled, since that could "
                             f"run code: save its state_dict with config.json as a folder (see save_vqvae)") from None
        hparams = ckpt.get("hyper_parameters", {})
        args = hparams.get("args", hparams)             # VideoGPT saves its argparse args; flat dicts work too
        return (vars(args) if isinstance(args, argparse.Namespace) else dict(args)), ckpt.get("state_dict", ckpt)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for name in VQVAE_WEIGHTS:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            if name.endswith(".safetensors"):
                return config, load_file(file)
            return config, torch.load(file, map_location="cpu", weights_only=True)
    raise _missing_weights(path, f"the folder has none of {', '.join(VQVAE_WEIGHTS)}")


def load_vqvae(path):
    """A VQ-VAE from a folder written by save_vqvae (or Open-Sora-Plan's layout), a VideoGPT .ckpt, or a hub id
    (its config.json and weights are fetched into the hub cache, then read as a folder)."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        _check_folder(path)
        if not os.path.isdir(path):
            try:
                path = huggingface_hub.snapshot_download(path, allow_patterns=["config.json", *VQVAE_WEIGHTS],
                                                         local_files_only=hub_offline(path))
            except (OSError, ValueError):   # offline, unknown repo and malformed id all end here
                raise _missing_weights(path, "not a folder here, and the hub lacks it or cannot be reached") from None
            _check_folder(path)
    settings, state = _vqvae_weights(path)
    model = VQVAE(VQVAEConfig.from_dict(settings))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit a VQ-VAE with {model.config} ({' '.join(str(e).split())[:300]}): "
                         "check config.json's n_hiddens, n_res_layers, downsample, embedding_dim and n_codes") from None
    if "scaling_factor" not in settings:
        # published checkpoints do not know it; the codes are averages of encoder outputs, so their spread
        # estimates the latents' spread
        model.config.scaling_factor = 1 / model.codebook.embeddings.float().std().item()
    return model


def save_vqvae(model, folder):
    """config.json + model.safetensors, each written to a temporary name and renamed: a crash keeps the last pair."""
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "model.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(folder, "config.json.tmp"), "w") as f:
        json.dump({**asdict(model.config), "downsample": list(model.config.downsample)}, f, indent=1)
    os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))


def build_vae(kind="raw", path=None, micro_batch=32, device="cpu", dtype=torch.float32, pixel_norm=(0.0, 1.0)):
    """The autoencoder train.py and sample.py use; `path` overrides the kind's default weights."""
    if kind == "raw":
        return RawVAE(pixel_norm).to(device)
    if kind == "sd":
        return SDVAE(path or SD_VAE, micro_batch=micro_batch, dtype=dtype).to(device)
    if kind == "vqvae":
        if not path:
            raise FileNotFoundError("--vae vqvae needs --vae-path: a folder written by `python vae.py train` (config.json "
                                    "+ model.safetensors), a VideoGPT .ckpt or a hub id; no VQ-VAE weights are built in")
        vae = load_vqvae(path).to(device, dtype).eval().requires_grad_(False)
        vae.codebook.float()                  # nearest-code search stays in fp32: neighbouring codes are close
        return vae
    if kind == "video":
        return WanVAE(path or WAN_VAE, micro_batch=micro_batch, dtype=dtype).to(device)
    raise ValueError(f"unknown VAE kind '{kind}': use 'raw', 'sd', 'vqvae' or 'video'")


if __name__ == "__main__":
    # `python vae.py train FLAGS` is train_vqvae.py's command (it reads clips with data.py, which this library never
    # imports); imported only here, where this file runs as the script `__main__`, not as the module vae
    command = argparse.ArgumentParser(prog="vae.py", description=__doc__.split("\n\n")[0])
    command.add_argument("command", choices=["train"], help="train: train the VQ-VAE (python vae.py train --help)")
    command.add_argument("flags", nargs=argparse.REMAINDER, help="the command's flags")
    import train_vqvae
    train_vqvae.main(command.parse_args().flags, prog="vae.py train")
