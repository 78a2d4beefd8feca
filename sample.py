"""
Sample videos (or images) from a checkpoint written by train.py or from a released weights file.

  python sample.py --ckpt outputs/demo --prompt "a red circle moving left"
  python sample.py --ckpt outputs/run/checkpoints/step_0010000 --prompt-file prompts.txt --sampler dpm --steps 20
  python sample.py --ckpt outputs/run --prompt-file prompts.txt --fp8 --compile          # fastest on an H100/H200
  torchrun --nproc_per_node=4 sample.py --ckpt outputs/run --prompt "..." --num-frames 360   # one long video on 4 GPUs

Released weights, sampled as the published scripts sample them (README, "Sample from the released weights"):

  python sample.py --ckpt OpenSora-v1-HQ-16x512x512.pth --preset opensora-v1-16x512 --prompt "a beach at sunset"
  python sample.py --ckpt DiT-XL-2-256x256.pt --preset dit-xl2-256 --noise published     # DiT's 8 class labels

A train.py folder rebuilds its model and encoders from meta.json. A bare .pt/.pth/.safetensors file needs the
architecture (--model, or a --preset that names it); its channels, classes and caption size are read from the
tensors. A released file name that is not a local file is downloaded into a cache (WEIGHTS_CACHE) from where the
original scripts download it. A preset sets every value of the published inference config; flags given on the
command line win over it. Writes one mp4 per prompt and a PNG grid of frames; one-frame models write PNG images
and a grid of 4 a row.
"""
import argparse
import gc
import json
import math
import os
import re
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from einops import rearrange
from tqdm import tqdm

import checkpoint
import data
import seqparallel
from checkpoint import RunError
from fp8 import Fp8Linear, FuseRounding, quantize_fp8
from text import TextEncoder
from vae import build_vae

# The noise schedule, defined once: 1000 steps with linear betas 1e-4 .. 0.02, DiT's create_diffusion defaults
# (diffusion/__init__.py, noise_schedule="linear") that Open-Sora v1.0's IDDPM keeps. train.py's IDDPM builds its
# loss tables from it, so the samplers below see the betas the model learned.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision):
    """The mixed-precision context for "fp32" (none), "bf16" or "fp16", on device's type: training and sampling."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def training_betas():
    """SCHEDULE's 1000 betas in float64, as IDDPM's get_named_beta_schedule("linear") computes them."""
    return np.linspace(SCHEDULE["beta_start"], SCHEDULE["beta_end"], SCHEDULE["num_train_timesteps"], dtype=np.float64)


def respace(num_steps, steps):
    """The training steps that a sampler of `steps` steps visits, as IDDPM's space_timesteps(num_steps, str(steps))
    picks them: evenly strided from 0 to num_steps - 1 and rounded, so 100 of 1000 are 0, 10, ..., 50, 61, ..., 989,
    999 (diffusers' "leading" spacing gives 0, 10, ..., 990: another sampler)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"{steps} sampling steps: choose 1 to {num_steps}, the steps the model was trained on")
    stride, at, kept = (num_steps - 1) / (steps - 1) if steps > 1 else 1, 0.0, []
    for _ in range(steps):  # accumulated, then rounded half to even, as IDDPM does it
        kept.append(round(at))
        at += stride
    return kept


class IDDPMSampler:
    """IDDPM's ancestral sampler (Nichol & Dhariwal, 2021) over a respaced subset of the training steps: the
    p_sample_loop that DiT's and Open-Sora v1.0's sample scripts run. The kept steps t_0 < ... < t_{n-1} form a
    process of their own, with beta_i = 1 - abar(t_i) / abar(t_{i-1}); the model is called with t_i itself. Tables
    are computed in float64 and used in float32, as there."""

    def __init__(self, steps, learn_sigma):
        self.timesteps = respace(SCHEDULE["num_train_timesteps"], steps)
        abar = np.cumprod(1 - training_betas())[self.timesteps]
        betas = 1 - abar / np.append(1.0, abar[:-1])
        ab = np.cumprod(1 - betas)  # the respaced process's own abar, recomputed from its betas as IDDPM does
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1 - ab_prev) / (1 - ab)  # IDDPM eq. 10, beta-tilde; 0 at the first step
        tables = dict(sqrt_recip_ab=np.sqrt(1 / ab), sqrt_recipm1_ab=np.sqrt(1 / ab - 1),
                      coef_x0=betas * np.sqrt(ab_prev) / (1 - ab), coef_xt=(1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab),
                      min_log=np.log(np.append(post_var[1:2], post_var[1:])), max_log=np.log(betas))
        # float32 values as Python floats: a tensor times a float is one kernel, with nothing copied to the GPU
        self.tables = {k: [float(np.float32(v)) for v in values] for k, values in tables.items()}
        self.learn_sigma = learn_sigma

    def step(self, out, i, x, noise):
        """x at kept step i-1 from x at step i (IDDPM eqs. 10-15): out is the model's (guided) output, eps then,
        with a learned variance, v in [-1, 1], which interpolates the log variance between beta-tilde and beta.
        No noise at the last step (i = 0). No clipping of x0."""
        T = self.tables
        x = x.float()
        eps, v = out[:, :x.shape[1]], out[:, x.shape[1]:]
        x0 = T["sqrt_recip_ab"][i] * x - T["sqrt_recipm1_ab"][i] * eps
        mean = T["coef_x0"][i] * x0 + T["coef_xt"][i] * x
        if i == 0:
            return mean
        if self.learn_sigma:
            frac = (v + 1) / 2
            log_var = frac * T["max_log"][i] + (1 - frac) * T["min_log"][i]
        else:
            log_var = torch.full_like(mean, T["min_log"][i])
        return mean + torch.exp(0.5 * log_var) * noise


# Rectified flow as Open-Sora 1.2 trains and samples it (v1.2.0 opensora/schedulers/rf/): x_t = (1 - t/1000) x0 +
# (t/1000) eps is a straight line from the data (t = 0) to noise (t = 1000), the model predicts its velocity
# x0 - eps, and sampling integrates that velocity from t = 1000 down to 0 by Euler steps. The resolution and
# length shift moves the timesteps of larger or longer videos toward noise, in training and sampling alike.

def shift_ratio(height, width, latent_frames, scale=1.0):
    """Open-Sora 1.2's shift factor r = sqrt(H W / 512^2) * sqrt(latent frames) * scale (H, W in pixels; v1.2
    counts its video VAE's latent frames, ours count the latent frames of whichever VAE: per-frame VAEs keep T)."""
    return math.sqrt(height * width / 512 ** 2) * math.sqrt(latent_frames) * scale


def shift_timesteps(t, ratio):
    """t (a tensor in [0, 1000]) mapped by s -> r s / (1 + (r - 1) s) on s = t / 1000 (v1.2 timestep_transform):
    r > 1 moves timesteps toward noise, r < 1 toward the data; 0 and 1000 stay where they are."""
    s = t / 1000
    return ratio * s / (1 + (ratio - 1) * s) * 1000


class RectifiedFlowSampler:
    """Open-Sora 1.2's RFLOW.sample: n Euler steps at t_i = (1 - i/n) 1000, i = 0 .. n-1, shifted where a ratio is
    given; step i moves x by the guided velocity times dt = (t_i - t_{i+1}) / 1000, the last one down to t = 0.
    No noise is drawn after the first."""

    def __init__(self, steps, ratio=None):
        t = torch.tensor([(1 - i / steps) * 1000 for i in range(steps)])  # float32, as there
        self.timesteps = shift_timesteps(t, ratio) if ratio is not None else t
        self.dt = (self.timesteps - torch.cat([self.timesteps[1:], torch.zeros(1)])) / 1000

    def step(self, velocity, i, x):
        return x + velocity * float(self.dt[i])


def make_scheduler(kind, steps, learn_sigma, shift=None):
    """"ddpm": IDDPM's respaced ancestral sampler with the learned variance, as DiT and Open-Sora v1.0 sample;
    "ddim" (eta 0) and "dpm" (DPM-Solver++, 2nd order: good samples in about 20 steps) from diffusers; "rflow":
    the rectified-flow Euler sampler (shift: its ratio, or None for no shift)."""
    if kind == "ddpm":
        return IDDPMSampler(steps, learn_sigma)
    if kind == "rflow":
        return RectifiedFlowSampler(steps, shift)
    if kind == "ddim":
        sched = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    elif kind == "dpm":
        sched = DPMSolverMultistepScheduler(**SCHEDULE)
    else:
        raise ValueError(f"unknown sampler {kind!r}: use ddpm, ddim, dpm or rflow")
    sched.set_timesteps(steps)
    return sched


def compile_for_sampling(model):
    """The model compiled as one graph for many denoising steps of one video size: fusing across blocks saves
    what a graph per block leaves between them (3% of a forward, docs/LOG.md, "Timings that code comments used to
    carry"). With fp8 linears: CUDA graphs (mode "reduce-overhead"), whose short rounding kernels are what a graph
    saves launching, and fp8.FuseRounding, which has the norms and the residual adds before fp8 linears write their
    rows in e4m3 (docs/LOG.md, "Norms that round to fp8" and "Residual adds that round to fp8"). "max-autotune" did
    not pay for its compile time (docs/LOG.md, "Compiling the sampler"). A sequence-parallel model compiles block by
    block: its collectives stay outside the compiler."""
    if hasattr(model, "shards"):  # seqparallel.apply_sequence_parallel
        for block in model.blocks:
            block.compile()
        return model
    if not any(isinstance(m, Fp8Linear) for m in model.modules()):
        return torch.compile(model)
    # mode "reduce-overhead" (CUDA graphs), and the norms and adds round their rows for the fp8 linears themselves
    return torch.compile(model, options={"triton.cudagraphs": True, "post_grad_custom_post_pass": FuseRounding()})


def cpu_noise(shape, gen, device):
    """Standard normal noise drawn from a CPU generator, so that one seed gives the same video on any device.
    Pinned, its copy to a GPU runs behind the queued work instead of waiting for it."""
    noise = torch.randn(shape, generator=gen)
    if device.type == "cuda":
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


def noise_source(kind, seed, device):
    """draw(shape, dtype) -> standard normal noise on device. "cpu": one CPU generator, so one seed gives one video on
    any device. "published": torch.manual_seed(seed), then the device's own generator, as DiT's and Open-Sora v1.0's
    sample scripts draw it (the same seed gives their video on the same kind of device)."""
    if kind == "cpu":
        gen = torch.Generator().manual_seed(seed)
        return lambda shape, dtype: cpu_noise(shape, gen, device).to(dtype)
    if kind != "published":
        raise ValueError(f"unknown noise {kind!r}: use cpu or published")
    torch.manual_seed(seed)
    return lambda shape, dtype: torch.randn(shape, device=device, dtype=dtype)


def conditions(model, text_encoder, prompts, null_mask):
    """The guided batch's conditions: prompts first, then the null condition; returns (y, mask, force_drop) of 2B rows.
    null_mask "all": the null caption with every token valid (how train.py drops captions). "prompt": the null caption
    under each prompt's own mask, as Open-Sora v1.0 samples (IDDPM.sample passes only the prompts' mask, which STDiT
    repeats for the null half) and trains (caption dropout kept the caption's mask): for its released weights."""
    device = next(model.parameters()).device
    B = len(prompts)
    if model.cfg.num_classes:  # class-conditional models take class indices as prompts; the null class is num_classes
        y = torch.tensor([int(p) for p in prompts], device=device)
        return torch.cat([y, y]), None, torch.arange(2 * B, device=device) >= B
    y, mask, _ = text_encoder.encode(list(prompts))
    if null_mask == "prompt":
        null = model.y_embedder.y_embedding.to(device, y.dtype).expand_as(y)
        return torch.cat([y, null]), torch.cat([mask, mask]), None
    if null_mask != "all":
        raise ValueError(f"unknown null mask {null_mask!r}: use all or prompt")
    return torch.cat([y, y]), torch.cat([mask, mask]), torch.arange(2 * B, device=device) >= B


@torch.no_grad()
def denoise(model, text_encoder, prompts, latent_shape, sampler="ddpm", steps=100, cfg_scale=7.0, cfg_channels=None,
            seed=0, precision="fp32", noise="cpu", null_mask="all", shift=None, given=None):
    """Latents (B, C, T, H, W) for prompts, with classifier-free guidance on the first cfg_channels channels (all by
    default; DiT and Open-Sora v1.0 guide 3 of 4, and the prompts' half keeps its own other channels and variance).
    Every step runs one batch of 2B: the prompts, then the null condition. With noise "published" the first noise is
    drawn in the precision's dtype and each step draws noise for the whole batch of 2B, as those scripts do.
    sampler "rflow" guides the velocity (the output's first C channels); shift is its timestep-shift ratio.
    given: (latents (B, C, T, H, W), frames (B, T) bool, True = generate): the other frames are conditions, kept at
    their latents through every step, and the model is told which they are (Open-Sora 1.2's frame mask)."""
    model.eval()
    device = next(model.parameters()).device
    C, B = model.cfg.in_channels, len(prompts)
    y, mask, drop = conditions(model, text_encoder, prompts, null_mask)
    draw = noise_source(noise, seed, device)
    published = noise == "published"
    x = draw((B, C, *latent_shape), DTYPES[precision] if published else torch.float32)
    frames = keep = None
    if given is not None:  # given frames hold their latents; the model gets the frame mask of the doubled batch
        ref, frames = given[0].to(device, x.dtype), given[1].to(device)
        keep = frames[:, None, :, None, None]
        x = torch.where(keep, x, ref)
        frames = torch.cat([frames, frames])
    sched = make_scheduler(sampler, steps, model.cfg.learn_sigma, shift)
    ch = C if cfg_channels is None else cfg_channels
    timesteps = torch.tensor(sched.timesteps[::-1]) if sampler == "ddpm" else sched.timesteps
    own = sampler in ("ddpm", "rflow")  # ours; diffusers' schedulers scale their inputs and step themselves
    # the steps on the device, copied at once: a copy per step would block the CPU until the GPU has drained
    steps_here = list(zip(timesteps, timesteps.to(device)))
    for i, (t, t_device) in enumerate(tqdm(steps_here, desc=f"{sampler} sampling", leave=False)):
        xin = torch.cat([x, x]) if own else sched.scale_model_input(torch.cat([x, x]).float(), t)
        with autocast(device, precision):
            out = model(xin, t_device.expand(2 * B), y, mask, force_drop=drop, frame_mask=frames).float()
        cond, uncond = out.chunk(2)
        guided = cond[:, :C].clone()  # the noise (IDDPM) or the velocity (rectified flow)
        guided[:, :ch] = uncond[:, :ch] + cfg_scale * (cond[:, :ch] - uncond[:, :ch])  # classifier-free guidance
        if sampler == "ddpm":  # the conditional half's own variance (learned sigma) goes with it
            index = len(timesteps) - 1 - i
            z = None
            if index > 0:
                z = draw((2 * B, *x.shape[1:]), x.dtype)[:B] if published else draw(x.shape, torch.float32)
            x = sched.step(torch.cat([guided, cond[:, C:]], dim=1), index, x, z)
        elif sampler == "rflow":  # Euler along the velocity, toward the data
            x = sched.step(guided, i, x.float())
        else:  # DDIM (eta 0) and DPM-Solver++ draw no noise
            x = sched.step(guided, t, x.float()).prev_sample
        if keep is not None:
            x = torch.where(keep, x, ref.to(x.dtype))
    return x



def generate(model, vae, text_encoder, prompts, size, sampler="ddpm", steps=100, cfg_scale=7.0, cfg_channels=None,
             seed=0, precision="fp32", noise="cpu", null_mask="all", timestep_shift=False, condition=None):
    """Videos for prompts: uint8 (B, T, H, W, 3) at pixel size (T, H, W); see denoise for the rest. timestep_shift:
    "rflow" shifts its timesteps by this video's size and latent length, as the run trained. condition: (pixels
    in [-1, 1], the K frame numbers they take): (K, 3, H, W) for every prompt (read_condition), or (B, K, 3, H, W),
    a prompt's own."""
    latent_shape = vae.latent_shape(*size)
    shift = shift_ratio(size[1], size[2], latent_shape[0]) if sampler == "rflow" and timestep_shift else None
    given = None
    if condition is not None:  # encoded once, the latents of the given frames, the rest generated
        pixels, at = condition
        if vae.compression[0] != 1:
            raise ValueError(f"given frames need a VAE that keeps frames apart (raw, sd), not {type(vae).__name__}, "
                             f"whose latent frames each cover {vae.compression[0]}")
        device = next(model.parameters()).device
        with torch.no_grad():
            video = pixels.permute(1, 0, 2, 3)[None] if pixels.dim() == 4 else pixels.transpose(1, 2)  # (1 or B, 3, K, H, W)
            latents = vae.encode(video.to(device), sample=False).float()  # (1 or B, C, K, h, w)
        ref = torch.zeros(len(prompts), latents.shape[1], *latent_shape, device=device)
        ref[:, :, at] = latents
        frames = torch.ones(len(prompts), latent_shape[0], dtype=torch.bool)
        frames[:, at] = False
        given = (ref, frames)
    x = denoise(model, text_encoder, prompts, latent_shape, sampler, steps, cfg_scale, cfg_channels, seed, precision,
                noise, null_mask, shift, given)
    with torch.no_grad():
        video = vae.decode(x).float()  # (B, 3, T, H, W) in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def file_stem(i, prompt):
    """003_a_red_circle_moving_left: the sample's number and its prompt, safe as a file name."""
    return f"{i:03d}_" + re.sub(r"[^a-zA-Z0-9]+", "_", str(prompt)).strip("_")[:60]


# what one sample.py run writes into --outdir: an earlier run's are replaced only with --overwrite
OUTPUT_NAMES = re.compile(r"\d{3}_.*\.(mp4|png)|grid\.png|score\.json")


def claim_outdir(args):
    """--outdir for this run alone (main holds its checkpoint.RunLock, the lock train.py takes): an earlier run's
    samples are refused unless --overwrite, which deletes those files (no others) first, so that the folder never
    mixes two runs."""
    earlier = sorted(n for n in os.listdir(args.outdir) if OUTPUT_NAMES.fullmatch(n))
    if earlier and not args.overwrite:
        raise RunError(f"{args.outdir} holds an earlier run's samples ({len(earlier)} files, e.g. {earlier[0]}): "
                       "replace them with --overwrite, or choose another --outdir")
    for name in earlier:
        os.remove(os.path.join(args.outdir, name))
    if earlier:
        print(f"--overwrite: deleted the {len(earlier)} files of an earlier run in {args.outdir}")


def save_videos(frames, prompts, outdir, fps=8, grid_frames=8, enlarge=False):
    """One mp4 per prompt plus grid.png: a row per prompt, grid_frames frames evenly spread in time. With enlarge
    (the demos), frames under 96 pixels a side are written larger by a whole factor, each pixel a block, so that a
    player shows the CPU demo's 12x12 frames at a size one can see."""
    os.makedirs(outdir, exist_ok=True)
    scale = max(1, -(-96 // min(frames.shape[2:4]))) if enlarge else 1
    frames = frames.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    paths = []
    for i, (video, prompt) in enumerate(zip(frames, prompts)):
        paths.append(os.path.join(outdir, f"{file_stem(i, prompt)}.mp4"))
        data.write_video(paths[-1], video, fps=fps)
    T = frames.shape[1]
    pick = torch.linspace(0, T - 1, min(grid_frames, T)).round().long()
    data.write_png(os.path.join(outdir, "grid.png"), rearrange(frames[:, pick], "B T H W c -> (B H) (T W) c").contiguous())
    return paths


def save_images(images, prompts, outdir, per_row=4):
    """One PNG per prompt plus grid.png with per_row images a row, 2 black pixels around each (DiT's sample.py saves
    its samples so, through torchvision's save_image)."""
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        paths.append(os.path.join(outdir, f"{file_stem(i, prompt)}.png"))
        data.write_png(paths[-1], image)
    n, (H, W) = len(images), images.shape[1:3]
    cols = min(per_row, n)
    rows = -(-n // cols)
    grid = torch.zeros(rows * (H + 2) + 2, cols * (W + 2) + 2, 3, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = image
    data.write_png(os.path.join(outdir, "grid.png"), grid)
    return paths


# The published inference configs. Open-Sora v1.0.0's configs/opensora/inference/*.py (T5 in fp32: its T5Encoder's
# default dtype; the VAE and STDiT cast to fp16) and DiT's sample.py (fp32; 8 class labels; --vae mse by default).
# null_mask "prompt" reproduces how Open-Sora v1.0 masks the null caption (see conditions()).
_OPEN_SORA_V1 = dict(model="STDiT-XL/2", text_encoder="t5", text_len=120, text_dtype="fp32", vae="sd",
                     vae_path="stabilityai/sd-vae-ft-ema", vae_micro_batch=0, sampler="ddpm", steps=100, cfg_scale=7.0,
                     cfg_channels=3, precision="fp16", seed=42, null_mask="prompt")
_DIT = dict(model="DiT-XL/2", num_frames=1, vae="sd", vae_path="stabilityai/sd-vae-ft-mse", vae_micro_batch=0,
            sampler="ddpm", steps=250, cfg_scale=4.0, cfg_channels=3, precision="fp32", seed=0, fps=1,
            prompts=["207", "360", "387", "974", "88", "979", "417", "279"])
PRESETS = {
    "opensora-v1-16x256": dict(_OPEN_SORA_V1, num_frames=16, image_size=[256, 256], space_scale=0.5, time_scale=1.0,
                               fps=24 // 3),
    "opensora-v1-16x512": dict(_OPEN_SORA_V1, num_frames=16, image_size=[512, 512], space_scale=1.0, time_scale=1.0,
                               fps=24 // 3),
    "opensora-v1-64x512": dict(_OPEN_SORA_V1, num_frames=64, image_size=[512, 512], space_scale=1.0, time_scale=2 / 3,
                               fps=24 // 2, vae_micro_batch=128),
    "dit-xl2-256": dict(_DIT, image_size=[256, 256]),
    "dit-xl2-512": dict(_DIT, image_size=[512, 512]),
}
# what neither a preset, nor a checkpoint's meta.json, nor the command line sets
DEFAULTS = dict(sampler="ddpm", steps=100, cfg_scale=7.0, cfg_channels=None, seed=0, precision="fp32", fps=8,
                noise="cpu", null_mask="all", text_encoder="t5", text_len=120, text_dtype=None, vae="sd", vae_path=None,
                vae_micro_batch=32, space_scale=1.0, time_scale=1.0, model=None, prompts=[], num_frames=None,
                image_size=None, pixel_norm=(0.0, 1.0), timestep_shift=None)


def get_args(argv=None):
    """The command line over the preset (if any) over DEFAULTS; args.given names what the command line set (a train.py
    folder's meta.json fills in the rest of its encoders and size)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py experiment or checkpoint folder; a .pt/.pth/.safetensors "
                   f"file; or a released file name, downloaded into the cache: {', '.join(checkpoint.RELEASED)}")
    p.add_argument("--preset", choices=list(PRESETS), help="a published inference config: every value it sets "
                   "(model, scales, frames, size, fps, encoders, sampler, steps, guidance, precision, seed)")
    p.add_argument("--model", help="the architecture of a bare weights file (model.PRESETS, e.g. STDiT-XL/2, DiT-XL/2)")
    p.add_argument("--space-scale", type=float, help="bare files: position scale in space (Open-Sora v1.0: 0.5 at 256px)")
    p.add_argument("--time-scale", type=float, help="bare files: position scale in time (Open-Sora v1.0: 2/3 at 64 frames)")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable); class index for class-conditional models")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--demo-prompts", action="store_true", help="the demo's 16 fixed prompts (data.DEMO_PROMPTS)")
    p.add_argument("--num-samples", type=int, default=1, help="videos per prompt, each from its own noise")
    p.add_argument("--score", action="store_true", help="grade demo samples: dominant colour and motion direction vs the prompt")
    p.add_argument("--num-frames", type=int, help="default: the training clip length (train.py folders) or the preset's")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="default: the training size or the preset's")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm", "rflow"], help="IDDPM runs: ddpm (default), IDDPM's "
                   "respaced sampler as DiT and Open-Sora v1.0 sample, or diffusers' DDIM and DPM-Solver++; rectified-flow "
                   "runs (train.py --objective rflow): rflow, Open-Sora 1.2's Euler sampler (their default)")
    p.add_argument("--steps", type=int, help="sampling steps (default 100; rflow 30)")
    p.add_argument("--timestep-shift", action=argparse.BooleanOptionalAction, help="rflow: shift the timesteps by the "
                   "video's size and length (default: as the run trained; on for bare files, as Open-Sora 1.2)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 7.0)")
    p.add_argument("--cfg-channels", type=int, help="guide only the first N latent channels (DiT and Open-Sora v1.0: 3)")
    p.add_argument("--noise", choices=["cpu", "published"], help="cpu (default): a CPU generator, one seed gives one "
                   "video on any device; published: drawn on the device as DiT's and Open-Sora v1.0's scripts draw it")
    p.add_argument("--null-mask", choices=["all", "prompt"], help="the null caption's valid tokens: all (default, "
                   "how train.py drops captions) or the prompt's mask (Open-Sora v1.0, set by its presets)")
    p.add_argument("--condition-image", metavar="FILE", help="image-to-video: this image is the first frame (resized "
                   "and cropped to the video size) and the rest is generated; for runs trained with --mask-ratios")
    p.add_argument("--condition-at", choices=["first", "last"], default="first", help="--condition-image: the first "
                   "frame (default) or the last")
    p.add_argument("--condition-video", metavar="FILE", help="video extension: the new clip starts with this video's "
                   "last --condition-frames frames")
    p.add_argument("--condition-frames", type=int, default=1, help="--condition-video: how many of its last frames")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="train.py folders: which weights")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--text-encoder", help="bare files: text encoder name, hub id or folder (default t5)")
    p.add_argument("--text-len", type=int, help="bare files: caption tokens (default 120)")
    p.add_argument("--vae", choices=["raw", "sd", "vqvae", "video"], help="bare files: the autoencoder (default sd)")
    p.add_argument("--vae-path", help="the VAE's hub id or folder (default: the kind's own; DiT's presets: sd-vae-ft-mse)")
    p.add_argument("--fp8", action="store_true",
                   help="the blocks' linears in fp8 (fp8.quantize_fp8; implies --precision bf16): faster on Hopper GPUs, "
                        "a few percent of rounding error in each forward (README, Known differences)")
    p.add_argument("--compile", action="store_true",
                   help="compile the model as one graph first (on a GPU: about 75 s for STDiT-XL/2 at one video size)")
    p.add_argument("--outdir", default="samples", help="where the mp4s (or PNGs), grid.png and score.json go; one "
                   "run's alone (default: samples)")
    p.add_argument("--overwrite", action="store_true", help="replace the samples an earlier run wrote in --outdir")
    p.add_argument("--fps", type=int, help="frames per second of the mp4s (default 8)")
    p.add_argument("--sp-kind", default="ulysses", choices=["ulysses", "fastseq"],
                   help="under torchrun: how the ranks share each sample's sequence (seqparallel.py)")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    args = argparse.Namespace(**{**vars(args), **DEFAULTS, **PRESETS.get(args.preset, {}), **given}, given=set(given))
    refuse_bad_values(p.error, args)
    return args, p.error


def refuse_bad_values(error, args):
    """One sentence (error) for a value that would sample nonsense or fail later, before anything loads."""
    data.refuse_counts_below_one(error, args, ("num_samples", "num_frames", "steps", "fps", "text_len", "cfg_channels",
                                               "condition_frames"))
    positive = ("space_scale", "time_scale")
    for name in ("cfg_scale", *positive):  # NaN or infinity would write black videos
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or (name in positive and not value > 0)):
            error(f"--{name.replace('_', '-')} {value}: give a finite number" + (" above 0" if name in positive else ""))
    if args.image_size is not None and min(args.image_size) < 1:
        error(f"--image-size must be positive, not {args.image_size[0]} {args.image_size[1]}")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        error(f"--prompt-file {args.prompt_file}: no such file; give a text file with one prompt per line")
    if args.condition_image and args.condition_video:
        error("give --condition-image or --condition-video, not both")
    for flag in ("condition_image", "condition_video"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file")
    if args.fp8 and args.precision != "bf16" and "precision" in args.given:
        error(f"--fp8 samples in bf16: leave out --precision {args.precision}")
    if why := checkpoint.unwritable(args.outdir):
        error(f"--outdir {why}")


def read_condition(args, size, error):
    """(pixels (K, 3, H, W) in [-1, 1], the K frame numbers they take) from --condition-image (the first or last
    frame) or --condition-video (its last --condition-frames frames start the new clip), resized and centre-cropped
    to the video's size (T, H, W); None without either."""
    path = args.condition_image or args.condition_video
    if path is None:
        return None
    try:
        frames = data.read_video(path)  # (T, H, W, 3) uint8
    except Exception as e:  # not an image or a video: the decoder's own error, in one sentence
        error(f"{path} cannot be read as an image or video ({type(e).__name__}: {e})")
    T, K = size[0], 1 if args.condition_image else args.condition_frames
    if K >= T:
        error(f"{K} given frames leave none of the {T} (--num-frames) to generate: give fewer, or more frames")
    if frames.shape[0] < K:
        error(f"--condition-video {path} has {frames.shape[0]} frames, fewer than --condition-frames {K}")
    frames = frames[:1] if args.condition_image else frames[-K:]
    at = [T - 1] if args.condition_image and args.condition_at == "last" else list(range(K))
    pixels = frames.permute(0, 3, 1, 2).float() / 127.5 - 1  # (K, 3, H, W)
    return data.resize_crop(pixels, size[1:]), at


def read_prompts(args, error):
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if args.demo_prompts:
        prompts += data.DEMO_PROMPTS
    prompts = prompts or list(args.prompts)  # DiT's presets: its sample.py's class labels
    if not prompts:
        error("give at least one --prompt, a --prompt-file or --demo-prompts")
    return [prompt for prompt in prompts for _ in range(args.num_samples)]


def load_model(args, device):
    """(model, meta) from --ckpt: a train.py folder (checkpoint.load_for_sampling; its encoders and size fill in what
    the command line does not set), or a bare or released weights file built as --model."""
    if os.path.isdir(args.ckpt):
        model, meta = checkpoint.load_for_sampling(args.ckpt, device, args.weights)
        trained = {k: meta["args"][k] for k in ("text_encoder", "text_len", "vae", "vae_path", "vae_micro_batch",
                                                 "num_frames", "image_size")}
        trained["pixel_norm"] = meta["args"].get("pixel_norm", [0.0, 1.0])  # runs from before the flag: none
        vars(args).update({k: v for k, v in trained.items() if k not in args.given})
        take_objective(args, meta["args"].get("objective", "iddpm"), meta["args"].get("timestep_shift"))
        return model, meta
    scales = dict(space_scale=args.space_scale, time_scale=args.time_scale)
    model, meta = checkpoint.load_weights_file(args.ckpt, args.model, scales, device)
    take_objective(args, "rflow" if args.sampler == "rflow" else "iddpm", True)  # a bare file: as --sampler says
    return model, meta


def take_objective(args, objective, shift):
    """The sampler of the objective the weights were trained with: rflow for rectified flow (30 steps, the run's
    timestep shift), ddpm/ddim/dpm for IDDPM; the other family is refused in one sentence."""
    if objective == "rflow":
        if "sampler" in args.given and args.sampler != "rflow":
            raise RunError(f"{args.ckpt} was trained with rectified flow (train.py --objective rflow): sample it with "
                           f"--sampler rflow, not {args.sampler} (ddpm, ddim and dpm sample IDDPM runs)")
        args.sampler = "rflow"
        args.steps = args.steps if "steps" in args.given else 30
        args.timestep_shift = args.timestep_shift if "timestep_shift" in args.given else bool(shift)
    elif args.sampler == "rflow":
        raise RunError(f"{args.ckpt} was trained with IDDPM: sample it with --sampler ddpm, ddim or dpm (rflow "
                       "samples runs trained with train.py --objective rflow)")


def main(argv=None):
    args, error = get_args(argv)
    prompts = read_prompts(args, error)
    device = seqparallel.local_device()  # cuda:LOCAL_RANK under torchrun
    # under torchrun all ranks work on every sample together, each holding 1/world of its sequence; they
    # draw the same noise (same seed), so every rank computes the same videos and rank 0 writes them
    distributed, rank = "RANK" in os.environ, int(os.environ.get("RANK", 0))
    try:  # the folder first (rank 0 writes the outputs), then the process group: a refusal ends the job at once
        with checkpoint.RunLock(args.outdir) if rank == 0 else nullcontext():
            if rank == 0:
                claim_outdir(args)
            if distributed:
                seqparallel.init_process_group(device)
            sample_into(args, prompts, device, distributed, rank, error)
    except RunError as e:
        raise SystemExit(str(e)) from None


def sample_into(args, prompts, device, distributed, rank, error):
    """main's work once the output folder is held: the model, encoders and size checks, sampling, the outputs."""
    model, meta = load_model(args, device)
    if model.cfg.num_classes and not all(p.isdigit() and int(p) < model.cfg.num_classes for p in prompts):
        error(f"this model is class-conditional: give class indices 0 to {model.cfg.num_classes - 1} as prompts")
    if args.fp8:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            error(f"--fp8 needs a GPU with fp8 tensor cores (Ada or Hopper), not {torch.cuda.get_device_name(device)}: "
                  "use --precision bf16")
        if distributed and args.sp_kind == "fastseq":
            error("--fp8 runs with --sp-kind ulysses only (FastSeq slices the qkv weight per rank)")
        args.precision = "bf16"
        quantize_fp8(model)
    if distributed:
        try:
            seqparallel.apply_sequence_parallel(model, dist.group.WORLD, args.sp_kind)
        except ValueError as e:
            error(str(e))
    if args.compile:
        model = compile_for_sampling(model)
    text_encoder = None if model.cfg.num_classes else TextEncoder(
        args.text_encoder, max_length=args.text_len, device=device, dtype=DTYPES.get(args.text_dtype))
    # the published scripts cast the VAE to their sampling dtype (Open-Sora fp16, DiT fp32); ours decode in fp32
    vae = build_vae(args.vae, path=args.vae_path, micro_batch=args.vae_micro_batch, device=device,
                    dtype=DTYPES[args.precision] if args.preset else torch.float32, pixel_norm=args.pixel_norm)
    if args.num_frames is None or args.image_size is None:
        error("give the video size with --num-frames and --image-size (or a --preset)")
    size = (args.num_frames, *args.image_size)
    if 0 in size:
        error("the model was trained at native sizes: pass --image-size H W")
    try:  # checked before sampling: the video size must give latents that the model's patch tiles
        model.token_grid(vae.latent_shape(*size))
    except ValueError as e:
        error(f"{size[0]}x{size[1]}x{size[2]} (--num-frames, --image-size): {e}")
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= vae.out_channels:
        error(f"--cfg-channels {args.cfg_channels}: the latents have {vae.out_channels} channels; guide 1 to "
              f"{vae.out_channels} of them")
    condition = read_condition(args, size, error)
    if condition is not None and meta.get("args") and not meta["args"].get("mask_ratios"):
        print(f"warning: {args.ckpt} was trained without --mask-ratios: it never learnt to follow given frames")
    try:
        frames = generate(model, vae, text_encoder, prompts, size, args.sampler, args.steps, args.cfg_scale,
                          args.cfg_channels, args.seed, args.precision, args.noise, args.null_mask,
                          args.timestep_shift, condition)
    except ValueError as e:  # a VAE that merges frames cannot take given frames
        error(str(e))
    if distributed:
        # free the group while the interpreter is whole: the attention layers hold it and compiled blocks hold
        # themselves (a cycle), and a gloo group first freed at exit can abort the process (CI once: rank 1, SIGABRT)
        del model
        torch.compiler.reset()
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return
    try:
        write_outputs(args, frames, prompts, meta)
    except OSError as e:  # a full disk, a read-only folder: each file is written whole or not at all (data.written_whole)
        raise SystemExit(f"writing the samples into {args.outdir} failed ({e.strerror or e}): free some space or choose "
                         "another --outdir") from None


def write_outputs(args, frames, prompts, meta):
    """mp4s and a frame grid; PNG images and a grid of 4 a row for one-frame samples; the demo's score if asked."""
    if frames.shape[1] == 1:
        paths = save_images(frames[:, 0], prompts, args.outdir)
        what = "images"
    else:
        paths = save_videos(frames, prompts, args.outdir, fps=args.fps, enlarge=meta.get("args", {}).get("demo", False))
        what = "videos"
    source = args.ckpt if meta["step"] is None else f"step {meta['step']} of {args.ckpt}"
    print(f"wrote {len(paths)} {what} and grid.png to {args.outdir} ({source})")
    if args.score:
        score = data.score_videos(list(zip(frames, prompts)))
        print(f"score: colour {score['colour_acc']:.1%}, direction {score['direction_acc']:.1%}, "
              f"both {score['both_acc']:.1%} of {score['n']} samples")
        with open(os.path.join(args.outdir, "score.json"), "w") as f:
            json.dump(score, f)


if __name__ == "__main__":
    main()
