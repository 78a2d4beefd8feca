"""
Training and sampling throughput the way the published tables count it (Open-Sora v1.0's and OpenDiT's READMEs,
March 2024: 8x H800, per GPU, T5 and the VAE online in the video rows): per GPU samples/s and
tokens/s, MFU against the bf16 matmul peak measured in the same run, and peak memory, after warm-up, with
the GPU synchronised around the timed steps. The timed step is train.py's own: encode (SD-VAE per frame and
T5-v1.1-XXL, online as the published rows ran them) -> training_step -> backward -> clip -> AdamW.

  python bench.py --row stdit-16x256                  # one published row (`--row all`: every row)
  python bench.py --row all --precomputed --side-by-side   # every row, as many at once as there are GPUs here
  python bench.py --row stdit-16x256 --precomputed    # the model step alone, on given latents and T5 states
  python bench.py --row stdit-16x256 --baseline       # eager, math attention, fp32 weights, no fused kernels
  python bench.py --row dit-img256 --precomputed --fp8   # training with the blocks' linears in fp8 (train.py --fp8)
  python bench.py --row stdit-64x512 --max-tokens     # the longest video (frames at 512x512) that trains
  python bench.py --row stdit-16x256 --sample         # seconds per sample: 100 DDPM steps + guidance + decode
  python bench.py --row stdit-16x256 --sample --sampler ddpm dpm --fp8   # DDPM, then 20 DPM-Solver steps; fp8 linears
  python bench.py --row stdit-16x256 --encoders       # SD-VAE frames/s and T5 captions/s, plain calls vs ours
  torchrun --nproc_per_node=2 bench.py --model STDiT-XL/2 --tokens 368640 --size 512 512 --grad-checkpoint --sp-size 2

The encoders are the real architectures. Without their weights at hand (no hub here) they are built from
their configs with random weights, which run at the same speed; the T5 tokenizer is then a stand-in that
hashes words to ids (tokenizing is CPU work off the GPU's critical path).

Fast (default) vs --baseline: blocks compiled, SDPA's fused attention, bf16 compute weights with fp32 master
weights in zero.py (`train.py --zero 2 --compile`, on one GPU a group of one), fused AdamW, channels-last SD-VAE
in micro-batches; the baseline is eager PyTorch, math attention, fp32 weights under bf16 autocast, a
for-loop AdamW, and the SD-VAE and T5 as plain bf16 diffusers/transformers calls on the whole batch.

Tokens are counted after the SD-VAE (x8) and the patch (1, 2, 2): 16x256x256 is 4,096 tokens per sample.
MFU counts model FLOPs as Kaplan et al. (2020) do: training = 3 x forward; forward per token per layer
24 D^2 + 4 D N for DiT (plus 4 D^2 + 4 D L with cross-attention) and 36 D^2 + 4 D (S + T + L) for STDiT;
encoder FLOPs and the recomputation of gradient checkpointing are not counted.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

import checkpoint
import data
import gpu_kernels
import sample
import seqparallel
import train
import zero
from fp8 import enable_fp8_training, quantize_fp8
from model import PRESETS, build_model
from text import TextEncoder
from vae import build_vae

# The published rows (8x H800, per GPU; T5 + SD-VAE online in the video rows; see the docstring): name -> settings,
# (published samples/s/GPU, tokens/s/GPU). Batch sizes and the share of gradient-checkpointed blocks are ours, per GPU,
# (online, --precomputed): the fastest that fit an 80 GB H100 (online, T5-XXL holds 9.5 GB of it).
ROWS = {
    "dit-img256": (dict(model="DiT-XL/2", cond="adaln", classes=1000, frames=1, size=(256, 256), batch=(128, 192)), (175, 45e3)),
    "dit-16x256": (dict(model="DiT-XL/2", frames=16, size=(256, 256), batch=(6, 8)), (7.20, 29e3)),
    "stdit-16x256": (dict(model="STDiT-XL/2", frames=16, size=(256, 256), batch=(6, 8)), (7.00, 28e3)),
    "dit-16x512": (dict(model="DiT-XL/2", frames=16, size=(512, 512), batch=(1, 2)), (0.85, 14e3)),
    "stdit-16x512": (dict(model="STDiT-XL/2", frames=16, size=(512, 512), batch=(2, 2), ckpt=(0.15, 0)), (1.45, 23e3)),
    "dit-64x512": (dict(model="DiT-XL/2", frames=64, size=(512, 512), batch=(1, 1), ckpt=(0.6, 0.5)), (0.08, 5e3)),
    "stdit-64x512": (dict(model="STDiT-XL/2", frames=64, size=(512, 512), batch=(2, 1), ckpt=(0.89, 0.5)), (0.40, 25e3)),
    "stdit-360x512": (dict(model="STDiT-XL/2", frames=360, size=(512, 512), batch=(1, 1), ckpt=(1, 1), sp=2), (0.10, 18e3)),
    "dit-360x512": (dict(model="DiT-XL/2", frames=360, size=(512, 512), batch=(1, 1), ckpt=(1, 1), sp=2), (None, None)),
}
# Published sampling, Open-Sora v1.0 on one H800, 100 DDPM steps with guidance: seconds per sample
PUBLISHED_SAMPLING = {"stdit-16x256": 5.0, "stdit-16x512": 20.0, "stdit-64x512": 40.0}
# --sample's default steps per sampler: v1.0's 100; 20 for DPM-Solver; Open-Sora 1.2's 30 for rectified flow
SAMPLE_STEPS = {"ddpm": 100, "ddim": 50, "dpm": 20, "rflow": 30}

# T5-v1.1-XXL's encoder (DeepFloyd/t5-v1_1-xxl): 4,762,310,656 parameters
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# Stable Diffusion's KL-f8 VAE (stabilityai/sd-vae-ft-ema): 83,653,863 parameters
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256)


def model_flops_per_sample(cfg, grid, L):
    """Training FLOPs per sample (3 x forward) for the token grid (T, H, W) and L caption tokens."""
    T, H, W = grid
    S, N, D = H * W, T * H * W, cfg.hidden
    if cfg.arch == "dit":
        per_token = 24 * D * D + 4 * D * N
        if cfg.cond == "cross":
            per_token += 4 * D * D + 4 * D * L
    else:
        per_token = 36 * D * D + 4 * D * (S + T + L)
    return 3 * cfg.depth * N * per_token


def matmul_peak_tflops(device, n=8192, reps=30):
    """The practical bf16 peak of this GPU, measured now: the best of a few timed n^3 matmuls."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - tick) / reps)
    return 2 * n**3 / best / 1e12


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


class HashTokenizer:
    """Stand-in for T5's sentencepiece tokenizer when its files are absent: words -> ids by a hash, then eos
    and padding, the shapes and mask T5's tokenizer gives. For speed measurements with random weights only."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, captions, max_length, **kwargs):
        from transformers import BatchEncoding
        ids = torch.zeros(len(captions), max_length, dtype=torch.long)  # 0 = T5's pad id
        for row, caption in enumerate(captions):
            words = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in caption.split()][:max_length - 1]
            ids[row, :len(words) + 1] = torch.tensor(words + [1])  # 1 = T5's eos id
        return BatchEncoding(dict(input_ids=ids, attention_mask=(ids != 0).long()))


def sdpa_backends(name):
    """The SDPA kernels allowed: one family, or torch's choice among all (fused ones first)."""
    from torch.nn.attention import SDPBackend
    families = dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION)
    return [families[name]] if name in families else list(families.values()) + [SDPBackend.MATH]


def build_encoders(args, device, log, text=True):
    """(vae, text_encoder): the real weights where they can be loaded, else the same architectures at random."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    micro_batch = args.vae_micro_batch if not args.baseline else 0  # 0: every frame of the batch in one call
    try:
        vae = build_vae("sd", path=args.vae_path, micro_batch=micro_batch, device=device, dtype=torch.bfloat16)
    except FileNotFoundError:
        if args.vae_path:  # a folder or hub id the user named must load
            raise
        log("SD-VAE weights not at hand: the same architecture with random weights (same speed)")
        with tempfile.TemporaryDirectory() as folder:  # through the real loading code, from a local folder
            torch.manual_seed(0)
            AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder)
            vae = build_vae("sd", path=folder, micro_batch=micro_batch, device=device, dtype=torch.bfloat16)
    if not text:  # class-conditional images need no text encoder
        return vae, None
    try:
        text_encoder = TextEncoder(args.text_encoder, max_length=args.text_len, device=device, cache_size=0)
    except FileNotFoundError:
        if args.text_encoder != "t5":
            raise
        log("T5-v1.1-XXL weights not at hand: the same architecture with random weights (same speed)")
        with device:
            t5 = T5EncoderModel(T5Config(**T5_XXL)).to(torch.bfloat16)
        text_encoder = TextEncoder.from_model(t5, HashTokenizer(T5_XXL["vocab_size"]), args.text_len, cache_size=0)
    if not args.baseline and device.type == "cuda":  # what train.py --compile does to its encoders
        vae.compile_for_speed()
        if text_encoder is not None:
            text_encoder.compile_for_speed()
    return vae, text_encoder


def settings(args):
    """Resolve a --row and the fast/baseline defaults into concrete settings (explicit flags win)."""
    row = ROWS[args.row][0] if args.row else {}
    which = 1 if args.precomputed else 0  # rows give (online, precomputed) batch sizes and checkpoint shares
    s = dict(model=args.model or row.get("model", "STDiT-XL/2"), cond=args.cond or row.get("cond", "cross"),
             classes=row.get("classes", 0), frames=args.frames or row.get("frames", 16),
             size=tuple(args.size or row.get("size", (256, 256))),
             batch=args.batch_size or row.get("batch", (1, 1))[which],
             ckpt=args.grad_checkpoint if args.grad_checkpoint is not None else row.get("ckpt", (0, 0))[which],
             sp=args.sp_size or row.get("sp", 1))
    s["compile"] = args.compile if args.compile is not None else not args.baseline
    s["attn"] = args.attn or ("math" if args.baseline else "auto")
    s["optimizer"] = args.optimizer or ("ddp" if args.baseline else "zero2")
    return s


def bench_training(args, s, device, rank, world, log):
    vae = text_encoder = None
    if not args.precomputed:
        vae, text_encoder = build_encoders(args, device, log, text=not s["classes"])
    torch.manual_seed(0)
    with device:  # initialise on the GPU: an XL model's init on one CPU thread takes a minute
        model = build_model(s["model"], cond=s["cond"], num_classes=s["classes"], attn=s["attn"], grad_checkpoint=s["ckpt"],
                            caption_len=args.text_len, caption_channels=text_encoder.dim if text_encoder else 4096)
    fp8_linears = enable_fp8_training(model) if args.fp8 else 0  # train.py --fp8
    n_params = sum(p.numel() for p in model.parameters())
    H, W = (n // 8 for n in s["size"])  # SD-VAE latents
    S = (H // model.cfg.patch[1]) * (W // model.cfg.patch[2])
    T = s["frames"] if args.tokens is None else math.ceil(args.tokens / S)
    sp_group = None
    if s["sp"] > 1:
        sp_group, _, _ = seqparallel.init_groups(s["sp"])
        seqparallel.apply_sequence_parallel(model, sp_group, args.sp_kind, overlap=not args.no_overlap)
    # train.parallelize's order (its comments say why): fp8, sequence parallelism, ZeRO-2's cast, compiled blocks,
    # then DDP or FSDP2's sharding, and the optimizer on the parameters as they end up
    fused = device.type == "cuda" and not args.baseline
    if s["optimizer"] == "zero2":  # bf16 compute weights, fp32 master slices: what train.py --zero 2 trains with
        net, opt = model, zero.ZeRO2(model, lr=1e-4, compute_dtype=torch.bfloat16)  # no EMA: DDP and FSDP2 keep none here
    if s["compile"]:
        for block in model.blocks:
            block.compile()
    if s["optimizer"] == "fsdp2":  # train.py --fsdp2: torch's fully_shard, bf16 gathers, fp32 reductions
        net = train.shard_fsdp2(model, "bf16")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    elif s["optimizer"] == "ddp":  # train.py's default: fp32 weights under autocast
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=False if args.baseline else None)
    diffusion = train.IDDPM()
    B = s["batch"]
    if args.precomputed:
        z = torch.randn(B, model.cfg.in_channels, T, H, W, device=device)
        y = torch.randn(B, args.text_len, model.cfg.caption_channels, device=device)
        mask = torch.ones(B, args.text_len, dtype=torch.bool, device=device)
    else:
        video = torch.rand(B, 3, T, *s["size"], device=device) * 2 - 1  # synthetic frames in [-1, 1]
    if model.cfg.num_classes:  # class-conditional images: labels, no text encoder
        labels = torch.randint(0, model.cfg.num_classes, (B,), device=device)
    backends = sdpa_backends(args.sdpa_backend)
    calls = [0]

    def step():
        from torch.nn.attention import sdpa_kernel
        calls[0] += 1
        with sdpa_kernel(backends):
            if model.cfg.num_classes:
                z_, y_, mask_ = (z if args.precomputed else vae.encode(video)), labels, None
            elif args.precomputed:
                z_, y_, mask_ = z, y, mask
            else:  # a fresh caption per sample and step: the published rows ran T5 on every batch
                captions = [f"sample {calls[0]} {i} a camera pans across a city street at night" for i in range(B)]
                z_, y_, mask_ = train.encode(vae, text_encoder, video, captions)
            loss = train.training_step(net, diffusion, z_, y_, mask_, args.precision)
            loss.backward()
        if s["optimizer"] == "zero2":  # ZeRO-2 clips over its slices
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False if args.baseline else None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, states = timed(step, args.warmup, args.steps, device)
    grid = (T, H // model.cfg.patch[1], W // model.cfg.patch[2])
    tokens = math.prod(grid)
    dp = world // s["sp"]
    tflops = model_flops_per_sample(model.cfg, grid, args.text_len) * B * dp / seconds / world / 1e12
    result = dict(row=args.row, model=s["model"], cond=model.cfg.cond, grid=grid, tokens=tokens, batch=B, gpus=world,
                  sp=s["sp"], sp_kind=args.sp_kind if s["sp"] > 1 else None,
                  overlap=not args.no_overlap if s["sp"] > 1 and args.sp_kind == "fastseq" else None, grad_checkpoint=s["ckpt"], compile=s["compile"],
                  attn=s["attn"], fp8_linears=fp8_linears, flash_attn=gpu_kernels.flash_version(),
                  fused_norm=gpu_kernels.FUSED_NORM, short_attention=gpu_kernels.SHORT_ATTENTION, fused_step=zero.FUSED_STEP, optimizer=s["optimizer"], mode="baseline" if args.baseline else "fast",
                  encoders="precomputed" if args.precomputed else "online", step_s=round(seconds, 4),
                  samples_per_s_per_gpu=round(B * dp / seconds / world, 3),
                  tokens_per_s_per_gpu=round(tokens * B * dp / seconds / world), model_tflops_per_gpu=round(tflops, 1))
    result.update(gpu_facts(device, tflops))
    if device.type == "cuda" and args.precomputed:  # online, the encoders' weights would count too
        result["state_bytes_per_param"] = round(states / n_params, 2)
    if args.comm_profile and device.type == "cuda":
        result["nccl_share"] = round(nccl_share(step), 3)
    if args.profile and rank == 0:  # where one step's GPU time goes, by kernel
        profile_once(step, device, log)
    if args.row:
        result["published_samples_per_s"], result["published_tokens_per_s"] = ROWS[args.row][1]
    return result


def profile_once(fn, device, log):
    """Log one call of fn profiled: operators by time, and on a GPU its kernels by class (kernel_summary)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    if device.type == "cuda":
        log(kernel_summary(prof))


KERNEL_CLASSES = (  # (class, name fragments): a GPU kernel's class is the first whose fragment its name holds
    ("attention", ("fmha", "flash", "sdpa", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass")),
    ("adaLN norms (fused)", ("_norm_modulate",)),
    ("fp8 rounding", ("_fp8_",)),
    ("compiled (triton)", ("triton",)),
    ("optimizer (foreach/fused)", ("multi_tensor_apply",)),
    ("nccl", ("nccl",)),
)


def kernel_summary(prof, top=25):
    """One profiled step's GPU kernels: busy and idle time, time by kernel class, and the top kernels by time."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return "no GPU kernels recorded"
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:  # the union of kernel intervals (us): streams may overlap
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    wall = end - spans[0][0]
    by_class, by_name = {}, {}
    for e in kernels:
        name, us = e.name, e.time_range.elapsed_us()
        group = next((c for c, parts in KERNEL_CLASSES if any(p in name.lower() for p in parts)), "other (aten)")
        by_class[group] = by_class.get(group, 0.0) + us
        total, count = by_name.get(name, (0.0, 0))
        by_name[name] = (total + us, count + 1)
    summed = sum(by_class.values())
    lines = [f"GPU: first to last kernel {wall / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(wall - busy) / 1e3:.1f} ms"]
    lines += [f"  {c:26s} {us / 1e3:8.1f} ms {100 * us / summed:5.1f}%" for c, us in sorted(by_class.items(), key=lambda r: -r[1])]
    lines += [f"  {us / 1e3:8.2f} ms {n:4d}x  {name[:110]}" for name, (us, n) in sorted(by_name.items(), key=lambda r: -r[1][0])[:top]]
    return "\n".join(lines)


def timed(fn, warmup, steps, device):
    """Seconds per call after warm-up, and the memory held between calls (weights and optimizer state)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - tick) / steps, held


def gpu_facts(device, tflops=None):
    """The GPU's name and peak memory; with tflops (model FLOPs achieved), the measured matmul peak and MFU."""
    if device.type != "cuda":
        return dict(device="cpu")
    facts = dict(device=torch.cuda.get_device_name(device), peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 1))
    if tflops is not None:  # the matmuls run after the peak memory was read
        peak = matmul_peak_tflops(device)
        facts.update(matmul_peak_tflops=round(peak), mfu=round(tflops / peak, 3))
    return facts


def bench_sampling(args, s, device, log):
    """Seconds per sample for sample.py's generate(): for each `--sampler` (with its `--sample-steps`), that many
    denoising steps with guidance (a batch of 2B), then the SD-VAE decode; the model in bf16 (its linears in fp8 with
    --fp8) compiled by sample.compile_for_sampling (eager with --baseline). Also one guided forward timed alone, so
    a step's time splits into the model and the rest (scheduler, guidance). One result per sampler."""
    vae, text_encoder = build_encoders(args, device, log)
    torch.manual_seed(0)
    with device:
        model = build_model(s["model"], attn=s["attn"], caption_len=args.text_len, caption_channels=text_encoder.dim)
        for p in model.parameters():  # open the zero-initialised branches, so every linear counts in the errors below
            if not p.any():
                torch.nn.init.normal_(p, std=0.02)
    model.eval()  # no random caption dropout: every forward below sees the same conditions
    prompts = [f"prompt {i}: a red panda climbs a tree" for i in range(s["batch"])]
    size = (s["frames"], *s["size"])
    T, H, W = vae.latent_shape(*size)
    B = s["batch"]
    # one guided forward: the batch of 2B that every denoising step runs
    y, mask, _ = text_encoder.encode(prompts * 2)
    x = torch.randn(2 * B, model.cfg.in_channels, T, H, W, device=device)
    t = torch.full((2 * B,), 500, device=device)
    drop = torch.arange(2 * B, device=device) >= B

    @torch.no_grad()
    def forward(precision=args.precision):
        with sample.autocast(device, precision):
            return model(x, t, y, mask, force_drop=drop)
    errors = {}  # relative L2 error of that forward against the fp32 model: what bf16 and fp8 cost in accuracy
    reference = forward("fp32").float() if args.fp8 else None
    if not args.baseline and device.type == "cuda":  # bf16 weights (CPUs run bf16 matmuls slowly)
        model.to(torch.bfloat16)
    if args.fp8:  # sample.py --fp8
        error = lambda: round(((forward("bf16").float() - reference).norm() / reference.norm()).item(), 4)
        errors["forward_error_bf16"] = error()
        quantize_fp8(model)
        errors["forward_error_fp8"] = error()
    if s["compile"]:
        model = sample.compile_for_sampling(model)
    forward_s, _ = timed(forward, 2, 10, device)  # the warm-up calls compile
    if args.profile:  # where that forward's time goes
        profile_once(forward, device, log)
    flops_per_step = model_flops_per_sample(model.cfg, (T, H // 2, W // 2), args.text_len) / 3 * 2 * B
    results = []
    for sampler, n in zip(args.sampler, args.sample_steps):
        def run(n=n):
            sample.generate(model, vae, text_encoder, prompts, size, sampler=sampler, steps=n, cfg_scale=7.0,
                            precision=args.precision, timestep_shift=True)  # rflow as Open-Sora 1.2 samples
        run(2)  # warm-up: the scheduler's and the decoder's first calls
        seconds, _ = timed(run, 0, 1, device)
        result = dict(row=args.row, task="sampling", model=s["model"], frames=s["frames"], size=s["size"], batch=B,
                      sampler=sampler, steps=n, cfg_scale=7.0, fp8=args.fp8, mode="baseline" if args.baseline else "fast",
                      seconds_per_sample=round(seconds / B, 3), forward_ms=round(forward_s * 1e3, 1), **errors,
                      published_seconds_per_sample=PUBLISHED_SAMPLING.get(args.row) if n == 100 and sampler == "ddpm" else None)
        result.update(gpu_facts(device, flops_per_step * n / seconds / 1e12))
        log(json.dumps(result))
        results.append(result)
    return results


def bench_encoders(args, s, device, log):
    """Frames/s of SD-VAE encoding and captions/s of T5-XXL (batches of 64 captions of 120 tokens): the plain bf16
    diffusers / transformers calls (every frame in one call), then the same modules after compile_for_speed()
    and in micro-batches of --vae-micro-batch frames, as the fast training step runs them."""
    vae, text_encoder = build_encoders(argparse.Namespace(**{**vars(args), "baseline": True}), device, log)
    video = torch.rand(s["batch"], 3, s["frames"], *s["size"], device=device) * 2 - 1
    calls = [0]

    def captions():
        calls[0] += 1
        return [f"call {calls[0]} caption {i}: a drone flies over snowy mountains at dawn" for i in range(64)]
    result = dict(row=args.row, task="encoders", frames=s["batch"] * s["frames"], size=s["size"], captions=64)
    for mode in ("plain", "fast"):
        if mode == "fast" and device.type == "cuda":
            vae.micro_batch = args.vae_micro_batch
            vae.compile_for_speed()
            text_encoder.compile_for_speed()
        seconds, _ = timed(lambda: vae.encode(video), 2, 3, device)
        result[f"{mode}_vae_frames_per_s"] = round(result["frames"] / seconds, 1)
        seconds, _ = timed(lambda: text_encoder.encode(captions()), 2, 3, device)
        result[f"{mode}_t5_captions_per_s"] = round(64 / seconds, 1)
    result.update(gpu_facts(device))
    return result


def child(argv, extra, nproc, timeout, gpus=None):
    """Run bench.py with argv + extra in a fresh process (torchrun for several GPUs), on the given GPUs (indices
    among those this process sees; default all): its JSON result, or {"failed": True, "error": why}. A fresh
    process frees all memory, and an out-of-memory error on one rank of a sequence-parallel group cannot hang the
    others forever."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    argv = strip(argv, valued=("--out",))  # the parent writes the results it keeps
    env = None
    if gpus is not None:  # CUDA_VISIBLE_DEVICES names physical GPUs: map through the ones this process was given
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids[i] for i in gpus)}
    try:
        out = subprocess.run(launcher + [os.path.abspath(__file__)] + argv + extra, capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(failed=True, error=f"timed out after {timeout} s")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    errors = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line] or out.stderr.splitlines()[-1:]
    return dict(failed=True, error=errors[-1].strip() if errors else f"exit code {out.returncode}")


def all_rows(args, argv):
    """--row all: every row in its own process (torchrun for the sequence-parallel ones), one after the other, or
    with --side-by-side as many at once as this host has GPUs for, each on GPUs of its own. Results in ROWS order."""
    gpus = max(1, torch.cuda.device_count())
    jobs = []
    for name, (row, _) in ROWS.items():
        nproc = args.sp_size or row.get("sp", 1)
        if nproc > gpus:
            print(f"{name}: needs {nproc} GPUs, skipped")
        else:
            jobs.append((name, nproc))
    free, turn = list(range(gpus)), threading.Condition()

    def run(job):
        name, nproc = job
        mine = None
        if args.side_by_side:
            with turn:  # wait for enough free GPUs
                turn.wait_for(lambda: len(free) >= nproc)
                mine, free[:nproc] = free[:nproc], []
        try:
            result = child(strip(argv, "--row", "all", "--side-by-side"), ["--row", name], nproc, args.trial_timeout, mine)
        finally:
            if mine is not None:
                with turn:
                    free.extend(mine)
                    turn.notify_all()
        print(f"{name}: done" + (f" (GPUs {mine})" if mine is not None else ""), file=sys.stderr, flush=True)
        return dict(result, row=name)
    with ThreadPoolExecutor(gpus if args.side_by_side else 1) as pool:
        return list(pool.map(run, jobs))


def strip(argv, *flags, valued=()):
    """argv without flags, and without the valued flags together with their values (--out x, --out=x)."""
    kept, rest = [], iter(argv)
    for a in rest:
        if a in valued:
            next(rest, None)  # its value
        elif a not in flags and a.split("=")[0] not in valued:
            kept.append(a)
    return kept


def max_tokens(args, s, argv, log):
    """The longest video that trains a step: from --frames, double until a step fails, then bisect to 5%."""
    if args.tokens:
        sys.exit("--max-tokens starts from --frames (at --size): drop --tokens")
    argv = strip(argv, "--max-tokens") + ["--steps", "1", "--warmup", "1"]
    frames, good, bad, best = s["frames"], 0, None, None
    while True:
        result = child(argv, ["--frames", str(frames)], s["sp"], args.trial_timeout)
        if result.get("failed") and "out of memory" not in result["error"].lower():  # a bad flag is not a length limit
            sys.exit(f"a {frames}-frame trial failed for another reason than memory: {result['error']}")
        ok = not result.get("failed")
        log(f"{frames} frames: " + (f"trains, {result['tokens']} tokens, {result['step_s']} s/step" if ok else "out of memory"))
        if ok:
            good, best = frames, result
        else:
            bad = frames
        if bad is None:
            frames *= 2
        elif bad - good <= max(1, good // 20):
            break
        else:
            frames = (good + bad) // 2
    if best is None:
        sys.exit("not even one frame trains: lower --batch-size, or add --grad-checkpoint or --sp-size")
    return dict(best, max_tokens=best["tokens"], max_frames=good, first_failing_frames=bad)


def refuse_bad_values(error, args):
    """One sentence (error) for a value that would time nonsense or fail later, before any model is built."""
    data.refuse_counts_below_one(error, args, ("frames", "tokens", "batch_size", "text_len", "vae_micro_batch", "sp_size",
                                              "steps", "trial_timeout"))
    if args.model and args.model not in PRESETS:
        error(f"--model {args.model} is not a preset: choose one of {', '.join(PRESETS)}")
    if args.grad_checkpoint is not None and not 0 <= args.grad_checkpoint <= 1:
        error(f"--grad-checkpoint {args.grad_checkpoint}: give the share of blocks to recompute, from 0 to 1")
    if args.warmup < 0:
        error(f"--warmup must be 0 or more, not {args.warmup}")
    for name, values in (("size", args.size), ("sample-steps", args.sample_steps)):
        if values and min(values) < 1:
            error(f"--{name} must be positive, not {' '.join(map(str, values))}")
    if args.fp8 and args.precision == "fp16" and not args.sample:  # as train.py refuses it
        error("--fp8 trains under bf16 autocast (its kernels write bf16): drop --precision fp16")
    if args.sample_steps and len(args.sample_steps) != len(args.sampler):
        error(f"--sample-steps gives {len(args.sample_steps)} step counts for {len(args.sampler)} samplers: give one each")
    if args.side_by_side and args.row != "all":
        error("--side-by-side spreads the rows of --row all over this host's GPUs: add --row all, or leave it out")
    if args.out and (why := checkpoint.unwritable(os.path.dirname(args.out) or ".") or
                     (os.path.isdir(args.out) and f"{args.out} is a folder: give a file name")):
        error(f"--out {why}")  # now, not after the timed runs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", choices=list(ROWS) + ["all"], help="a published setting (flags below override its values)")
    p.add_argument("--model", help="a preset of model.py (default STDiT-XL/2)")
    p.add_argument("--cond", choices=["adaln", "cross", "concat"])
    p.add_argument("--frames", type=int, help="video frames (latent frames with the SD-VAE)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="pixel size")
    p.add_argument("--tokens", type=int, help="set frames so a sample has this many tokens (at --size)")
    p.add_argument("--batch-size", type=int, help="per data-parallel rank")
    p.add_argument("--text-len", type=int, default=120, help="caption tokens (T5 in Open-Sora v1.0: 120)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpoint", type=float, nargs="?", const=1.0, metavar="SHARE",
                   help="recompute blocks in backward: all, or this share of them (default: the row's)")
    p.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_const", const=0.0)
    p.add_argument("--precomputed", action="store_true", help="skip the encoders: synthetic latents and T5 states")
    p.add_argument("--baseline", action="store_true", help="eager, math attention, fp32 weights, no fused kernels")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile each block")
    p.add_argument("--attn", choices=["auto", "flash", "sdpa", "math"])
    p.add_argument("--no-flash-attn", action="store_true",
                   help="leave flash-attn (4 or 2) out where it is installed: attn auto then runs SDPA's kernels there, "
                        "its other choices (frame kernel, memory-efficient cross-attention) as they are")
    p.add_argument("--no-fused-norm", action="store_true",
                   help="adaLN's LayerNorm + modulate and residual add as Inductor compiles model.py's code, not gpu_kernels' "
                        "fused kernels (for before/after)")
    p.add_argument("--no-short-attn", action="store_true",
                   help="training self-attention over up to 256 tokens in SDPA, not gpu_kernels' Triton kernels (for "
                        "before/after)")
    p.add_argument("--fused-step", action="store_true",
                   help="ZeRO-2's clip, AdamW, EMA and weight copy in one Triton kernel per slice (zero.FUSED_STEP): off "
                        "by default until whole rows are timed with and without it (docs/LOG.md)")
    p.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "cudnn", "efficient"])
    p.add_argument("--optimizer", choices=["ddp", "zero2", "fsdp2"],
                   help="DDP + AdamW on fp32 weights (train.py's default), our ZeRO-2 with bf16 compute weights, or "
                        "torch's FSDP2 fully_shard(reshard_after_forward=False) as train.py --fsdp2 shards: the library's ZeRO-2")
    p.add_argument("--vae-micro-batch", type=int, default=32, help="frames per SD-VAE call")
    p.add_argument("--vae-path", default=None, help="SD-VAE folder or hub id (default stabilityai/sd-vae-ft-ema)")
    p.add_argument("--text-encoder", default="t5", help="text encoder folder or hub id (default T5-v1.1-XXL)")
    p.add_argument("--sp-size", type=int)
    p.add_argument("--sp-kind", default="ulysses", choices=seqparallel.SP_KINDS)
    p.add_argument("--no-overlap", action="store_true", help="FastSeq without overlapping its all-gather")
    p.add_argument("--max-tokens", action="store_true", help="search the longest video that trains a step")
    p.add_argument("--trial-timeout", type=int, default=900, help="seconds per --max-tokens trial")
    p.add_argument("--encoders", action="store_true", help="time the SD-VAE and T5 alone: plain calls vs ours")
    p.add_argument("--sample", action="store_true", help="time sampling (sample.py's generate) instead of training")
    p.add_argument("--sampler", nargs="+", default=["ddpm"], choices=list(SAMPLE_STEPS), help="one or more, timed in turn")
    p.add_argument("--sample-steps", type=int, nargs="+", help="one per sampler (default: ddpm 100, ddim 50, dpm 20)")
    p.add_argument("--fp8", action="store_true", help="the blocks' linears in fp8: training as train.py --fp8, with --sample as "
                   "sample.py --fp8")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also print one step's (with --sample: one guided forward's) top kernels (torch.profiler)")
    p.add_argument("--comm-profile", action="store_true", help="also the share of step time in NCCL kernels")
    p.add_argument("--side-by-side", action="store_true",
                   help="with --row all: run rows at the same time, each on GPUs of its own (one host, several GPUs)")
    p.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    args = p.parse_args(argv)

    refuse_bad_values(sys.exit, args)
    if args.row == "all":
        return write(args, all_rows(args, argv))

    # off: as if not installed (the result says null)
    fused_step, zero.FUSED_STEP = zero.FUSED_STEP, args.fused_step and not args.baseline
    try:
        with gpu_kernels.override(flash_attn=not args.no_flash_attn, fused_norm=not (args.no_fused_norm or args.baseline),
                                  short_attention=not (args.no_short_attn or args.baseline)):
            return run(args, argv)
    finally:
        zero.FUSED_STEP = fused_step


def run(args, argv):
    """One row (or one --max-tokens search) as main's checked flags ask."""
    args.sample_steps = args.sample_steps or [SAMPLE_STEPS[k] for k in args.sampler]
    distributed = "RANK" in os.environ
    s = settings(args)
    if s["sp"] > 1 and not distributed:
        sys.exit(f"--sp-size {s['sp']} needs {s['sp']} processes: torchrun --nproc_per_node={s['sp']} bench.py ...")
    if args.max_tokens:
        if distributed:
            sys.exit("run --max-tokens with plain python: it launches torchrun for each trial itself")
        return write(args, [max_tokens(args, s, argv, print)])
    device = seqparallel.local_device()
    if distributed:
        seqparallel.init_process_group(device)
    elif s["optimizer"] != "ddp" and not (args.sample or args.encoders):  # ZeRO-2 / FSDP2 on one process: a group of one
        seqparallel.init_process_group(device, alone=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    try:
        if args.encoders:
            result = bench_encoders(args, s, device, log)
        elif args.sample:
            result = bench_sampling(args, s, device, log)
        else:
            result = bench_training(args, s, device, rank, world, log)
    except FileNotFoundError as e:  # a named encoder folder or hub id that cannot be loaded
        if dist.is_initialized():  # every rank stops here: leave no process group to a caller in this process
            dist.destroy_process_group()
        sys.exit(str(e))
    if rank == 0:
        write(args, result if isinstance(result, list) else [result])
    if dist.is_initialized():
        dist.destroy_process_group()


def write(args, results):
    for r in results:
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
