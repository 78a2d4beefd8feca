"""
Train VideoGPT's VQ-VAE (vae.VQVAE) on a CSV manifest or the demo set; the folder it writes is what
`train.py --vae vqvae --vae-path` and `sample.py` read (config.json + model.safetensors, vae.save_vqvae).

  python train_vqvae.py --demo --out outputs/vqvae          # demo clips, PSNR on held-out clips
  python train_vqvae.py --data data.csv --out outputs/vqvae  # any manifest (see data.py)
  python vae.py train --demo                                 # the same, through vae.py

VideoGPT's recipe (scripts/train_vqvae.py): Adam 7e-4, loss = MSE / 0.06 + commitment (vae.VQVAE.forward), EMA
codebook; here with a short warm-up and a cosine decay. The last --val-clips clips of the manifest are held out
for the PSNR. Ctrl-C or SIGTERM writes the weights so far and stops.
Shape letters as in model.py: B batch, T frames, H W size.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import data
import checkpoint
from checkpoint import RunError
from sample import autocast
from vae import VQVAE, VQVAEConfig, save_vqvae


def main(argv=None, prog=None):
    """`python train_vqvae.py FLAGS` (or `python vae.py train FLAGS`, prog "vae.py train"); returns the held-out
    PSNR in dB."""
    args = get_args(argv, prog)
    try:
        with checkpoint.RunLock(args.out), checkpoint.Interrupts() as interrupts:
            return train(args, interrupts)
    except RunError as e:
        sys.exit(e.code or str(e))


def train(args, interrupts):
    began = time.time()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True     # fixed clip size: let cuDNN pick the fastest 3D conv once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        args.precision = "fp32"                   # CPU bf16 convolutions are slow
    stream, held_out, n_train = load_clips(args, device)

    config = VQVAEConfig(args.n_hiddens, args.n_res_layers, tuple(args.downsample), args.embedding_dim, args.n_codes)
    model = VQVAE(config).to(device).train()
    model.check_size(args.num_frames, *args.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    print(f"VQ-VAE {sum(p.numel() for p in model.parameters()):,} parameters, {n_train} training and {args.val_clips} "
          f"held-out clips of {args.num_frames}x{args.image_size[0]}x{args.image_size[1]} on {device.type}")
    log = open(os.path.join(args.out, "train_log.jsonl"), "a")
    bar = tqdm(total=args.steps, desc="vqvae", dynamic_ncols=True)
    step, start = 0, time.time()
    while True:
        progress = max(step / args.steps, (time.time() - start) / (60 * args.minutes) if args.minutes else 0)
        if progress >= 1:
            break
        # warm-up: at full rate from the start, Adam's first (sign-like) steps throw the 240-wide model far off
        # (the loss jumps 10x and recovers over hundreds of steps); cosine decay: the last steps polish
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        x = next(stream)
        with autocast(device, args.precision):
            _, recon_loss, commitment, perplexity = model(x)
        opt.zero_grad(set_to_none=True)
        (recon_loss + commitment).backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:                        # .item() waits for the GPU: not every step
            bar.set_postfix(recon=f"{recon_loss.item():.4f}", perplexity=f"{perplexity.item():.0f}")
        if step % args.eval_every == 0:
            value, _ = evaluate(model, held_out, device, args.precision)
            rate = step * args.batch_size / (time.time() - start)
            bar.write(f"step {step}: held-out PSNR {value:.2f} dB, {rate:.0f} clips/s ({time.time() - began:.0f} s in all)")
            log.write(json.dumps(dict(step=step, psnr=value, recon=recon_loss.item(), seconds=time.time() - began)) + "\n")
            log.flush()
            save_vqvae(model, args.out)
        if interrupts.signal is not None:
            save_vqvae(model, args.out)
            bar.close()
            print(f"stopped by {interrupts.name} at step {step}: the weights so far are in {args.out}")
            raise RunError(f"stopped by {interrupts.name}", code=128 + interrupts.signal)
    bar.close()
    trained = time.time() - start
    value, std = evaluate(model, held_out, device, args.precision)
    model.config.scaling_factor = 1 / std         # unit-variance latents for diffusion (SD's 0.18215, measured here)
    save_vqvae(model, args.out)
    log.write(json.dumps(dict(step=step, psnr=value, scaling_factor=1 / std, seconds=time.time() - began)) + "\n")
    print(f"held-out PSNR {value:.2f} dB on {args.val_clips} clips after {step} steps of {args.batch_size}; "
          f"{trained:.0f} s training, {time.time() - began:.0f} s in all; wrote {args.out}/model.safetensors "
          f"(latent scaling {1 / std:.4f})")
    return value


def load_clips(args, device):
    """(endless training batches on the device, held-out videos, number of training clips); --demo writes its set first."""
    if args.data is None:
        args.data = data.demo_manifest(os.path.join(args.out, "demo_data"), args.demo_videos, args.num_frames,
                                       max(args.image_size))
    dataset = data.VideoDataset(args.data, args.num_frames, args.frame_interval, tuple(args.image_size), seed=args.seed)
    n_train = len(dataset) - args.val_clips
    if n_train < args.batch_size or args.val_clips < 1:
        raise RunError(f"{args.data} has {len(dataset)} clips: too few for --val-clips {args.val_clips} and --batch-size "
                       f"{args.batch_size}; add clips or lower them")
    load = dict(collate_fn=data.collate, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n_train)), args.batch_size, shuffle=True,
                                               drop_last=True, generator=torch.Generator().manual_seed(args.seed), **load)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n_train, len(dataset))),
                                             args.batch_size, **load)
    held_out = [batch["video"] for batch in val_loader if batch["video"] is not None]   # read once (64 clips: 50 MB)
    return batches(args, dataset, train_loader, load, device), held_out, n_train


def batches(args, dataset, train_loader, load, device):
    """Endless training batches (B, 3, T, H, W) in [-1, 1] on the device."""
    if not args.cache:
        for epoch in range(10 ** 9):
            dataset.set_epoch(epoch)          # new frame windows each epoch (workers copy the dataset per epoch)
            for batch in train_loader:
                if batch["video"] is not None:
                    yield batch["video"].to(device, non_blocking=True)
    # --cache: decode every clip once and keep it in device memory as uint8 (the demo's 2,048 clips of
    # 16x64x64 take 400 MB); decoding then no longer limits a fast GPU, at the price of one window per clip
    every_clip = torch.utils.data.DataLoader(train_loader.dataset, args.batch_size, **load)
    stored = [((batch["video"] + 1) * 127.5).round().to(torch.uint8).to(device)   # exact for unresized pixels
              for batch in tqdm(every_clip, desc="caching clips", leave=False) if batch["video"] is not None]
    stored = torch.cat(stored)
    gen = torch.Generator(device).manual_seed(args.seed)
    while True:
        for chosen in torch.randperm(len(stored), device=device, generator=gen).split(args.batch_size):
            if len(chosen) == args.batch_size:
                yield stored[chosen].float() / 127.5 - 1


@torch.no_grad()
def evaluate(model, videos, device, precision):
    """(mean PSNR in dB over clips, latent std) of the VQ-VAE on batches of videos; PSNR of pixels in [0, 1]."""
    model.eval()
    psnrs, moments = [], torch.zeros(3, dtype=torch.float64)
    for x in videos:
        x = x.to(device)
        with autocast(device, precision):
            recon = model(x)[0]
            z = model.pre_vq_conv(model.encoder(x / 2)).double()
        mse = ((recon.float().clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)     # in [0, 1] units: a quarter
        psnrs += (-10 * torch.log10(mse.clamp(min=1e-10))).tolist()
        moments += torch.stack([z.new_tensor(z.numel()), z.sum(), z.pow(2).sum()]).cpu()  # float64, on z's device
    model.train()
    n, s, s2 = moments.tolist()
    return sum(psnrs) / max(len(psnrs), 1), math.sqrt(max(s2 / max(n, 1) - (s / max(n, 1)) ** 2, 1e-12))


def get_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CSV manifest (path,caption,...; see data.py)")
    p.add_argument("--demo", action="store_true", help="train on the moving-shapes demo set (made in OUT/demo_data if missing)")
    p.add_argument("--demo-videos", type=int, default=2048)
    p.add_argument("--out", default="outputs/vqvae", help="the folder written: config.json + model.safetensors "
                   "(what --vae-path takes), train_log.jsonl")
    p.add_argument("--num-frames", type=int, default=16, help="clip length (VideoGPT: 16)")
    p.add_argument("--frame-interval", type=int, default=1)
    p.add_argument("--image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="VideoGPT: 64 64 or 128 128")
    p.add_argument("--n-hiddens", type=int, default=240)
    p.add_argument("--n-res-layers", type=int, default=4)
    p.add_argument("--downsample", type=int, nargs=3, default=[2, 4, 4], metavar=("T", "H", "W"))
    p.add_argument("--embedding-dim", type=int, default=256)
    p.add_argument("--n-codes", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=7e-4, help="VideoGPT's Adam learning rate; decays to 0 on a cosine")
    p.add_argument("--warmup", type=int, default=200, help="steps of linear learning-rate warm-up")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--minutes", type=float, default=0, help="stop after this many minutes of training (0: no limit); "
                   "the learning rate decays over --steps or --minutes, whichever ends first")
    p.add_argument("--val-clips", type=int, default=64, help="clips at the end of the manifest held out for the PSNR")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between held-out PSNRs and checkpoints")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="autocast on GPUs (CPUs run fp32)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the training clips once and keep them in GPU/CPU memory (default: on with --demo)")
    p.add_argument("--num-workers", type=int, default=max(1, min(12, (os.cpu_count() or 1) - 2)))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.data and not args.demo:
        p.error("pass --data CSV (see `python data.py manifest --help`) or --demo")
    if args.data and data.missing_manifest(args.data):
        p.error(data.missing_manifest(args.data))
    if args.data:  # its header and rows now, not after minutes of decoding
        try:
            data.read_manifest(args.data)
        except ValueError as e:
            p.error(str(e))
    refuse_bad_values(p.error, args)
    if args.cache is None:
        args.cache = args.demo
    return args


def refuse_bad_values(error, args):
    """One sentence (error) for a value that would train nonsense or fail later, before anything loads: every flag
    that takes a number is checked here."""
    data.refuse_counts_below_one(error, args, ("demo_videos", "num_frames", "frame_interval", "n_hiddens", "n_res_layers",
                                               "embedding_dim", "n_codes", "batch_size", "steps", "val_clips", "eval_every"))
    for name in ("lr", "minutes"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            error(f"--{name} {value:g}: give a finite number " + ("above 0" if name == "lr" else "(0: no limit)"))
    for name in ("image_size", "downsample"):
        if min(getattr(args, name)) < 1:
            error(f"--{name.replace('_', '-')} {' '.join(map(str, getattr(args, name)))}: give sizes of 1 or more")
    for name in ("warmup", "num_workers"):
        if getattr(args, name) < 0:
            error(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 or more")
    if why := checkpoint.unwritable(args.out):
        error(f"--out {why}")


if __name__ == "__main__":
    main()
