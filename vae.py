"""Video autoencoders: videos x (B, 3, T, H, W) in [-1, 1] <-> latents z (B, C, T', H', W').

Diffusion runs on the latents. Every kind is one small class with the same interface:

    vae = build_vae("sd", device="cuda", dtype=torch.bfloat16)
    z = vae.encode(x)                            # (B, 4, T, H/8, W/8)
    x = vae.decode(z)                            # (B, 3, T, H, W), about [-1, 1]
    vae.out_channels, vae.compression            # 4, (1, 8, 8): what train.py needs to size the model
    vae.latent_shape(16, 256, 256)               # (16, 32, 32)

Kinds: "raw" (pixels, identity: for tiny debug runs) and "sd" (Stable Diffusion's image VAE applied to
each frame, as Open-Sora v1.0 does). Shape letters as in SPEC.md: B batch, C channels, T frames, H, W.
"""
import os

import torch
import torch.nn as nn
from einops import rearrange

SD_VAE = "stabilityai/sd-vae-ft-ema"   # Open-Sora v1.0's VAE: SD's KL-f8 with an EMA fine-tuned decoder
# SD's latents have a standard deviation of about 1/0.18215 (measured by the latent-diffusion authors on
# their training set); diffusion noise schedules assume unit-variance data, so latents are scaled by it.
SD_SCALE = 0.18215


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
    """No autoencoder: the model diffuses pixels directly (tiny CPU runs, tests)."""
    kind = "raw"

    def encode(self, x, sample=True):
        return x

    def decode(self, z):
        return z


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
    GB of activations, and micro-batching is one of Open-Sora's published encoder speed-ups (SPEC.md).
    """
    kind = "sd"

    def __init__(self, path=SD_VAE, micro_batch=32, dtype=torch.float32):
        super().__init__()
        path = os.path.expanduser(path)
        _check_folder(path)
        from diffusers import AutoencoderKL   # imported here so 'raw' runs need no diffusers import
        try:
            self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
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
        """Channels-last weights and compiled encoder and decoder (GroupNorm + SiLU fused into few kernels):
        on an H100 in bf16, 2.0x the plain calls' frames/s at 256x256 and 1.4x at 512x512 (bench.py --encoders).
        Channels-last alone is slower: cuDNN then converts layouts around every eager GroupNorm."""
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


def build_vae(kind="raw", path=None, micro_batch=32, device="cpu", dtype=torch.float32):
    """The autoencoder train.py and sample.py use; `path` overrides the kind's default weights."""
    if kind == "raw":
        return RawVAE().to(device)
    if kind == "sd":
        return SDVAE(path or SD_VAE, micro_batch=micro_batch, dtype=dtype).to(device)
    raise ValueError(f"unknown VAE kind '{kind}': use 'raw' or 'sd'")
