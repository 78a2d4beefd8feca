"""
DiT and STDiT diffusion transformers for videos of any size.

Shape letters, used in every comment and einops pattern of this file:
  B batch, C channels, T frames (latent), H W latent height and width, p patch size,
  S = (H/p)(W/p) spatial tokens per frame, N = T*S video tokens, D hidden size, L condition tokens,
  h attention heads, d head size (D = h*d).

DiT (Peebles & Xie, 2023) runs full self-attention over all N = T*S tokens; an image is T = 1.
STDiT (Open-Sora v1.0) factorises attention: spatial attention inside each frame, temporal attention
along each spatial position, then cross-attention to the caption tokens.
Conditioning of DiT is one of three structures (the March 2024 Open-Sora study):
  adaln  - a pooled condition is added to the timestep embedding and drives every block's modulation
  cross  - self-attention over video tokens, then cross-attention to the condition tokens
  concat - the condition tokens are prepended to the video tokens and dropped before the final layer
Conditions are class labels (B,) or text-token states (B, L, C_text) with a mask (B, L).

Sizes are read from tensor shapes, never stored at construction: one model trains on images, short clips
and long clips of any resolution, and a sequence-parallel wrapper (seqparallel.py) can feed blocks shards.
Every attention goes through one function, `attention`, so that file has exactly one seam to wrap.
"""
import importlib.util
import logging
import math
from dataclasses import dataclass, asdict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

try:  # optional fast kernel; it cannot be installed without a CUDA toolchain, so SDPA is the default
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None
try:  # flash-attn 4 (`pip install flash-attn-4[cu13]`): CuTe DSL kernels compiled at run time, no toolchain needed
    FLASH4 = importlib.util.find_spec("flash_attn.cute") is not None  # imported at first use: it takes seconds
except ImportError:
    FLASH4 = False
try:  # ships with torch's CUDA builds; the CPU builds run frame attention through attention() instead
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def modulate(x, shift, scale):
    # adaLN: the "1 +" makes a zero-initialised modulation the identity, so training starts from LN(x)
    return x * (1 + scale) + shift


ATTENTION_IMPLS = ("auto", "flash", "sdpa", "math")
SHORT_KEYS = 128  # "auto": up to this many keys, the flash and cuDNN kernels' key tiles (64-128) are mostly empty
FLASH4_KEYS = 2048  # "auto": flash-attn 4 from this many keys on (H200: steps 9-23% shorter at 4,096+; none at 256, 1,024)
QUERY_ROWS = 1024  # "efficient": at most this many queries per batch row
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # "cudnn"; MATH on CPUs


def attention(q, k, v, mask=None, impl="auto"):
    """The single attention seam. q (B, N, h, d), k and v (B, M, h, d), mask (B, M) bool, True = attend.

    flash: flash-attn (CUDA, half precision, no mask): version 4 (flash4) on Hopper and newer GPUs where it is
    installed, else version 2; sdpa: torch's fused kernels (flash, cuDNN or
    memory-efficient, picked by torch); math: the plain formula, the reference for tests and benchmarks;
    efficient: SDPA's memory-efficient kernel over few keys (efficient_attention); cudnn: SDPA's cuDNN kernel
    first (half precision on CUDA), then the others.
    auto picks by the shapes, as measured fastest on an H100 (README, "Benchmarks"):
      many queries, few keys (cross-attention to L = 120 caption tokens): efficient when training, whose
        backward is the cheapest; cudnn without gradients (sampling), whose forward takes half the time;
      few queries and few keys inside torch.compile (STDiT's temporal attention where the frame kernel does not
        run: no CUDA, over 64 frames, or sequence parallel): math, which the compiler fuses (2x faster there than
        any SDPA kernel, whose tiles would be mostly empty);
      otherwise flash-attn when it runs here and nothing is masked, else sdpa (cuDNN). flash-attn 4 only over
        FLASH4_KEYS keys or more and with gradients: DiT-XL/2's steps were 9-23% shorter with it at 4,096 to 65,536 keys,
        but no faster at 1,024 keys and 1.6-2.3% slower at 256 (STDiT-XL/2's spatial attention, DiT-XL/2 images),
        and in sampling its padded heads made STDiT-XL/2's forward slower than cuDNN's, 80.2 against 71.6 ms.
    """
    if impl == "auto":
        few_keys = k.shape[1] <= SHORT_KEYS
        if few_keys and q.shape[1] > SHORT_KEYS and q.is_cuda:
            impl = "efficient" if torch.is_grad_enabled() else "cudnn"
        elif few_keys and torch.compiler.is_compiling():
            impl = "math"
        elif mask is None and flash4_runs(q) and k.shape[1] >= FLASH4_KEYS and torch.is_grad_enabled():
            impl = "flash4"
        elif mask is None and flash2_runs(q):
            impl = "flash2"
        else:
            impl = "sdpa"
    if impl == "flash" and mask is not None:  # flash-attn takes no key mask
        impl = "sdpa"
    if impl == "flash":  # asked for by name: version 4 where it runs, else 2
        impl = "flash4" if flash4_runs(q) else "flash2"
    if impl == "flash4":
        return flash4(q, k, v)
    if impl == "flash2":
        if flash_attn_func is None:
            raise ValueError("attn='flash' here needs flash-attn 2 (flash-attn 4 runs on Hopper and newer GPUs in half precision): use attn='sdpa'")
        return flash_attn_func(q, k, v)
    if impl == "efficient":
        return efficient_attention(q, k, v, mask)
    q, k, v = (rearrange(t, "B N h d -> B h N d") for t in (q, k, v))
    bias = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M): one key mask for all heads
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    elif impl == "cudnn":
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, N, M)
        if bias is not None:
            scores = scores.masked_fill(~bias, float("-inf"))
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v  # softmax in fp32 even under bf16/fp16
    return rearrange(out, "B h N d -> B N h d")


@torch.compiler.assume_constant_result
def hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def half_on_gpu(q):  # what flash-attn takes
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash4_runs(q):
    """flash-attn 4 trains on Hopper (compute capability 9) and newer."""
    return FLASH4 and half_on_gpu(q) and hopper_or_newer(q.device.index)


def flash2_runs(q):
    return flash_attn_func is not None and half_on_gpu(q)


# flash-attn 4 on Hopper rounds head sizes up to 16 in its backward kernel but to 32 in the buffer it sums dq in:
# at 72 and 80 (DiT-XL/2's heads are 72) its dq came out wrong (4.0.0b36, H200). Zero-padded to a multiple of
# 32 (72 -> 96), q, k and v give the same scores and outputs, and dq is right.
FLASH4_HEAD_MULTIPLE = 32


def flash4(q, k, v):
    """flash-attn 4 on q (B, N, h, d), k, v (B, M, h, d), heads zero-padded to FLASH4_HEAD_MULTIPLE."""
    d = q.shape[-1]
    pad = -d % FLASH4_HEAD_MULTIPLE
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return flash4_attention(q, k, v, d**-0.5)[0][..., :d]


# As custom ops, a compiled block calls the kernels as they are (torch.compile does not trace into them) and a
# checkpointed block can keep their outputs (keep_attention).
@torch.library.custom_op("opensora::flash4_attention", mutates_args=())
def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the output (B, N, h, d) and the log-sum-exp of each query's scores (B, h, N), fp32."""
    from flash_attn.cute import flash_attn_func as flash_attn4
    out, lse = flash_attn4(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse


@flash4_attention.register_fake
def _(q, k, v, scale):
    B, N, h, _ = q.shape
    return q.new_empty(B, N, h, v.shape[-1]), q.new_empty(B, h, N, dtype=torch.float32)


@torch.library.custom_op("opensora::flash4_attention_backward", mutates_args=())
def flash4_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd  # the backward of flash_attn.cute.flash_attn_func
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad.contiguous(), lse, scale)
    return dq, dk, dv


@flash4_attention_backward.register_fake
def _(grad, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash4_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.scale = inputs[3]


flash4_attention.register_autograd(  # the log-sum-exp is an output for backward only: it gets no gradient
    lambda ctx, grad, _: (*flash4_attention_backward(grad, *ctx.saved_tensors, ctx.scale), None), setup_context=_flash4_setup)


def efficient_attention(q, k, v, mask=None):
    """SDPA's memory-efficient kernel, which takes the key mask and keeps no (N, M) probabilities for backward,
    on rows of at most QUERY_ROWS queries. Its backward runs one thread block per batch row, head and 128 keys:
    over 120 caption tokens that is B*h blocks, 32 for two videos, a quarter of an H100's SMs (STDiT-XL/2 64x512
    trained at 62.5k tokens/s unfolded, 68.8k folded). Each row of queries gets its own copy of the keys."""
    B, N = q.shape[:2]
    rows = -(-N // QUERY_ROWS)  # per sample
    n = -(-N // rows)  # queries per row; the last row is padded with zero queries
    if rows * n > N:
        q = F.pad(q, (0, 0, 0, 0, 0, rows * n - N))
    q = rearrange(q, "B (r n) h d -> (B r) h n d", r=rows)
    k, v = (repeat(t, "B M h d -> (B r) h M d", r=rows) for t in (k, v))
    bias = None if mask is None else repeat(mask, "B M -> (B r) 1 1 M", r=rows)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # math where the kernel is missing (CPU)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return rearrange(out, "(B r) h n d -> B (r n) h d", B=B)[:, :N]


# Attention along the frames (STDiT's temporal attention) as one Triton kernel. Over T <= 64 frames every
# (sample, spatial position, head) is one small T x T attention. Run through attention(), (B, T, S, 3D) must be
# transposed to (B S) T first and the output back, four copies of the activations, and the batched 16 x 16
# matmuls run far from peak: 12.6 ms of a 106 ms sampling forward (STDiT-XL/2 16x256, a guided batch of 8,
# H100). The kernel reads q, k and v where the qkv projection wrote them and writes the output in (B, T, S, D):
# one program per (b, s, h) loads three T x d tiles, keeps the T x T scores in registers, and stores one tile.

FRAME_KERNEL_FRAMES = 64  # the kernel keeps a T x T tile in registers: up to 64 x 64 (longer: attention())


def frame_kernel_fits(qkv, impl):
    """Whether TemporalAttention runs the Triton kernel on qkv (B, T, S, 3D): CUDA, impl auto, few frames."""
    return triton is not None and impl == "auto" and qkv.is_cuda and qkv.shape[1] <= FRAME_KERNEL_FRAMES


if triton is not None:
    @triton.jit
    def _frame_tiles(T, S, heads, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's (b, s, h): where its T x d tiles of q, k, v and of the output start, which of their
        entries are real (tiles are padded to powers of two), and the frame index t."""
        pid = tl.program_id(0)
        head, bs = pid % heads, pid // heads  # bs = b S + s
        t, d = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D)
        token = ((bs // S * T + t) * S + bs % S).to(tl.int64)[:, None]  # row of (b, t, s) in (B T S)
        column = head * HEAD_DIM + d[None, :]
        D = heads * HEAD_DIM
        return token * (3 * D) + column, token * D + column, (t[:, None] < T) & (d[None, :] < HEAD_DIM), t, D

    @triton.jit
    def _frame_probs(q, k, t, T, scale, PRECISION: tl.constexpr):
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (T, T), fp32
        scores = tl.where(t[None, :] < T, scores, float("-inf"))  # padded keys
        p = tl.exp(scores - tl.max(scores, 1)[:, None])
        return p / tl.sum(p, 1)[:, None]

    @triton.jit
    def _frame_attention_fwd(qkv, out, T, S, heads, scale, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        at, out_at, valid, t, D = _frame_tiles(T, S, heads, HEAD_DIM, BLOCK_T, BLOCK_D)
        q = tl.load(qkv + at, mask=valid, other=0.0)  # a token's row of qkv holds its q, k, v: D values each
        k = tl.load(qkv + at + D, mask=valid, other=0.0)
        v = tl.load(qkv + at + 2 * D, mask=valid, other=0.0)
        p = _frame_probs(q, k, t, T, scale, PRECISION)
        o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        tl.store(out + out_at, o.to(out.dtype.element_ty), mask=valid)

    @triton.jit
    def _frame_attention_bwd(qkv, grad, dqkv, T, S, heads, scale, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        at, out_at, valid, t, D = _frame_tiles(T, S, heads, HEAD_DIM, BLOCK_T, BLOCK_D)
        q = tl.load(qkv + at, mask=valid, other=0.0)
        k = tl.load(qkv + at + D, mask=valid, other=0.0)
        v = tl.load(qkv + at + 2 * D, mask=valid, other=0.0)
        do = tl.load(grad + out_at, mask=valid, other=0.0)
        p = _frame_probs(q, k, t, T, scale, PRECISION)  # recomputed: cheaper than keeping T x T per head
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * scale  # softmax backward; sum(p dp) = sum(do o) per row
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        tl.store(dqkv + at, dq.to(dqkv.dtype.element_ty), mask=valid)
        tl.store(dqkv + at + D, dk.to(dqkv.dtype.element_ty), mask=valid)
        tl.store(dqkv + at + 2 * D, dv.to(dqkv.dtype.element_ty), mask=valid)


def _launch_frames(kernel, qkv, heads, *tensors):
    B, T, S, D3 = qkv.shape
    d = D3 // 3 // heads
    block_t = max(16, triton.next_power_of_2(T))  # tl.dot takes tiles of 16 and more
    kernel[(B * S * heads,)](qkv, *tensors, T, S, heads, d**-0.5, HEAD_DIM=d, BLOCK_T=block_t,
                             BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4 if block_t >= 64 else 2,
                             PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32")


@torch.library.custom_op("opensora::frame_attention", mutates_args=())
def frame_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv (B, T, S, 3D), the qkv projection of (B, T, S, D) -> attention along T, (B, T, S, D)."""
    qkv = qkv.contiguous()
    out = qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)
    _launch_frames(_frame_attention_fwd, qkv, heads, out)
    return out


@frame_attention.register_fake
def _(qkv, heads):
    return qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)


@torch.library.custom_op("opensora::frame_attention_backward", mutates_args=())
def frame_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, heads: int) -> torch.Tensor:
    qkv = qkv.contiguous()
    dqkv = torch.empty_like(qkv)
    _launch_frames(_frame_attention_bwd, qkv, heads, grad.contiguous(), dqkv)
    return dqkv


@frame_attention_backward.register_fake
def _(grad, qkv, heads):
    return torch.empty_like(qkv)


def _frame_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.heads = inputs[1]


frame_attention.register_autograd(
    lambda ctx, grad: (frame_attention_backward(grad, ctx.saved_tensors[0], ctx.heads), None),
    setup_context=_frame_attention_setup)


# The fused attention kernels' ops. A checkpointed block keeps their outputs (selective checkpointing): at long
# sequences attention is most of a block's forward, yet its output is one row of D values a token (plus a
# log-sum-exp a head), where all of a block's activations are 25-30 rows
ATEN_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (  # q, k, v laid out (B, h, N, d)
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")}
FUSED_ATTENTION_OPS = set(ATEN_ATTENTION_OPS)
FUSED_ATTENTION_OPS.add(torch.ops.opensora.flash4_attention.default)
if hasattr(getattr(torch.ops, "flash_attn", None), "_flash_attn_forward"):  # flash-attn >= 2.6 registers its op
    FUSED_ATTENTION_OPS.add(torch.ops.flash_attn._flash_attn_forward.default)


def keep_attention(ctx, op, *args, **kwargs):
    if op in FUSED_ATTENTION_OPS:
        keys = args[1].shape[2] if op in ATEN_ATTENTION_OPS else args[1].shape[1]  # flash-attn: (B, M, h, d)
        if keys > SHORT_KEYS:  # attention over few keys (to caption tokens) is cheap to redo: recompute it
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# torch.compile warns once that a checkpoint policy must not meet in-place ops: the blocks have none
logging.getLogger("torch._higher_order_ops.wrap").addFilter(lambda record: "context_fn" not in record.getMessage())


def checkpoint_block(forward, *args):
    """Gradient checkpointing of one block: backward recomputes its activations from its inputs, all but the
    fused attention outputs, which it keeps. Called inside the block's forward, so that a compiled block
    compiles the recomputation too (torch.compile honours the keep-or-recompute policy)."""
    return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, keep_attention))


class Attention(nn.Module):
    """Multi-head self-attention; used for DiT's full attention and STDiT's spatial and temporal ones."""

    def __init__(self, dim, heads, impl="auto"):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (B, N, D)
        q, k, v = rearrange(self.qkv(x), "B N (three h d) -> three B N h d", three=3, h=self.heads)
        x = attention(q, k, v, mask, self.impl)
        return self.proj(rearrange(x, "B N h d -> B N (h d)"))


class TemporalAttention(Attention):
    """STDiT's attention along the frames at every spatial position, on x laid out (B, T, S, D) as the block
    holds it: the fused frame kernel on CUDA, else (B S) folded into the batch and attention() along T."""

    def forward(self, x):  # x (B, T, S, D)
        qkv = self.qkv(x)
        if frame_kernel_fits(qkv, self.impl):
            x = frame_attention(qkv, self.heads)
        else:
            q, k, v = rearrange(qkv, "B T S (three h d) -> three (B S) T h d", three=3, h=self.heads)
            x = rearrange(attention(q, k, v, impl=self.impl), "(B S) T h d -> B T S (h d)", B=x.shape[0])
        return self.proj(x)


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys and values from the condition tokens (PixArt-alpha's layout)."""

    def __init__(self, dim, heads, impl="auto"):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask=None):  # x (B, N, D), y (B, L, D), mask (B, L)
        q = rearrange(self.q_linear(x), "B N (h d) -> B N h d", h=self.heads)
        k, v = rearrange(self.kv_linear(y), "B L (two h d) -> two B L h d", two=2, h=self.heads)
        x = attention(q, k, v, mask, self.impl)
        return self.proj(rearrange(x, "B N h d -> B N (h d)"))


class Mlp(nn.Module):
    """Linear, GELU (tanh approximation, as DiT and PixArt use), Linear."""

    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")  # a module, so quantize_fp8 can move it into fc2's input rounding
        self.fc2 = nn.Linear(hidden, out or dim)

    fp8 = False  # enable_fp8_training: fc1, GELU, fc2 as one _Fp8Mlp

    def forward(self, x):
        if self.fp8:
            return _as_rows(_Fp8Mlp.apply, x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))


# FP8 inference (sample.py --fp8). Hopper's tensor cores multiply fp8 at twice the bf16 rate. Weights are rounded
# to e4m3 once, with one scale per output channel; activations at every call, with one scale per token (row), so an
# outlier token costs only its own row's precision (on CUDA one Triton kernel reads each row once for it). The
# matmul scales the products back and adds the bias; the output is bf16. e4m3 keeps 3 mantissa bits (relative
# rounding error up to 1/16 per element, averaged down over a dot product).
E4M3 = torch.float8_e4m3fn


def fp8_rows(t):
    """t (M, K) -> (t8 (M, K) e4m3, scale (M, 1) fp32) with t ~ t8 * scale; each row's max |t| lands on e4m3's 448."""
    top = torch.finfo(E4M3).max
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    return (t.float() * (top / amax)).clamp(-top, top).to(E4M3), amax / top


if triton is not None:
    @triton.jit
    def _fp8_rows_kernel(x, out, scale, M, K, GELU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """fp8_rows for ROWS rows, each read once: max |x|, then x times 448 / max rounded (to nearest even) to
        e4m3. div_rn divides exactly, as torch does; the two still differ by one code in about 0.1% of values.
        GELU: the rows are first put through the tanh-approximated GELU (in fp32, without a bf16 copy between)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        at = rows.to(tl.int64)[:, None] * K + cols[None, :]
        keep = (rows[:, None] < M) & (cols[None, :] < K)
        v = tl.load(x + at, mask=keep, other=0.0).to(tl.float32)
        if GELU:  # 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))), the tanh one approximate hardware instruction
            # (the codes differ from the exact GELU's in 0.03% of values, by one); sigmoid's exp and division: 1.4x slower
            z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)
            v = 0.5 * v * (1.0 + t)
        top = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12)  # (ROWS,)
        q = tl.clamp(v * tl.math.div_rn(448.0, top)[:, None], -448.0, 448.0)
        tl.store(out + at, q.to(tl.float8e4nv), mask=keep)
        tl.store(scale + rows, tl.math.div_rn(top, 448.0), mask=rows < M)


def _fp8_outputs(x):
    return torch.empty_like(x, dtype=E4M3), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@torch.library.custom_op("opensora::fp8_rows", mutates_args=())
def fp8_rows_cuda(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_rows (of GELU(x) with gelu) as one Triton kernel that reads each row once. Compiled, fp8_rows runs at
    about 1 TB/s (32,768 rows of 4,608: 0.45 ms), and the first fp8 forward of STDiT-XL/2 was no faster than bf16's
    (H200, 96.6 ms vs 97.0)."""
    x = x.contiguous()
    out, scale = _fp8_outputs(x)
    block = triton.next_power_of_2(x.shape[1])
    rows = max(1, 4096 // block)  # tiles of 4,096 values or one row, 64 a thread: faster than 8 warps on 8,192 values
    # (H200, 32,768 rows: 1,152 wide 47.6 -> 33.0 us; 4,608 wide with the GELU 224.0 -> 148.8 us, the tanh included)
    _fp8_rows_kernel[(triton.cdiv(x.shape[0], rows),)](x, out, scale, x.shape[0], x.shape[1], GELU=gelu, ROWS=rows,
                                                       BLOCK=block, num_warps=max(1, rows * block // 2048))
    return out, scale


@fp8_rows_cuda.register_fake
def _(x, gelu=False):
    return _fp8_outputs(x)


def _rows8(x, gelu=False):
    """x (M, K) -> e4m3 rows and scales (of GELU(x) with gelu): the Triton pass on CUDA."""
    if x.is_cuda and triton is not None:
        return fp8_rows_cuda(x, gelu)
    return fp8_rows(F.gelu(x.float(), approximate="tanh") if gelu else x)


def _mm8(a8, a_scale, b8, b_scale, bias=None, fast=False, dtype=torch.bfloat16):
    """(a8 * a_scale) @ (b8 * b_scale).T + bias in dtype (bf16 on CUDA): a8 (M, K) and b8 (N, K) e4m3, scales (M, 1)
    and (N, 1).
    fast: accumulate in the tensor cores' own accumulators (1.7x the bf16 rate at XL's shapes, against 1.4x with
    fp32 promotion; H200): the forward takes it, the input gradient (summed over 4,608 hidden channels) does not."""
    if a8.is_cuda:
        bias = None if bias is None else bias.to(torch.bfloat16)
        return torch._scaled_mm(a8, b8.t(), a_scale, b_scale.t(), bias=bias, out_dtype=torch.bfloat16, use_fast_accum=fast)
    with torch.autocast(a8.device.type, enabled=False):  # the same fp8 values multiplied in fp32
        y = (a8.float() @ b8.float().t()) * a_scale * b_scale.t()
        return (y if bias is None else y + bias.float()).to(dtype)


class Fp8Linear(nn.Module):
    """An nn.Linear for inference whose matmul runs in fp8 (torch._scaled_mm); off CUDA, the same fp8 values are
    multiplied in fp32 (the reference the GPU test compares against). gelu: the input is taken before its GELU,
    which the rounding applies (an MLP's fc2: one pass over the wide hidden rows instead of two)."""

    def __init__(self, linear, gelu=False):
        super().__init__()
        self.gelu = gelu
        w8, scale = fp8_rows(linear.weight.detach().float())  # (out, in), (out, 1)
        self.register_buffer("weight", w8)
        self.register_buffer("scale", scale.T.contiguous())  # (1, out): scales the output's columns
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x):  # (..., in) -> (..., out) in bf16
        rows = x.reshape(-1, x.shape[-1])
        y = _mm8(*_rows8(rows, self.gelu), self.weight, self.scale.t(), bias=self.bias, fast=True)
        return y.view(*x.shape[:-1], -1)


def fp8_fits(linear):
    """fp8 kernels need both sides of a weight to be multiples of 16 (all of XL's are)."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def quantize_fp8(model):
    """Replace the blocks' linears (attention, temporal attention, cross-attention, MLP) by Fp8Linear, in place, for
    sampling only (no gradients). The adaLN linears stay: their rows are the batch, too few to pay. fp8 kernels need
    both sides of a weight to be multiples of 16 (all of XL's are); other linears stay too. The rest of the model
    goes to bf16 first (a later .to(dtype) would cast the fp8 weights too). Returns the count."""
    model.to(torch.bfloat16)
    count = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and "adaLN" not in f"{name}.{child_name}" and fp8_fits(child):
                    fuse = isinstance(module, Mlp) and child_name == "fc2"  # the GELU moves into fc2's rounding
                    setattr(module, child_name, Fp8Linear(child, gelu=fuse))
                    if fuse:
                        module.act = nn.Identity()
                    count += 1
    return count


# FP8 training (train.py --fp8). The blocks' linears multiply in fp8 where Hopper's tensor cores run twice the bf16
# rate: in forward, and for the input gradient in backward. The weight gradient (the sum over all tokens) stays
# bf16, from the bf16 activations a bf16 linear keeps anyway; the fp32 master weights and the optimizer are as
# without. Every fp8 operand has one scale per row of the matmul: per token for activations and output gradients,
# per output channel for the forward's weights, per input channel for the input gradient's. (torchao calls this
# recipe "rowwise with high-precision weight gradient".) One Triton pass per output gradient rounds it and sums
# its columns for the bias gradient; in the MLP that pass also runs the GELU's backward.
if triton is not None:
    @triton.jit
    def _fp8_grad_rows_kernel(grad, h, dh, g, out, scale, colsum, M, K, GELU: tl.constexpr, ROWS: tl.constexpr,
                              TILE: tl.constexpr, BLOCK: tl.constexpr):
        """ROWS rows of grad (M, K), TILE at a time, each read once: rounded to e4m3 with one scale per row, as
        fp8_rows; the rows' column sums into colsum (programs, K). GELU: grad is the gradient at GELU(h): the gradient
        at h is rounded and summed instead, and also written to dh in bf16, next to GELU(h) (g), which the weight
        gradient needs."""
        cols = tl.arange(0, BLOCK)[None, :]
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(0, ROWS, TILE):
            rows = tl.program_id(0) * ROWS + r + tl.arange(0, TILE)[:, None]  # (TILE, 1)
            keep = (cols < K) & (rows < M)
            at = rows.to(tl.int64) * K + cols
            v = tl.load(grad + at, mask=keep, other=0.0).to(tl.float32)
            if GELU:  # d/dx of 0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2 / pi), c = 0.044715
                x = tl.load(h + at, mask=keep, other=0.0).to(tl.float32)
                t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [0.7978845608028654 * (x + 0.044715 * x * x * x)],
                                              dtype=tl.float32, is_pure=True, pack=1)
                tl.store(g + at, (0.5 * x * (1.0 + t)).to(g.dtype.element_ty), mask=keep)
                v = v * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x))
                tl.store(dh + at, v.to(dh.dtype.element_ty), mask=keep)
            acc += tl.sum(v, axis=0)
            top = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12)[:, None]  # (TILE, 1)
            tl.store(out + at, tl.clamp(v * tl.math.div_rn(448.0, top), -448.0, 448.0).to(tl.float8e4nv), mask=keep)
            tl.store(scale + rows, tl.math.div_rn(top, 448.0), mask=rows < M)
        tl.store(colsum + tl.program_id(0) * K + tl.arange(0, BLOCK), acc, mask=tl.arange(0, BLOCK) < K)


GRAD_ROWS = 32  # rows per program of _fp8_grad_rows_kernel: its column sums are (M / 32, K) fp32


def _fp8_grad_outputs(grad, h):
    out, scale = _fp8_outputs(grad)
    like = h if h is not None else grad.new_empty(0)
    return out, scale, grad.new_empty(grad.shape[1], dtype=torch.float32), torch.empty_like(like), torch.empty_like(like)


@torch.library.custom_op("opensora::fp8_grad_rows", mutates_args=())
def fp8_grad_rows_cuda(grad: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor, torch.Tensor]:
    """grad (M, K) -> (e4m3 rows, their scales (M, 1), column sums (K,) fp32, dh, g): see _fp8_grad_rows_kernel. Without
    h, dh and g are empty."""
    grad = grad.contiguous()
    h = None if h is None else h.contiguous()
    out, scale, _, dh, g = _fp8_grad_outputs(grad, h)
    M, K = grad.shape
    programs = triton.cdiv(M, GRAD_ROWS)
    block = triton.next_power_of_2(K)
    partial = grad.new_empty(programs, K, dtype=torch.float32)
    # measured fastest (H200, 49,152 rows): 1 row at a time on 8 warps with the GELU (4,608 wide: 746 us, against
    # 773 us on 16 warps); without it, 2 or 4 rows at a time on 4 warps (3,456 wide: 137 us; 1,152: 61 us, against
    # 180 and 93 us a row at a time on 16 and 4 warps)
    tile, warps = (1, 8) if h is not None else (4 if block <= 2048 else 2, 4)
    _fp8_grad_rows_kernel[(programs,)](grad, grad if h is None else h, dh, g, out, scale, partial, M, K, GELU=h is not None,
                                       ROWS=GRAD_ROWS, TILE=tile, BLOCK=block, num_warps=warps)
    return out, scale, partial.sum(0), dh, g


@fp8_grad_rows_cuda.register_fake
def _(grad, h=None):
    return _fp8_grad_outputs(grad, h)


def gelu_tanh_backward(grad, h):
    """The tanh-approximated GELU's derivative at h times grad, in fp32 (the reference for the Triton pass)."""
    h = h.float()
    t = torch.tanh(0.7978845608028654 * (h + 0.044715 * h**3))
    return grad.float() * (0.5 * (1 + t) + 0.5 * h * (1 - t * t) * 0.7978845608028654 * (1 + 0.134145 * h * h))


def fp8_grad_rows(grad, h=None):
    """fp8_grad_rows_cuda's reference in torch ops (CPUs run it)."""
    if h is None:
        g, dh, v = None, None, grad.float()
    else:
        g = F.gelu(h.float(), approximate="tanh").to(h.dtype)
        v = gelu_tanh_backward(grad, h)
        dh = v.to(h.dtype)
    out, scale = fp8_rows(v)
    return out, scale, v.sum(0), dh, g


def _grad_rows8(grad, h=None):
    if grad.is_cuda and triton is not None:
        return fp8_grad_rows_cuda(grad, h)
    return fp8_grad_rows(grad, h)


def fp8_weight(weight, transpose=False):
    """A weight (N, K) in e4m3 for the forward (scales per output channel) or, transposed (K, N), for the input
    gradient (scales per input channel: _scaled_mm scales rows of each operand, not along the summed axis)."""
    return _rows8((weight.t() if transpose else weight).contiguous())


def _working_dtype(x):
    """bf16 on CUDA (what the fp8 kernels write and the bf16 weight gradient reads); CPUs keep x's dtype (their bf16
    matmuls are slow: the fp32 demo stays fp32 but for the fp8 rounding)."""
    return torch.bfloat16 if x.is_cuda else x.dtype


def fp8_forward(x, weight8, bias=None):
    """x (M, K) rows through an fp8 linear, weight8 = fp8_weight(weight): bf16 on CUDA, x's dtype on CPUs."""
    return _mm8(*_rows8(x), *weight8, bias=bias, fast=True, dtype=x.dtype)


def fp8_input_grad(grad, weight8, dtype):
    """The input gradient (M, K) of an fp8 linear, from output-gradient rows grad (M, N) and
    weight8 = fp8_weight(weight, transpose=True) (bf16 on CUDA, dtype on CPUs); also the bias gradient (N,) fp32
    that the rounding pass sums."""
    grad8, scale, bias_grad, _, _ = _grad_rows8(grad)
    return _mm8(grad8, scale, *weight8, dtype=dtype), bias_grad


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b for x (M, K) rows: forward and the input gradient in fp8, the weight and bias gradients from x
    and the output gradient in bf16 (returned in the weights' dtype: fp32 ones under autocast too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, *weight8s):
        """weight8s, where the caller has them: fp8_weight(weight) and fp8_weight(weight, transpose=True), as four
        tensors (FastSeq rounds the whole qkv weight, as one process does, and passes its heads' rows)."""
        x = x.to(_working_dtype(x))
        ctx.save_for_backward(x, weight, *weight8s[2:])
        ctx.has_bias, ctx.given = bias is not None, len(weight8s)
        return fp8_forward(x, weight8s[:2] or fp8_weight(weight), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *weight8_t = ctx.saved_tensors
        dx, bias_grad = fp8_input_grad(grad, weight8_t or fp8_weight(weight, transpose=True), x.dtype)
        return (dx, (grad.t().to(x.dtype) @ x).to(weight.dtype), bias_grad.to(weight.dtype) if ctx.has_bias else None,
                *[None] * ctx.given)


class _Fp8Mlp(torch.autograd.Function):
    """fc2(GELU(fc1(x))) for x (M, D) rows, each linear as in _Fp8Linear; the GELU runs inside the passes that round
    fc2's input (forward) and fc1's output gradient (backward), so the wide hidden rows are read once each way."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x = x.to(_working_dtype(x))
        h = fp8_forward(x, fp8_weight(w1), b1)  # (M, 4D) before the GELU
        ctx.save_for_backward(x, h, w1, w2)
        return _mm8(*_rows8(h, gelu=True), *fp8_weight(w2), bias=b2, fast=True, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, h, w1, w2 = ctx.saved_tensors
        dg, b2_grad = fp8_input_grad(grad, fp8_weight(w2, transpose=True), x.dtype)  # at GELU(h)
        dh8, dh_scale, b1_grad, dh, g = _grad_rows8(dg, h)  # at h; and GELU(h) again, for fc2's weight gradient
        dx = _mm8(dh8, dh_scale, *fp8_weight(w1, transpose=True), dtype=x.dtype)
        w1_grad, w2_grad = dh.t() @ x, grad.t().to(g.dtype) @ g
        return dx, w1_grad.to(w1.dtype), b1_grad.to(w1.dtype), w2_grad.to(w2.dtype), b2_grad.to(w2.dtype)


def _as_rows(fn, x, *args):
    y = fn(x.reshape(-1, x.shape[-1]), *args)
    return y.view(*x.shape[:-1], y.shape[-1])


def fp8_linear(x, weight, bias=None, *weight8s):
    """F.linear(x, weight, bias) for x (..., K) with the matmuls of _Fp8Linear (weight8s: see its forward)."""
    return _as_rows(_Fp8Linear.apply, x, weight, bias, *weight8s)


class Fp8TrainLinear(nn.Linear):
    """An nn.Linear (same parameters, same checkpoint keys) whose matmuls run as _Fp8Linear."""

    def forward(self, x):
        return fp8_linear(x, self.weight, self.bias)


def enable_fp8_training(model):
    """Train the blocks' linears (attention, temporal attention, cross-attention, MLP) in fp8, in place: each MLP runs
    as one _Fp8Mlp, the other linears become Fp8TrainLinear. The adaLN linears stay (their rows are the batch, too few
    to pay), as do linears whose sides are not multiples of 16. Parameters and state-dict keys do not change.
    Returns the count of linears."""
    count = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, Mlp) and fp8_fits(module.fc1) and fp8_fits(module.fc2):
                module.fp8 = True
                count += 2
                continue
            if isinstance(module, Mlp) or "adaLN" in name:
                continue
            for child_name, child in module.named_children():
                if type(child) is nn.Linear and "adaLN" not in child_name and fp8_fits(child):
                    child.__class__ = Fp8TrainLinear  # the same module, its forward swapped
                    count += 1
    return count


class PatchEmbed(nn.Module):
    """Cuts (B, C, T, H, W) into patches and projects each to D: Conv2d per frame for DiT (the published
    DiT key has a 2D kernel), Conv3d for STDiT (patch (1, 2, 2) in Open-Sora v1.0)."""

    def __init__(self, patch, in_channels, dim):
        super().__init__()
        self.patch = patch
        if len(patch) == 2:
            self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        else:
            self.proj = nn.Conv3d(in_channels, dim, patch, stride=patch)

    def forward(self, x):  # (B, C, T, H, W) -> (B, T, S, D), D contiguous
        B = x.shape[0]
        if self.proj.weight.dim() == 4:
            x = rearrange(self.proj(rearrange(x, "B C T H W -> (B T) C H W")), "(B T) D H W -> B T (H W) D", B=B)
        else:
            x = rearrange(self.proj(x), "B D T H W -> B T (H W) D")
        # The conv's output is channel-first: as a view, D would sit T*S elements apart. Every elementwise op
        # keeps its input's layout, so the blocks' residual stream would inherit it and each LayerNorm would read
        # its row with that stride (measured: 6x slower on an H100). One copy here puts tokens in rows.
        return x.contiguous()


class TimestepEmbedder(nn.Module):
    """Diffusion step -> 256 sinusoidal frequencies -> MLP -> D (DiT's embedder)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) -> (B, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as in DiT's checkpoints
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> one condition token. Row `num_classes` is the learned null class for
    classifier-free guidance (DiT drops labels with probability 0.1)."""

    def __init__(self, num_classes, dim, dropout):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + (dropout > 0), dim)

    def forward(self, labels, mask, drop):  # labels (B,) -> tokens (B, 1, D), mask None (always valid)
        labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None], None


class CaptionEmbedder(nn.Module):
    """Text-token states (B, L, C_text) -> (B, L, D) through an MLP (PixArt-alpha). A dropped caption is
    replaced by a null caption of L tokens, all valid. STDiT keeps it as a fixed random buffer, as
    Open-Sora v1.0 does (so its checkpoint key is a buffer); DiT's text variants learn it."""

    def __init__(self, caption_channels, dim, length, dropout, learn_null):
        super().__init__()
        self.dropout = dropout
        self.y_proj = Mlp(caption_channels, dim, dim)
        null = torch.randn(length, caption_channels) / caption_channels**0.5
        if learn_null:
            self.y_embedding = nn.Parameter(null)
        else:
            self.register_buffer("y_embedding", null)

    def forward(self, y, mask, drop):  # y (B, L, C_text), mask (B, L) or None, drop (B,)
        if y.shape[1:] != self.y_embedding.shape:
            raise ValueError(f"caption states have shape {tuple(y.shape[1:])} but the model expects "
                             f"{tuple(self.y_embedding.shape)}: set caption_len/caption_channels to the text encoder's")
        y = torch.where(drop[:, None, None], self.y_embedding.to(y.dtype), y)
        if mask is not None:
            mask = mask.bool() | drop[:, None]
        return self.y_proj(y), mask


class DiTBlock(nn.Module):
    """adaLN-zero block: modulated self-attention and MLP, each gated; optional cross-attention."""
    selective_checkpoint = True  # checkpointed: keep the attention outputs (checkpoint_block)

    def __init__(self, dim, heads, mlp_ratio, cross, impl):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # eps 1e-6 as in DiT
        self.attn = Attention(dim, heads, impl)
        self.cross_attn = CrossAttention(dim, heads, impl) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, y=None, y_mask=None, x_mask=None, recompute=False):  # x (B, N, D), c (B, D), y (B, L, D)
        if recompute:
            return checkpoint_block(self.forward, x, c, y, y_mask, x_mask)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), x_mask)
        if self.cross_attn is not None:  # ungated, like PixArt; its zero-initialised proj starts it at 0
            x = x + self.cross_attn(x, y, y_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class STDiTBlock(nn.Module):
    """Open-Sora v1.0 block on x (B, T, S, D); the block order follows SPEC.md step by step."""
    selective_checkpoint = True  # checkpointed: keep the attention outputs (checkpoint_block)

    def __init__(self, dim, heads, mlp_ratio, impl):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, impl)
        self.cross_attn = CrossAttention(dim, heads, impl)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # adaLN-single (PixArt-alpha): one t_block shared by all blocks, plus this per-block learned table
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn_temp = TemporalAttention(dim, heads, impl)

    def forward(self, x, t0, y, y_mask=None, tpe=None, recompute=False):  # x (B, T, S, D), t0 (B, 6D), y (B, L, D), tpe (1, T, D)
        if recompute:
            return checkpoint_block(self.forward, x, t0, y, y_mask, tpe)
        B, T, S, D = x.shape
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, D)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, None, None].unbind(1)  # (B, 1, 1, D)
        # 1. spatial self-attention inside each frame
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        h = self.attn(rearrange(h, "B T S D -> (B T) S D"))
        x = x + gate_msa * rearrange(h, "(B T) S D -> B T S D", B=B)
        # 2. temporal self-attention along each spatial position, on the un-normalised, un-modulated x;
        #    the temporal position embedding enters block 0's attention input only
        h = self.attn_temp(x if tpe is None else x + tpe[:, :, None])
        # the spatial gate is reused here: a quirk of Open-Sora v1.0, reproduced on purpose for its checkpoints
        x = x + gate_msa * h
        # 3. cross-attention to the caption tokens: no norm, no gate
        x = x + self.cross_attn(rearrange(x, "B T S D -> B (T S) D"), y, y_mask).view(B, T, S, D)
        # 4. modulated, gated MLP
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LN, modulate, Linear to p_t*p_h*p_w*C_out values per token. DiT computes shift and scale from c
    through adaLN_modulation; STDiT (T2IFinalLayer) adds t to a learned (2, D) table."""

    def __init__(self, dim, patch_volume, out_channels, adaln_single):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_volume * out_channels)
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):  # x (B, N, D), c (B, D)
        if hasattr(self, "scale_shift_table"):
            shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        else:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class ModelConfig:
    """The architecture. Saved into every checkpoint, so sample.py rebuilds the model from it alone."""
    arch: str = "stdit"            # "dit" (full attention) or "stdit" (spatial + temporal attention)
    depth: int = 28
    hidden: int = 1152
    heads: int = 16
    patch: tuple = (1, 2, 2)       # (p_t, p_h, p_w); DiT's patch is always (1, p, p)
    mlp_ratio: float = 4.0
    in_channels: int = 4           # SD-VAE latents
    learn_sigma: bool = True       # predict the IDDPM variance interpolation too: out channels = 2 x in
    cond: str = "cross"            # DiT: adaln | cross | concat; STDiT: cross (its only structure)
    num_classes: int = 0           # > 0: class labels; 0: text-token states
    caption_channels: int = 4096   # T5-v1.1-XXL's d_model
    caption_len: int = 120         # T5 tokens per caption in PixArt-alpha and Open-Sora
    dropout: float = 0.1           # condition dropout for classifier-free guidance
    space_scale: float = 1.0       # positions are divided by these (Open-Sora v1.0 uses 0.5 at 256px)
    time_scale: float = 1.0
    attn: str = "auto"             # attention implementation: auto | flash | sdpa | math
    grad_checkpoint: float = 0.0   # share of the blocks (the first ones) that recompute their activations in
                                   # backward to save memory: 0 none, 1 (or True) all, 0.5 half

    def __post_init__(self):
        self.patch = tuple(self.patch)
        if self.arch not in ("dit", "stdit"):
            raise ValueError(f"unknown arch {self.arch!r}: use 'dit' or 'stdit'")
        if self.cond not in ("adaln", "cross", "concat") or (self.arch == "stdit" and self.cond != "cross"):
            raise ValueError(f"cond {self.cond!r} is not available for {self.arch}: DiT takes adaln|cross|concat, STDiT only cross")
        if self.arch == "stdit" and self.num_classes:
            raise ValueError("STDiT is text-conditioned: set num_classes=0 and give caption states")
        if self.attn not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attn!r}: use one of {ATTENTION_IMPLS}")
        if self.attn == "flash" and flash_attn_func is None and not FLASH4:
            raise ValueError("attn='flash' needs the flash-attn package (flash-attn-4 on Hopper): install it or use attn='sdpa'")
        if self.arch == "dit" and self.patch[0] != 1:
            raise ValueError(f"DiT patches frames one by one: use patch (1, p, p), not {self.patch}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if not 0 <= float(self.grad_checkpoint) <= 1:
            raise ValueError(f"grad_checkpoint {self.grad_checkpoint} is not a share of the blocks: use a number from 0 to 1")
        self.grad_checkpoint = float(self.grad_checkpoint)  # True -> 1.0, as older checkpoints store it


class DiffusionTransformer(nn.Module):
    """What DiT and STDiT share: embedders, patchify/unpatchify, position embeddings, the forward skeleton."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg.patch[1:] if cfg.arch == "dit" else cfg.patch, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        if cfg.num_classes:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.dropout)
        else:
            self.y_embedder = CaptionEmbedder(cfg.caption_channels, D, cfg.caption_len, cfg.dropout, learn_null=cfg.arch == "dit")

    def grid(self, x):
        """Token grid (T/p_t, H/p_h, W/p_w) of latents x (B, C, T, H, W), read from its shape."""
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected latents (B, {self.cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        return self.token_grid(x.shape[2:])

    def token_grid(self, latent_shape):
        """Token grid for latents of shape (T, H, W), or one sentence where the patch does not tile them (train.py
        and sample.py ask before they start, the forward at every call)."""
        if any(n % p for n, p in zip(latent_shape, self.cfg.patch)):
            raise ValueError(f"latent size (T, H, W) = {tuple(latent_shape)} is not divisible by the patch "
                             f"{self.cfg.patch}: crop or resize the video to a size whose latents are multiples of it")
        return tuple(n // p for n, p in zip(latent_shape, self.cfg.patch))

    def unpatchify(self, x, grid):  # (B, N, p_t*p_h*p_w*C_out) -> (B, C_out, T, H, W)
        (T, H, W), (pt, ph, pw) = grid, self.cfg.patch
        return rearrange(x, "B (T H W) (pt ph pw C) -> B C (T pt) (H ph) (W pw)", T=T, H=H, W=W, pt=pt, ph=ph, pw=pw)

    def embed_condition(self, y, mask, force_drop):
        """Condition tokens (B, L, D) and their mask; drops conditions for classifier-free guidance:
        at random with probability cfg.dropout while training, and wherever force_drop is True."""
        B = y.shape[0]
        drop = torch.zeros(B, dtype=torch.bool, device=y.device) if force_drop is None else force_drop.bool()
        if self.training and self.cfg.dropout > 0:
            drop = drop | (torch.rand(B, device=y.device) < self.cfg.dropout)
        return self.y_embedder(y, mask, drop)

    def run_block(self, i, *args):
        """Block i; the first grad_checkpoint x depth blocks keep only their inputs and attention outputs (blocks
        without selective_checkpoint: only their inputs) for backward and recompute the rest there. Memory left
        over pays best as un-checkpointed blocks."""
        block = self.blocks[i]
        recompute = i < round(self.cfg.grad_checkpoint * len(self.blocks)) and self.training and torch.is_grad_enabled()
        if recompute and not block.selective_checkpoint:  # the whole block, around its compiled forward
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args, recompute=recompute)

    def initialize_weights(self):
        # xavier-uniform linears with zero biases, the patch conv like a linear (DiT, PixArt-alpha)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.cfg.hidden, -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cfg.num_classes:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # The caption MLP keeps the xavier init above. PixArt-alpha and Open-Sora draw it from N(0, 0.02),
        # which xavier matches at XL widths (4096 -> 1152: std 0.019) but which shrinks the captions of
        # narrow models (384 -> 128) ten-fold, so small models barely learn to read them.
        # zero-initialised output: the model starts by predicting 0, and every new branch starts closed
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for block in self.blocks:
            if getattr(block, "cross_attn", None) is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)


class DiT(DiffusionTransformer):
    """Full self-attention over all N = T*S tokens (DiT; OpenDiT's video DiT when T > 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.cond == "cross", cfg.attn)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden, math.prod(cfg.patch), self.out_channels, adaln_single=False)
        self.initialize_weights()
        for block in self.blocks:  # adaLN-zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)

    def forward(self, x, t, y, mask=None, force_drop=None):
        """x (B, C, T, H, W) latents, t (B,) steps, y labels (B,) or caption states (B, L, C_text),
        mask (B, L) bool, force_drop (B,) bool: use the null condition. Returns (B, C_out, T, H, W)."""
        grid = self.grid(x)
        x = self.x_embedder(x)  # (B, T, S, D)
        x = x + pos_embed_3d(self.cfg.hidden, grid, self.cfg.space_scale, self.cfg.time_scale, x.device).to(x.dtype)
        x = rearrange(x, "B T S D -> B (T S) D")
        c = self.t_embedder(t)  # (B, D)
        y, y_mask = self.embed_condition(y, mask, force_drop)  # (B, L, D), (B, L) or None
        x_mask, L = None, y.shape[1]
        if self.cfg.cond == "adaln":  # pooled condition: the mean over the valid condition tokens
            w = torch.ones(y.shape[:2], device=y.device) if y_mask is None else y_mask.to(y.dtype)
            c = c + (y * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        elif self.cfg.cond == "concat":  # in-context: condition tokens first, one self-attention over both
            x = torch.cat([y, x], dim=1)  # (B, L+N, D)
            if y_mask is not None:
                x_mask = F.pad(y_mask, (0, x.shape[1] - L), value=True)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, c, y, y_mask, x_mask)
        if self.cfg.cond == "concat":
            x = x[:, L:]  # drop the condition tokens before the final layer
        return self.unpatchify(self.final_layer(x, c), grid)


class STDiT(DiffusionTransformer):
    """Open-Sora v1.0's spatial-temporal DiT, text-conditioned through cross-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        D = cfg.hidden
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single, shared by all blocks
        self.blocks = nn.ModuleList(STDiTBlock(D, cfg.heads, cfg.mlp_ratio, cfg.attn) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, math.prod(cfg.patch), self.out_channels, adaln_single=True)
        self.initialize_weights()
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in self.blocks:  # temporal branches start closed: an image checkpoint keeps its behaviour
            nn.init.zeros_(block.attn_temp.proj.weight)
            nn.init.zeros_(block.attn_temp.proj.bias)

    def forward(self, x, t, y, mask=None, force_drop=None):
        """x (B, C, T, H, W), t (B,), y caption states (B, L, C_text), mask (B, L) bool, force_drop (B,) bool."""
        T, H, W = grid = self.grid(x)
        x = self.x_embedder(x)  # (B, T, S, D)
        x = x + pos_embed_2d(self.cfg.hidden, H, W, self.cfg.space_scale, x.device).to(x.dtype)
        tpe = pos_embed_1d(self.cfg.hidden, T, self.cfg.time_scale, x.device).to(x.dtype)[None]  # (1, T, D)
        t = self.t_embedder(t)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        y, y_mask = self.embed_condition(y, mask, force_drop)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, t0, y, y_mask, tpe if i == 0 else None)
        x = self.final_layer(rearrange(x, "B T S D -> B (T S) D"), t)  # the final layer takes t, not t0
        return self.unpatchify(x, grid)


def pos_embed_1d(dim, n, scale=1.0, device=None):
    """(n, dim) sin-cos embedding of positions 0..n-1 divided by scale: sines in the first half."""
    pos = torch.arange(n, device=device, dtype=torch.float32) / scale
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=device, dtype=torch.float32) / (dim / 2))
    out = pos[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def pos_embed_2d(dim, h, w, scale=1.0, device=None):
    """(h*w, dim) for a row-major h x w grid. As in DiT's and Open-Sora's tables, the first half encodes
    the column and the second half the row, so published checkpoints see the positions they were trained on."""
    col = pos_embed_1d(dim // 2, w, scale, device)[None].expand(h, w, -1)
    row = pos_embed_1d(dim // 2, h, scale, device)[:, None].expand(h, w, -1)
    return torch.cat([col, row], dim=-1).reshape(h * w, dim)


def pos_embed_3d(dim, grid, space_scale=1.0, time_scale=1.0, device=None):
    """(T, S, dim) for DiT over video: the 2D table plus a temporal table taken relative to frame 0, so an
    image (T = 1) gets exactly the published 2D embedding."""
    T, H, W = grid
    temporal = pos_embed_1d(dim, T, time_scale, device)
    temporal = temporal - temporal[:1]
    return pos_embed_2d(dim, H, W, space_scale, device)[None] + temporal[:, None]


def load_checkpoint(model, path):
    """Load a published DiT / Open-Sora v1.0 checkpoint or one of ours (.pt/.pth/.safetensors) into model.
    Never unpickles code. Fixed position tables are dropped: ours are computed for any grid."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, corrupt, not a checkpoint, or pickled objects (which weights_only refuses)
        raise ValueError(f"{path} cannot be read as weights ({type(e).__name__}): pass a .pt, .pth or .safetensors file "
                         "of tensors (torch.load runs with weights_only=True: pickled objects are refused)") from e
    for wrapper in ("ema", "model", "state_dict", "module"):  # the containers training scripts use
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in ("pos_embed", "pos_embed_temporal")}
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit this model ({len(missing)} missing keys e.g. {missing[:3]}, "
                         f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, {len(wrong)} shape mismatches e.g. {wrong[:2]}): "
                         "choose the preset and conditioning the checkpoint was trained with")
    model.load_state_dict(state)
    return model


# Presets. DiT sizes from the DiT paper (Table 1): S, B, L, XL with patch 2, 4 or 8.
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DiT_models = {f"DiT-{size}/{p}": dict(arch="dit", depth=d, hidden=D, heads=h, patch=(1, p, p))
              for size, (d, D, h) in _DIT_SIZES.items() for p in (2, 4, 8)}
DiT_models["DiT-demo"] = dict(arch="dit", depth=4, hidden=128, heads=4, patch=(1, 4, 4))  # the CPU demo's size
DiT_models["DiT-debug"] = dict(arch="dit", depth=2, hidden=64, heads=4, patch=(1, 2, 2))
# STDiT-XL/2 is Open-Sora v1.0's; S and B reuse DiT's widths for small runs.
STDiT_models = {f"STDiT-{size}/{p}": dict(arch="stdit", depth=d, hidden=D, heads=h, patch=(1, p, p))
                for size, (d, D, h) in _DIT_SIZES.items() if size != "L" for p in (2, 4)}
STDiT_models["STDiT-demo"] = dict(arch="stdit", depth=4, hidden=128, heads=4, patch=(1, 4, 4))  # CPU demo: minutes on 2 cores
STDiT_models["STDiT-debug"] = dict(arch="stdit", depth=2, hidden=64, heads=4, patch=(1, 2, 2))
PRESETS = {**DiT_models, **STDiT_models}


def build_model(name, **overrides):
    """A preset by name, with ModelConfig fields overridden, e.g. build_model("DiT-XL/2", num_classes=1000, cond="adaln")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}")
    cfg = ModelConfig(**{**PRESETS[name], **overrides})
    return (DiT if cfg.arch == "dit" else STDiT)(cfg)


def model_from_config(config: dict):
    """Rebuild a model from the asdict(ModelConfig) stored in a checkpoint."""
    cfg = ModelConfig(**config)
    return (DiT if cfg.arch == "dit" else STDiT)(cfg)


def config_dict(model):
    return asdict(model.cfg)
