"""
Training throughput the way the published tables count it: per GPU samples/s and tokens/s, MFU and peak
memory, after warm-up, with the GPU synchronised around the timed steps. The step is train.py's own
(training_step, backward, clipping, AdamW) on synthetic latents and caption states, i.e. the model step
with precomputed features.

  python bench.py --model STDiT-XL/2 --frames 16 --size 256 256 --batch-size 8
  torchrun --nproc_per_node=2 bench.py --model STDiT-XL/2 --frames 360 --size 512 512 --grad-checkpoint --sp-size 2
  torchrun --nproc_per_node=4 bench.py --model DiT-XL/2 --tokens 819200 --grad-checkpoint --sp-size 4 --steps 1 --warmup 0

Tokens are counted after the SD-VAE (x8) and the patch (1, 2, 2): 16x256x256 is 4,096 tokens per sample.
MFU counts model FLOPs (SPEC.md): training = 3 x forward, forward per token per layer 24 D^2 + 4 D N for
DiT and 36 D^2 + 4 D (S + T + L) for STDiT; recomputation under gradient checkpointing is not counted.
--comm-profile adds the share of step time the GPU spends in NCCL kernels (one profiled step).
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

import seqparallel
import train
from model import build_model

PEAK_TFLOPS = {"H100": 799, "H200": 788}  # bf16 8192^3 matmuls measured on these machines (SPEC.md, KINDS.md)


def model_flops_per_sample(cfg, grid, L):
    """Training FLOPs per sample (3 x forward) for the token grid (T, H, W) and L caption tokens."""
    T, H, W = grid
    S, N, D = H * W, T * H * W, cfg.hidden
    if cfg.arch == "dit":
        per_token = 24 * D * D + 4 * D * N
    else:
        per_token = 36 * D * D + 4 * D * (S + T + L)
    return 3 * cfg.depth * N * per_token


def nccl_share(step, steps=1):
    """Fraction of wall time the GPU spends in NCCL kernels over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tick = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - tick
    nccl_us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return nccl_us / 1e6 / wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="STDiT-XL/2")
    p.add_argument("--cond", default="cross", choices=["adaln", "cross", "concat"])
    p.add_argument("--frames", type=int, default=16, help="video frames (latent frames with the SD-VAE)")
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="pixel size")
    p.add_argument("--tokens", type=int, default=None, help="set frames so a sample has this many tokens (at --size)")
    p.add_argument("--batch-size", type=int, default=1, help="per data-parallel rank")
    p.add_argument("--text-len", type=int, default=120)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each block, as train.py --compile")
    p.add_argument("--attn", default="auto")
    p.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "cudnn", "efficient"],
                   help="restrict SDPA to one kernel family (auto: torch's choice)")
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"],
                   help="parameter dtype: fp32 under autocast (train.py) or bf16 (the compute copy ZeRO-2 keeps)")
    p.add_argument("--sp-size", type=int, default=1)
    p.add_argument("--sp-kind", default="ulysses", choices=seqparallel.SP_KINDS)
    p.add_argument("--no-overlap", action="store_true", help="FastSeq without overlapping its all-gather")
    p.add_argument("--optimizer", default="ddp", choices=["ddp", "zero2", "fsdp2"],
                   help="DDP + AdamW (train.py's default), our ZeRO-2 (zero.py, bf16 compute weights), or torch's "
                        "FSDP2 fully_shard(reshard_after_forward=False) with bf16 compute: the library's ZeRO-2")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--comm-profile", action="store_true")
    p.add_argument("--out", default=None, help="append the result as a JSON line to this file")
    args = p.parse_args(argv)

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    with device:  # initialise on the GPU: an XL model's init on one CPU thread (torchrun's default) takes a minute
        model = build_model(args.model, cond=args.cond, attn=args.attn, grad_checkpoint=args.grad_checkpoint,
                            caption_len=args.text_len)
    if args.weights == "bf16":
        model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    H, W = (s // 8 for s in args.size)  # SD-VAE latents
    S = (H // model.cfg.patch[1]) * (W // model.cfg.patch[2])
    T = args.frames if args.tokens is None else math.ceil(args.tokens / S)
    sp_group = None
    if args.sp_size > 1:
        sp_group, _, _ = seqparallel.init_groups(args.sp_size)
        seqparallel.apply_sequence_parallel(model, sp_group, args.sp_kind, overlap=not args.no_overlap)
    if args.compile:
        for block in model.blocks:
            block.compile()
    fused = device.type == "cuda"
    if args.optimizer == "zero2":
        from zero import ZeRO2
        net, opt = model, ZeRO2(model, lr=1e-4, compute_dtype=torch.bfloat16)  # no EMA: DDP and FSDP2 keep none here
    elif args.optimizer == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=False, mp_policy=policy)
        net = fully_shard(model, reshard_after_forward=False, mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if fused else None) \
            if distributed else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    diffusion = train.IDDPM()
    B = args.batch_size
    z = torch.randn(B, model.cfg.in_channels, T, H, W, device=device)
    y = torch.randn(B, args.text_len, model.cfg.caption_channels, device=device)
    mask = torch.ones(B, args.text_len, dtype=torch.bool, device=device)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = dict(flash=[SDPBackend.FLASH_ATTENTION], cudnn=[SDPBackend.CUDNN_ATTENTION],
                    efficient=[SDPBackend.EFFICIENT_ATTENTION]).get(args.sdpa_backend)
    backends = backends or [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def step():
        with sdpa_kernel(backends):
            loss = train.training_step(net, diffusion, z, y, mask, args.precision)
            loss.backward()
        if args.optimizer == "zero2":  # ZeRO-2 clips over its slices and updates its sharded EMA in step()
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    inputs = sum(t.numel() * t.element_size() for t in (z, y, mask))
    states = torch.cuda.memory_allocated(device) - inputs if device.type == "cuda" else None  # weights + optimizer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - tick) / args.steps

    grid = (T, H // model.cfg.patch[1], W // model.cfg.patch[2])
    tokens = math.prod(grid)
    dp = world // args.sp_size
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    tflops = model_flops_per_sample(model.cfg, grid, args.text_len) * B * dp / seconds / world / 1e12
    result = dict(model=args.model, cond=args.cond if model.cfg.arch == "dit" else "cross", grid=grid, tokens=tokens,
                  batch=B, gpus=world, sp=args.sp_size, sp_kind=args.sp_kind if args.sp_size > 1 else None,
                  overlap=not args.no_overlap, grad_checkpoint=args.grad_checkpoint, compile=args.compile, optimizer=args.optimizer,
                  weights="bf16" if args.optimizer == "zero2" else args.weights, sdpa=args.sdpa_backend,
                  step_s=round(seconds, 4), samples_per_s_per_gpu=round(B * dp / seconds / world, 4),
                  tokens_per_s_per_gpu=round(tokens * B * dp / seconds / world), model_tflops_per_gpu=round(tflops, 1),
                  mfu=round(tflops / peak, 3) if peak else None, device=gpu,
                  peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
                  state_bytes_per_param=round(states / n_params, 2) if states is not None else None)
    if args.comm_profile and device.type == "cuda":
        result["nccl_share"] = round(nccl_share(step), 3)
    if rank == 0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
