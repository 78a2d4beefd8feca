"""
Sample videos from a checkpoint written by train.py.

  python sample.py --ckpt outputs/demo --prompt "a red circle moving left"
  python sample.py --ckpt outputs/run/checkpoints/step_0010000 --prompt-file prompts.txt --sampler dpm --steps 20
  python sample.py --ckpt outputs/run --prompt-file prompts.txt --precision bf16 --compile   # fast on a GPU
  python sample.py --ckpt outputs/run --prompt-file prompts.txt --fp8 --compile              # fastest on an H100/H200
  torchrun --nproc_per_node=4 sample.py --ckpt outputs/run --prompt "..." --num-frames 360   # one long video on 4 GPUs

The model, the text encoder and the VAE are rebuilt from the checkpoint's meta.json alone. Sampling
follows Open-Sora v1.0: 100 DDPM steps with the learned variance, classifier-free guidance scale 7.0
(applied to all latent channels by default; v1.0 guided only 3 of 4, --cfg-channels 3 reproduces that).
Writes one mp4 per prompt and a PNG grid of frames.
"""
import argparse
import json
import os
import re
from contextlib import nullcontext

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from einops import rearrange
from tqdm import tqdm

import data
import seqparallel
from fp8 import Fp8Linear, quantize_fp8
from model import model_from_config, read_state_dict
from text import TextEncoder
from vae import build_vae

# The noise schedule, defined once: 1000 steps with linear betas 1e-4 .. 0.02, DiT's create_diffusion defaults
# (diffusion/__init__.py, noise_schedule="linear") that Open-Sora v1.0's IDDPM keeps. train.py's IDDPM builds its
# loss tables from it, so the samplers below see the betas the model learned.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def autocast(device, precision):
    """The mixed-precision context for "fp32" (none), "bf16" or "fp16", on device's type: training and sampling."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_scheduler(kind, steps, learn_sigma):
    if kind == "ddpm":  # ancestral sampling with the learned variance (IDDPM eq. 15), as v1.0 samples
        sched = DDPMScheduler(**SCHEDULE, variance_type="learned_range" if learn_sigma else "fixed_small", clip_sample=False)
    elif kind == "ddim":
        sched = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    elif kind == "dpm":  # DPM-Solver++ (2nd order): good samples in about 20 steps
        sched = DPMSolverMultistepScheduler(**SCHEDULE)
    else:
        raise ValueError(f"unknown sampler {kind!r}: use ddpm, ddim or dpm")
    sched.set_timesteps(steps)
    return sched


def compile_for_sampling(model):
    """The model compiled as one graph for many denoising steps of one video size: fusing across blocks saves
    what a graph per block leaves between them (STDiT-XL/2 16x256, a guided batch of 8, H100: 106.4 ms a forward
    against 110.2 ms block by block). CUDA graphs (mode "reduce-overhead") only with fp8 linears, whose short
    rounding kernels are what a graph saves launching; "max-autotune" did not pay for its compile time (docs/LOG.md,
    compiling the sampler). A sequence-parallel model compiles block by block: its collectives stay outside the
    compiler."""
    if hasattr(model, "shards"):  # seqparallel.apply_sequence_parallel
        for block in model.blocks:
            block.compile()
        return model
    in_fp8 = any(isinstance(m, Fp8Linear) for m in model.modules())
    return torch.compile(model, mode="reduce-overhead" if in_fp8 else None)


def ddpm_step(sched, out, t, x, noise):
    """x_{t-1} from x_t (IDDPM eqs. 10-15): what diffusers' DDPMScheduler.step computes for the "learned_range" and
    "fixed_small" variances, with the noise passed in. step draws its noise itself from a CPU generator and copies
    it from pageable memory, which makes the CPU wait for the GPU at every step before it can queue the next
    forward; a pinned copy does not (test_ddpm_step_equals_diffusers)."""
    eps, v = out.split(x.shape[1], dim=1) if out.shape[1] == 2 * x.shape[1] else (out, None)
    prev = sched.previous_timestep(t)
    ab = sched.alphas_cumprod[t]
    ab_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.one
    beta = 1 - ab / ab_prev  # the beta of this (respaced) step
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
    if t == 0:
        return mean
    min_log = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20).log()  # log beta-tilde
    # learned range: the model's v in [-1, 1] interpolates the log variance between beta-tilde and beta
    log_var = min_log if v is None else (v + 1) / 2 * beta.log() + (1 - v) / 2 * min_log
    return mean + (0.5 * log_var).exp() * noise


def cpu_noise(shape, gen, device):
    """Standard normal noise drawn from a CPU generator, so that one seed gives the same video on any device.
    Pinned, its copy to a GPU runs behind the queued work instead of waiting for it."""
    noise = torch.randn(shape, generator=gen)
    if device.type == "cuda":
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


@torch.no_grad()
def generate(model, vae, text_encoder, prompts, size, sampler="ddpm", steps=100, cfg_scale=7.0, cfg_channels=None,
             seed=0, precision="fp32"):
    """Videos for prompts: uint8 (B, T, H, W, 3) at pixel size (T, H, W). Noise comes from a CPU generator
    seeded once, so one seed gives the same video on any device."""
    model.eval()
    device = next(model.parameters()).device
    C = model.cfg.in_channels
    B = len(prompts)
    if model.cfg.num_classes:  # class-conditional models take class indices as prompts
        y, mask = torch.tensor([int(p) for p in prompts], device=device), None
    else:
        y, mask, _ = text_encoder.encode(list(prompts))
    gen = torch.Generator().manual_seed(seed)
    x = cpu_noise((B, C, *vae.latent_shape(*size)), gen, device)
    sched = make_scheduler(sampler, steps, model.cfg.learn_sigma)
    # one batch of 2B: the conditional half, then the unconditional half with the null condition
    y2 = torch.cat([y, y])
    mask2 = None if mask is None else torch.cat([mask, mask])
    drop = torch.arange(2 * B, device=device) >= B
    ch = C if cfg_channels is None else cfg_channels
    # the steps on the device, copied at once: a copy per step would block the CPU until the GPU has drained
    for t, t_device in tqdm(list(zip(sched.timesteps, sched.timesteps.to(device))), desc=f"{sampler} sampling", leave=False):
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        with autocast(device, precision):
            out = model(xin, t_device.expand(2 * B), y2, mask2, force_drop=drop).float()
        cond, uncond = out.chunk(2)
        eps = cond[:, :C].clone()
        eps[:, :ch] = uncond[:, :ch] + cfg_scale * (cond[:, :ch] - uncond[:, :ch])  # classifier-free guidance
        # the variance half (learned sigma) of the conditional output goes to DDPM only
        model_out = torch.cat([eps, cond[:, C:]], dim=1) if sampler == "ddpm" else eps
        if sampler == "ddpm":
            x = ddpm_step(sched, model_out, t, x, cpu_noise(x.shape, gen, device) if t > 0 else None)
        else:  # DDIM (eta 0) and DPM-Solver++ draw no noise
            x = sched.step(model_out, t, x).prev_sample
    video = vae.decode(x).float()  # (B, 3, T, H, W) in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def save_videos(frames, prompts, outdir, fps=8, grid_frames=8):
    """One mp4 per prompt plus grid.png: a row per prompt, grid_frames frames evenly spread in time."""
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for i, (video, prompt) in enumerate(zip(frames, prompts)):
        name = re.sub(r"[^a-zA-Z0-9]+", "_", str(prompt)).strip("_")[:60]
        paths.append(os.path.join(outdir, f"{i:03d}_{name}.mp4"))
        data.write_video(paths[-1], video, fps=fps)
    T = frames.shape[1]
    pick = torch.linspace(0, T - 1, min(grid_frames, T)).round().long()
    data.write_png(os.path.join(outdir, "grid.png"), rearrange(frames[:, pick], "B T H W c -> (B H) (T W) c").contiguous())
    return paths


def load_checkpoint_folder(path, device, weights="ema"):
    """(model, meta) from a train.py checkpoint folder, its `checkpoints/latest`, or an experiment folder."""
    for candidate in (os.path.join(path, "checkpoints", "latest"), os.path.join(path, "latest")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                path = os.path.join(os.path.dirname(candidate), f.read().strip())
            break
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise SystemExit(f"no checkpoint in {path}: pass an experiment folder or a checkpoints/step_* folder written by train.py")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    model = model_from_config(meta["model_config"])
    try:
        model.load_state_dict(read_state_dict(os.path.join(path, f"{weights}.safetensors")))
    except ValueError as e:  # missing or corrupt: the sentence says which file
        raise SystemExit(str(e)) from None
    return model.to(device).eval(), meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="experiment folder or checkpoint folder written by train.py")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable); class index for class-conditional models")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--demo-prompts", action="store_true", help="the demo's 16 fixed prompts (data.DEMO_PROMPTS)")
    p.add_argument("--num-samples", type=int, default=1, help="videos per prompt, each from its own noise")
    p.add_argument("--score", action="store_true", help="grade demo samples: dominant colour and motion direction vs the prompt")
    p.add_argument("--num-frames", type=int, default=None, help="default: the training clip length")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: the training size")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--cfg-channels", type=int, default=None, help="guide only the first N latent channels (v1.0 used 3)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--fp8", action="store_true",
                   help="the blocks' linears in fp8 (fp8.quantize_fp8; implies --precision bf16): faster on Hopper GPUs, "
                        "a few percent of rounding error in each forward (README, Known differences)")
    p.add_argument("--compile", action="store_true",
                   help="compile the model as one graph first (on a GPU: about 75 s for STDiT-XL/2 at one video size)")
    p.add_argument("--outdir", default="samples")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--sp-kind", default="ulysses", choices=["ulysses", "fastseq"],
                   help="under torchrun: how the ranks share each sample's sequence (seqparallel.py)")
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            p.error(f"--prompt-file {args.prompt_file}: no such file; give a text file with one prompt per line")
        with open(args.prompt_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if args.demo_prompts:
        prompts += data.DEMO_PROMPTS
    if not prompts:
        p.error("give at least one --prompt, a --prompt-file or --demo-prompts")
    data.refuse_counts_below_one(p.error, args, ("num_samples", "num_frames", "steps", "fps"))
    if args.image_size is not None and min(args.image_size) < 1:
        p.error(f"--image-size must be positive, not {args.image_size[0]} {args.image_size[1]}")
    prompts = [prompt for prompt in prompts for _ in range(args.num_samples)]

    device = seqparallel.local_device()  # cuda:LOCAL_RANK under torchrun
    # under torchrun all ranks work on every sample together, each holding 1/world of its sequence; they
    # draw the same noise (same seed), so every rank computes the same videos and rank 0 writes them
    distributed, rank = "RANK" in os.environ, int(os.environ.get("RANK", 0))
    if distributed:
        seqparallel.init_process_group(device)
    model, meta = load_checkpoint_folder(args.ckpt, device, args.weights)
    if args.fp8:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            p.error(f"--fp8 needs a GPU with fp8 tensor cores (Ada or Hopper), not {torch.cuda.get_device_name(device)}: "
                    "use --precision bf16")
        if distributed and args.sp_kind == "fastseq":
            p.error("--fp8 runs with --sp-kind ulysses only (FastSeq slices the qkv weight per rank)")
        args.precision = "bf16"
        quantize_fp8(model)
    if distributed:
        try:
            seqparallel.apply_sequence_parallel(model, dist.group.WORLD, args.sp_kind)
        except ValueError as e:
            p.error(str(e))
    if args.compile:
        model = compile_for_sampling(model)
    train_args = meta["args"]
    text_encoder = TextEncoder(train_args["text_encoder"], max_length=train_args["text_len"], device=device)
    vae = build_vae(train_args["vae"], path=train_args["vae_path"], micro_batch=train_args["vae_micro_batch"], device=device)
    size = (args.num_frames or train_args["num_frames"], *(args.image_size or train_args["image_size"]))
    if 0 in size:
        p.error("the model was trained at native sizes: pass --image-size H W")
    try:  # checked before sampling: the video size must give latents that the model's patch tiles
        model.token_grid(vae.latent_shape(*size))
    except ValueError as e:
        p.error(f"{size[0]}x{size[1]}x{size[2]} (--num-frames, --image-size): {e}")
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= vae.out_channels:
        p.error(f"--cfg-channels {args.cfg_channels}: the latents have {vae.out_channels} channels; guide 1 to "
                f"{vae.out_channels} of them")
    frames = generate(model, vae, text_encoder, prompts, size, args.sampler, args.steps, args.cfg_scale,
                      args.cfg_channels, args.seed, args.precision)
    if distributed:
        dist.destroy_process_group()
        if rank != 0:
            return
    paths = save_videos(frames, prompts, args.outdir, fps=args.fps)
    print(f"wrote {len(paths)} videos and grid.png to {args.outdir} (step {meta['step']} of {args.ckpt})")
    if args.score:
        score = data.score_videos(list(zip(frames, prompts)))
        print(f"score: colour {score['colour_acc']:.1%}, direction {score['direction_acc']:.1%}, "
              f"both {score['both_acc']:.1%} of {score['n']} samples")
        with open(os.path.join(args.outdir, "score.json"), "w") as f:
            json.dump(score, f)


if __name__ == "__main__":
    main()
