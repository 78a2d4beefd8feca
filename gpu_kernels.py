"""
GPU kernels behind model.py's seams, dispatched by name from inside them (the way nanochat's model calls its
flash_attention module): model.py imports this file and its seams call the functions below by name, handing
over model.py's own code as `reference`, which runs on CPUs and wherever no kernel here pays. Nothing here
wraps or patches the model. This file imports no project file.

model.py writes attention twice, as the reference: torch's SDPA and the plain formula; and each branch's
LayerNorm + modulate in plain PyTorch. Everything here is an optional speed path that gives the same outputs
(test_all.py checks each one against model.py's code). What is here, and where model.py calls it:

  auto policy  - `attention(q, k, v, mask, impl, reference)` picks a kernel by the shapes; constants below say
                 why. Called by model.attention, the attention seam, for impl "auto" and "flash"
  flash-attn   - version 4 (CuTe DSL kernels compiled at run time: Hopper and newer) and version 2, as
                 custom ops so that compiled and checkpointed blocks call them as they are; `flash_version()`,
                 which ModelConfig asks when attn="flash"
  efficient    - SDPA's memory-efficient kernel on rows of queries, for cross-attention to few caption tokens
  frame kernel - STDiT's temporal attention as one Triton kernel that reads q, k, v where the projection
                 wrote them: model.TemporalAttention calls `frame_kernel_fits` and `frame_attention` itself,
                 beside the attention seam (the kernel takes the qkv projection's (B, T, S, 3D) output whole)
  short kernels - self-attention over few tokens (DiT images, STDiT's spatial attention at 256 tokens) in
                 training as Triton kernels that read q, k, v where the projection wrote them and write dqkv
                 there, head size 72 as 64 + 16 columns: model.Attention calls `short_kernel_fits` and
                 `short_attention` itself, beside the seam (SHORT_ATTENTION)
  adaLN norms  - LayerNorm + modulate, and the residual add before it, as Triton kernels forward and backward:
                 `norm_modulate`, `add_norm_modulate`, called by model.py's seams of the same names; twins that
                 write e4m3 rows for fp8 sampling
  checkpoint   - `keep_attention`: the ops whose outputs a checkpointed block keeps (model.checkpoint_block)

It exports its ops for fp8.py, which imports it: fp8's sampling compiler pass takes the norm ops it rewrites,
and their e4m3 twins, from E4M3_TWINS by reference.
Nothing outside this file changes its settings by writing its globals: `override(...)` is the one way in,
for tests (`with gpu_kernels.override(short_keys=10): ...`) and bench.py --no-flash-attn / --no-fused-norm.
Shape letters as in model.py: B batch, N queries, M keys, h heads, d head size, T frames, S tokens a frame.
Measurements behind the constants: docs/LOG.md.
"""
import importlib.util
import logging
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy

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

# The auto policy's settings (change them only through override()).
FLASH_ATTN = True  # False: behave as if no flash-attn were installed (bench.py --no-flash-attn)
FUSED_NORM = True  # False: adaLN's LayerNorm and modulate as model.py writes them (bench.py --no-fused-norm)
# True: self-attention over up to SHORT_SELF_KEYS tokens in training runs the Triton kernels below (short_attention):
# DiT-XL/2 images 1.2% and STDiT-XL/2 16x256 0.7% faster on an H100 (docs/LOG.md); bench.py --no-short-attn
SHORT_ATTENTION = True
# up to this many keys: fwd + bwd 18% under cuDNN's at 256 tokens (H100), 11% over it at 1,024
SHORT_SELF_KEYS = 256
SHORT_KEYS = 128  # up to this many keys, the flash and cuDNN kernels' key tiles (64-128) are mostly empty
# flash-attn 4 from this many keys on, where it pays: DiT-XL/2's steps were 9-23% shorter with it at 4,096+ keys,
# no shorter at 1,024 or fewer (H200; docs/LOG.md, "flash-attn 4")
FLASH4_KEYS = 2048
QUERY_ROWS = 1024  # "efficient": at most this many queries per batch row
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # "cudnn"; MATH on CPUs


@contextmanager
def override(**settings):
    """Change the auto policy's settings inside a with block, restored at its end: flash_attn (bool), fused_norm
    (bool), short_attention (bool), short_keys, flash4_keys, query_rows. For tests (small tensors that should take the
    long-sequence paths) and for bench.py's --no-flash-attn, --no-fused-norm and --no-short-attn; the one way to change
    this module's behaviour from outside."""
    names = {name: name.upper() for name in settings}
    known = ("FLASH_ATTN", "FUSED_NORM", "SHORT_ATTENTION", "SHORT_KEYS", "FLASH4_KEYS", "QUERY_ROWS")
    unknown = [name for name, upper in names.items() if upper not in known]
    if unknown:
        raise ValueError(f"gpu_kernels.override takes {', '.join(k.lower() for k in known)}, not {', '.join(unknown)}")
    saved = {upper: globals()[upper] for upper in names.values()}
    globals().update({names[name]: value for name, value in settings.items()})
    try:
        yield
    finally:
        globals().update(saved)


def flash_version():
    """"4", "2" or None: the flash-attn installed here (as the policy sees it; bench.py reports it)."""
    if not FLASH_ATTN:
        return None
    return "4" if FLASH4 else "2" if flash_attn_func is not None else None


def attention(q, k, v, mask, impl, reference):
    """Attention by the fastest path for these shapes. q (B, N, h, d), k and v (B, M, h, d), mask (B, M) bool.

    impl "auto" picks by the shapes, as measured fastest on an H100 (docs/LOG.md, "Attention policy"):
      many queries, few keys (cross-attention to L = 120 caption tokens): efficient when training, whose
        backward is the cheapest; cudnn without gradients (sampling), whose forward takes half the time;
      few queries and few keys inside torch.compile (STDiT's temporal attention where the frame kernel does not
        run): math, which the compiler fuses (2x faster there than any SDPA kernel, whose tiles would be mostly
        empty);
      otherwise flash-attn when it runs here and nothing is masked (version 4 only over FLASH4_KEYS keys and with
        gradients: in sampling its padded heads were slower than cuDNN), else sdpa.
    impl "flash": flash-attn by name (version 4 where it runs, else 2); masked attention goes to sdpa.
    reference(q, k, v, mask, "sdpa" | "math") is model.py's own attention, which the paths here fall back to."""
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
    if impl == "flash":
        impl = "flash4" if flash4_runs(q) else "flash2"
    if impl == "flash4":
        return flash4(q, k, v)
    if impl == "flash2":
        if flash_attn_func is None or not FLASH_ATTN:
            raise ValueError("attn='flash' here needs flash-attn 2 (flash-attn 4 runs on Hopper and newer GPUs in half precision): use attn='sdpa'")
        return flash_attn_func(q, k, v)
    if impl == "efficient":
        return efficient_attention(q, k, v, mask)
    if impl == "cudnn":  # SDPA with the cuDNN kernel first (half precision on CUDA)
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            return reference(q, k, v, mask, "sdpa")
    return reference(q, k, v, mask, impl)


@torch.compiler.assume_constant_result
def hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def half_on_gpu(q):  # what flash-attn takes
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash4_runs(q):
    """flash-attn 4 trains on Hopper (compute capability 9) and newer."""
    return FLASH4 and FLASH_ATTN and half_on_gpu(q) and hopper_or_newer(q.device.index)


def flash2_runs(q):
    return flash_attn_func is not None and FLASH_ATTN and half_on_gpu(q)


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


def flash4_module():
    """flash_attn.cute, imported at first use. Found but failing to import (a dependency missing) is an error:
    falling back to SDPA there would hide a broken install behind slower steps."""
    try:
        import flash_attn.cute
    except ImportError as e:
        raise RuntimeError(f"flash-attn 4 is installed but does not import ({e}): reinstall it with "
                           f"pip install \"flash-attn-4[cu13]\", or uninstall it to run SDPA") from e
    return flash_attn.cute


# As custom ops, a compiled block calls the kernels as they are (torch.compile does not trace into them) and a
# checkpointed block can keep their outputs (keep_attention).
@torch.library.custom_op("opensora::flash4_attention", mutates_args=())
def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the output (B, N, h, d) and the log-sum-exp of each query's scores (B, h, N), fp32."""
    out, lse = flash4_module().flash_attn_func(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse


@flash4_attention.register_fake
def _(q, k, v, scale):
    B, N, h, _ = q.shape
    return q.new_empty(B, N, h, v.shape[-1]), q.new_empty(B, h, N, dtype=torch.float32)


@torch.library.custom_op("opensora::flash4_attention_backward", mutates_args=())
def flash4_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flash4_module()  # the backward of flash_attn.cute.flash_attn_func:
    from flash_attn.cute.interface import _flash_attn_bwd
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
    over 120 caption tokens that is B*h blocks, 32 for two videos, a quarter of an H100's SMs; folding queries
    into rows fills them (STDiT-XL/2 64x512 trained 10% faster; docs/LOG.md, "Cross-attention to the caption").
    Each row gets its own keys."""
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
# matmuls run far from peak (12% of a sampling forward of STDiT-XL/2 16x256 on an H100; docs/LOG.md, "Frame kernel").
# The kernel reads q, k and v where the qkv projection wrote them and writes the output in (B, T, S, D):
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


def short_kernel_fits(qkv, heads, impl):
    """Whether Attention runs the short kernels on qkv (B, N, 3D): CUDA, impl auto, SHORT_ATTENTION, training
    (their forward alone is slower than cuDNN's: sampling keeps SDPA), half precision, N <= SHORT_SELF_KEYS, head
    sizes 65 to 80 (XL's 72: a 64-column and a 16-column tile)."""
    d = qkv.shape[-1] // 3 // heads
    return (triton is not None and SHORT_ATTENTION and impl == "auto" and qkv.is_cuda and torch.is_grad_enabled()
            and qkv.dim() == 3 and qkv.dtype in (torch.bfloat16, torch.float16) and qkv.shape[1] <= SHORT_SELF_KEYS
            and 64 < d <= 80)


if triton is not None:
    @triton.jit
    def _short_load(ptr, tok, valid, col0, HEAD_DIM: tl.constexpr):
        """One head's columns col0 .. col0 + HEAD_DIM of the rows at offsets tok: a (rows, 64) and a (rows, 16) tile."""
        lo = tl.arange(0, 64)[None, :]
        hi = 64 + tl.arange(0, 16)[None, :]
        a = tl.load(ptr + tok[:, None] + col0 + lo, mask=valid[:, None], other=0.0)
        b = tl.load(ptr + tok[:, None] + col0 + hi, mask=valid[:, None] & (hi < HEAD_DIM), other=0.0)
        return a, b

    @triton.jit
    def _short_store(ptr, tok, valid, col0, a, b, HEAD_DIM: tl.constexpr):
        lo = tl.arange(0, 64)[None, :]
        hi = 64 + tl.arange(0, 16)[None, :]
        tl.store(ptr + tok[:, None] + col0 + lo, a.to(ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(ptr + tok[:, None] + col0 + hi, b.to(ptr.dtype.element_ty), mask=valid[:, None] & (hi < HEAD_DIM))

    @triton.jit
    def _short_keys(qkv, b, h, cols, N, D, HEAD_DIM: tl.constexpr):
        """k and v of one (b, head) at key positions cols (64- and 16-column tiles each), and those rows' offsets."""
        tok = (b * N + cols).to(tl.int64) * 3 * D
        ka, kb = _short_load(qkv, tok, cols < N, D + h * HEAD_DIM, HEAD_DIM)
        va, vb = _short_load(qkv, tok, cols < N, 2 * D + h * HEAD_DIM, HEAD_DIM)
        return tok, ka, kb, va, vb

    @triton.jit
    def _short_scores(qa, qb, ka, kb, scale):  # q k^T in log2 units (exp2 below), (BM, BN) fp32
        return (tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))) * (scale * 1.4426950408889634)

    @triton.jit
    def _short_query_rows(qkv, grad, lse, rowsum, b, h, bh, rows, N, D, HEAD_DIM: tl.constexpr):
        """The backward's inputs for rows of one (b, head): q, the output's gradient, log-sum-exp, row sums."""
        qa, qb = _short_load(qkv, (b * N + rows).to(tl.int64) * 3 * D, rows < N, h * HEAD_DIM, HEAD_DIM)
        ga, gb = _short_load(grad, (b * N + rows).to(tl.int64) * D, rows < N, h * HEAD_DIM, HEAD_DIM)
        row_lse = tl.load(lse + bh * N + rows, mask=rows < N, other=0.0)
        row_sum = tl.load(rowsum + bh * N + rows, mask=rows < N, other=0.0)
        return qa, qb, ga, gb, row_lse, row_sum

    @triton.jit
    def _short_probs_grads(qa, qb, ka, kb, va, vb, ga, gb, row_lse, row_sum, scale, valid):
        """The backward's tile: the probabilities p (recomputed from the forward's log-sum-exp) and the scores'
        gradient p * (grad v^T - sum(grad * out)), both zero outside valid (BM, BN), fp32."""
        p = tl.where(valid, tl.exp2(_short_scores(qa, qb, ka, kb, scale) - row_lse[:, None]), 0.0)
        dp = tl.dot(ga, tl.trans(va)) + tl.dot(gb, tl.trans(vb))
        return p, p * (dp - row_sum[:, None])

    @triton.jit
    def _short_fwd(qkv, out, lse, N: tl.constexpr, heads, scale, HEAD_DIM: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr):
        """BM queries of one (b, head) against all N keys, BN at a time (online softmax); out (B, N, D), and each
        query's log-sum-exp (log2 units) in lse (B h, N)."""
        m_tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        D = heads * HEAD_DIM
        rows = m_tile * BM + tl.arange(0, BM)
        qa, qb = _short_load(qkv, (b * N + rows).to(tl.int64) * 3 * D, rows < N, h * HEAD_DIM, HEAD_DIM)
        top = tl.full([BM], float("-inf"), tl.float32)
        total = tl.zeros([BM], tl.float32)
        acc_a = tl.zeros([BM, 64], tl.float32)
        acc_b = tl.zeros([BM, 16], tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            _, ka, kb, va, vb = _short_keys(qkv, b, h, cols, N, D, HEAD_DIM)
            s = tl.where((cols < N)[None, :], _short_scores(qa, qb, ka, kb, scale), float("-inf"))
            new_top = tl.maximum(top, tl.max(s, 1))
            p = tl.exp2(s - new_top[:, None])
            shrink = tl.exp2(top - new_top)
            total = total * shrink + tl.sum(p, 1)
            p = p.to(va.dtype)
            acc_a = acc_a * shrink[:, None] + tl.dot(p, va)
            acc_b = acc_b * shrink[:, None] + tl.dot(p, vb)
            top = new_top
        _short_store(out, (b * N + rows).to(tl.int64) * D, rows < N, h * HEAD_DIM, acc_a / total[:, None],
                     acc_b / total[:, None], HEAD_DIM)
        tl.store(lse + bh * N + rows, top + tl.log2(total), mask=rows < N)

    @triton.jit
    def _short_bwd_rowsums(out, grad, rowsum, N: tl.constexpr, heads, HEAD_DIM: tl.constexpr, BM: tl.constexpr):
        """sum(grad * out) over each query's head columns, which the softmax's backward subtracts."""
        m_tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = m_tile * BM + tl.arange(0, BM)
        tok = (b * N + rows).to(tl.int64) * heads * HEAD_DIM
        oa, ob = _short_load(out, tok, rows < N, h * HEAD_DIM, HEAD_DIM)
        ga, gb = _short_load(grad, tok, rows < N, h * HEAD_DIM, HEAD_DIM)
        total = tl.sum(oa.to(tl.float32) * ga.to(tl.float32), 1) + tl.sum(ob.to(tl.float32) * gb.to(tl.float32), 1)
        tl.store(rowsum + bh * N + rows, total, mask=rows < N)

    @triton.jit
    def _short_bwd_dkdv(qkv, grad, lse, rowsum, dqkv, N: tl.constexpr, heads, scale, HEAD_DIM: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr):
        """dk and dv of BN keys of one (b, head), over all N queries BM at a time."""
        n_tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        D = heads * HEAD_DIM
        cols = n_tile * BN + tl.arange(0, BN)
        tok, ka, kb, va, vb = _short_keys(qkv, b, h, cols, N, D, HEAD_DIM)
        dka, dkb = tl.zeros([BN, 64], tl.float32), tl.zeros([BN, 16], tl.float32)
        dva, dvb = tl.zeros([BN, 64], tl.float32), tl.zeros([BN, 16], tl.float32)
        for m0 in range(0, N, BM):
            rows = m0 + tl.arange(0, BM)
            qa, qb, ga, gb, row_lse, row_sum = _short_query_rows(qkv, grad, lse, rowsum, b, h, bh, rows, N, D, HEAD_DIM)
            p, ds = _short_probs_grads(qa, qb, ka, kb, va, vb, ga, gb, row_lse, row_sum, scale,
                                       (rows < N)[:, None] & (cols < N)[None, :])
            pt = tl.trans(p.to(ga.dtype))
            dva += tl.dot(pt, ga)
            dvb += tl.dot(pt, gb)
            dst = tl.trans(ds.to(qa.dtype))
            dka += tl.dot(dst, qa)
            dkb += tl.dot(dst, qb)
        _short_store(dqkv, tok, cols < N, D + h * HEAD_DIM, dka * scale, dkb * scale, HEAD_DIM)
        _short_store(dqkv, tok, cols < N, 2 * D + h * HEAD_DIM, dva, dvb, HEAD_DIM)

    @triton.jit
    def _short_bwd_dq(qkv, grad, lse, rowsum, dqkv, N: tl.constexpr, heads, scale, HEAD_DIM: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
        """dq of BM queries of one (b, head), over all N keys BN at a time."""
        m_tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        D = heads * HEAD_DIM
        rows = m_tile * BM + tl.arange(0, BM)
        qa, qb, ga, gb, row_lse, row_sum = _short_query_rows(qkv, grad, lse, rowsum, b, h, bh, rows, N, D, HEAD_DIM)
        dqa, dqb = tl.zeros([BM, 64], tl.float32), tl.zeros([BM, 16], tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            _, ka, kb, va, vb = _short_keys(qkv, b, h, cols, N, D, HEAD_DIM)
            _, ds = _short_probs_grads(qa, qb, ka, kb, va, vb, ga, gb, row_lse, row_sum, scale,
                                       (rows < N)[:, None] & (cols < N)[None, :])
            ds = ds.to(qa.dtype)
            dqa += tl.dot(ds, ka)
            dqb += tl.dot(ds, kb)
        tok = (b * N + rows).to(tl.int64) * 3 * D
        _short_store(dqkv, tok, rows < N, h * HEAD_DIM, dqa * scale, dqb * scale, HEAD_DIM)


# Tiles of the short kernels: 64 queries x 64 keys, 4 warps, 3 stages, the fastest of five settings (docs/LOG.md,
# 2026-12-07)
SHORT_TILE, SHORT_WARPS, SHORT_STAGES = 64, 4, 3


def _short_grid(qkv, heads):
    B, N, _ = qkv.shape
    return triton.cdiv(N, SHORT_TILE), B * heads


def _short_args(qkv, heads):
    d = qkv.shape[-1] // 3 // heads
    return dict(HEAD_DIM=d, num_warps=SHORT_WARPS, num_stages=SHORT_STAGES), d ** -0.5


@torch.library.custom_op("opensora::short_attention", mutates_args=())
def short_attention_op(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3D), the qkv projection's rows -> attention over the N tokens (B, N, D), and each query's
    log-sum-exp (B h, N) in log2 units (the backward's)."""
    qkv = qkv.contiguous()
    B, N, D3 = qkv.shape
    out = qkv.new_empty(B, N, D3 // 3)
    lse = qkv.new_empty(B * heads, N, dtype=torch.float32)
    meta, scale = _short_args(qkv, heads)
    _short_fwd[_short_grid(qkv, heads)](qkv, out, lse, N, heads, scale, BM=SHORT_TILE, BN=SHORT_TILE, **meta)
    return out, lse


@short_attention_op.register_fake
def _(qkv, heads):
    B, N, D3 = qkv.shape
    return qkv.new_empty(B, N, D3 // 3), qkv.new_empty(B * heads, N, dtype=torch.float32)


@torch.library.custom_op("opensora::short_attention_backward", mutates_args=())
def short_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             heads: int) -> torch.Tensor:
    qkv, grad = qkv.contiguous(), grad.contiguous()
    meta, scale = _short_args(qkv, heads)
    grid = _short_grid(qkv, heads)
    N = qkv.shape[1]
    rowsum = torch.empty_like(lse)
    _short_bwd_rowsums[grid](out, grad, rowsum, N, heads, BM=SHORT_TILE, HEAD_DIM=meta["HEAD_DIM"])
    dqkv = torch.empty_like(qkv)
    for kernel in (_short_bwd_dkdv, _short_bwd_dq):  # each writes its own columns of dqkv
        kernel[grid](qkv, grad, lse, rowsum, dqkv, N, heads, scale, BM=SHORT_TILE, BN=SHORT_TILE, **meta)
    return dqkv


@short_attention_backward.register_fake
def _(grad, qkv, out, lse, heads):
    return torch.empty_like(qkv)


def _short_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)
    ctx.heads = inputs[1]


short_attention_op.register_autograd(
    lambda ctx, grad, _: (short_attention_backward(grad, *ctx.saved_tensors, ctx.heads), None),
    setup_context=_short_attention_setup)


def short_attention(qkv, heads):
    """qkv (B, N, 3D) -> self-attention over the N tokens, (B, N, D) (where short_kernel_fits)."""
    return short_attention_op(qkv, heads)[0]


# adaLN's elementwise work as two Triton kernels: each block's LayerNorm + modulate (norm_modulate), and the
# residual add that comes just before the second one with it (add_norm_modulate: x + gate * a, then LN and
# modulate, both results written in one pass). The backward kernel walks a run of one sample's rows, so the
# per-sample sums that the modulation's and the gate's gradients need are taken in the same pass over the rows
# that gives the input gradient, instead of another read of them.

NORM_KERNEL_WIDTH = 16384  # a row of D values is held in registers
# the rows' dtype before the e4m3 rounding (E4M3 below; the other kernels ignore it)
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if triton else {}


def norm_kernel_fits(x, *modulation):
    """Whether the fused kernels run: CUDA, FUSED_NORM, a row that fits, one (shift, scale, gate) row a sample.
    They run in training and in sampling (both measured faster than Inductor's code: docs/LOG.md, "The H100
    column" and "Fused norms in sampling")."""
    B, D = x.shape[0], x.shape[-1]
    return (triton is not None and FUSED_NORM and x.is_cuda and x.dim() >= 3 and D <= NORM_KERNEL_WIDTH
            and all(m is None or (m.shape[0] == B and m.numel() == B * D and m.stride(-1) == 1) for m in modulation))


if triton is not None:
    @triton.jit
    def _norm_modulate_fwd(x, a, gate, shift, scale, x_out, h, stats, M, N, D, mod_stride, eps, RESIDUAL: tl.constexpr,
                           GATED: tl.constexpr, E4M3: tl.constexpr, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """ROWS rows: x (+ gate * a, stored), then LayerNorm, modulate, stored; each row's mean and 1/std kept.
        E4M3 (sampling, an fp8 linear next): the rows are rounded to DTYPE, then to e4m3 codes as fp8.py's rounding
        pass does (each row's max |value| on 448), and h gets the codes, stats each row's scale."""
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        col = tl.arange(0, BLOCK_D)
        valid = (row < M)[:, None] & (col < D)[None, :]
        at = row[:, None] * D + col[None, :]
        mod = (row // N * mod_stride)[:, None] + col[None, :]  # each row's sample's modulation
        v = tl.load(x + at, mask=valid, other=0.0).to(tl.float32)
        if RESIDUAL:
            r = tl.load(a + at, mask=valid, other=0.0).to(tl.float32)
            if GATED:
                r *= tl.load(gate + mod, mask=valid, other=0.0).to(tl.float32)
            v = (v + r).to(x_out.dtype.element_ty)  # the residual stream as stored is what the norm sees
            tl.store(x_out + at, v, mask=valid)
            v = v.to(tl.float32)
        mean = tl.sum(v, 1) / D
        centred = tl.where(valid, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
        scale_row = tl.load(scale + mod, mask=valid, other=0.0).to(tl.float32)
        shift_row = tl.load(shift + mod, mask=valid, other=0.0).to(tl.float32)
        out = centred * rstd[:, None] * (1.0 + scale_row) + shift_row
        if E4M3:
            out = out.to(DTYPE).to(tl.float32)
            top = tl.maximum(tl.max(tl.abs(out), 1), 1e-12)
            codes = tl.clamp(out * tl.math.div_rn(448.0, top)[:, None], -448.0, 448.0)
            tl.store(h + at, codes.to(tl.float8e4nv), mask=valid)
            tl.store(stats + row, tl.math.div_rn(top, 448.0), mask=row < M)
        else:
            tl.store(h + at, out.to(h.dtype.element_ty), mask=valid)
            tl.store(stats + 2 * row, mean, mask=row < M)
            tl.store(stats + 2 * row + 1, rstd, mask=row < M)

    @triton.jit
    def _norm_modulate_bwd(dh, dx_out, x, a, gate, scale, stats, dx, da, sums, N, D, mod_stride, rows,
                           GATED: tl.constexpr, HAS_DX_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [g rows, (g + 1) rows) of sample b, ROWS at a time: the input gradient of each row, and this run's
        share of the sample's gradients of shift, scale and gate (sums over its rows), written to sums[b, g].
        With a gate, x is the input of the residual add and the sum is recomputed (rounded as it was stored)."""
        b, g = tl.program_id(0), tl.program_id(1)
        col = tl.arange(0, BLOCK_D)
        col_valid = col < D
        mod = b.to(tl.int64) * mod_stride + col
        one_plus_scale = 1.0 + tl.load(scale + mod, mask=col_valid, other=0.0).to(tl.float32)
        if GATED:
            gate_row = tl.load(gate + mod, mask=col_valid, other=0.0).to(tl.float32)
        d_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        d_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        d_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        stop = tl.minimum(g * rows + rows, N)
        for first in range(g * rows, stop, ROWS):
            i = first + tl.arange(0, ROWS)
            row = b.to(tl.int64) * N + i
            valid = (i < stop)[:, None] & col_valid[None, :]
            at = row[:, None] * D + col[None, :]
            mean = tl.load(stats + 2 * row, mask=i < stop, other=0.0)
            rstd = tl.load(stats + 2 * row + 1, mask=i < stop, other=0.0)
            v = tl.load(x + at, mask=valid, other=0.0).to(tl.float32)
            if GATED:
                r = tl.load(a + at, mask=valid, other=0.0).to(tl.float32)
                v = (v + gate_row[None, :] * r).to(dx.dtype.element_ty).to(tl.float32)
            xhat = tl.where(valid, (v - mean[:, None]) * rstd[:, None], 0.0)
            grad = tl.load(dh + at, mask=valid, other=0.0).to(tl.float32)
            d_shift += tl.sum(grad, 0)
            d_scale += tl.sum(grad * xhat, 0)
            grad *= one_plus_scale[None, :]  # the gradient of the normalised rows
            c1 = tl.sum(grad * xhat, 1) / D
            c2 = tl.sum(grad, 1) / D
            grad = (grad - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]  # LayerNorm's backward
            if HAS_DX_OUT:
                grad += tl.load(dx_out + at, mask=valid, other=0.0).to(tl.float32)
            tl.store(dx + at, grad.to(dx.dtype.element_ty), mask=valid)
            if GATED:
                d_gate += tl.sum(grad * r, 0)
                tl.store(da + at, (grad * gate_row[None, :]).to(da.dtype.element_ty), mask=valid)
        out = (b * tl.num_programs(1) + g).to(tl.int64) * 3 * D + col
        tl.store(sums + out, d_shift, mask=col_valid)
        tl.store(sums + out + D, d_scale, mask=col_valid)
        tl.store(sums + out + 2 * D, d_gate, mask=col_valid)


# Rows a program takes at a time (forward) and a backward step takes: 1, the fastest of 1, 2, 4 and 8 on the ops
# alone (3.70 ms forward + backward at the image and 16x256 rows' shapes, one H100); the whole rows were
# measured at 1 (docs/LOG.md, "The H100 column")
NORM_ROWS = 1


# Backward programs a multiprocessor, and (in _norm_tiles) a warp per 1,024 lanes of the row: 2 warps for XL's
# 1,152 values. 4 warps and 16 programs ran the ops alone faster, whole rows not (docs/LOG.md, "Fused norms in
# sampling, the norm kernels' tiles")
NORM_BWD_PROGRAMS_PER_SM = 8


def _norm_tiles(D):
    """BLOCK_D and the warps for ROWS rows of D values."""
    block = triton.next_power_of_2(D)
    return block, min(16, max(1, NORM_ROWS * block // 1024))


def _sum_dtype(x, a, gate):  # the dtype of x + gate * a in PyTorch
    return torch.promote_types(x.dtype, a.dtype if gate is None else torch.promote_types(a.dtype, gate.dtype))


def _launch_norm_fwd(x, a, gate, shift, scale, eps, dtype, e4m3=False):
    """(x_out, h, stats); e4m3: (x_out, e4m3 codes (M, D), their scales (M, 1)) with M rows of D."""
    x = x.contiguous()
    B, D = x.shape[0], x.shape[-1]
    M = x.numel() // D
    x_out = x if a is None else torch.empty(x.shape, dtype=_sum_dtype(x, a, gate), device=x.device)
    h, stats = _norm_outputs(x, dtype, e4m3)
    block, warps = _norm_tiles(D)
    _norm_modulate_fwd[(triton.cdiv(M, NORM_ROWS),)](
        x, x if a is None else a.contiguous(), scale if gate is None else gate, shift, scale, x_out, h, stats,
        M, M // B, D, shift.stride(0), eps, RESIDUAL=a is not None, GATED=gate is not None, E4M3=e4m3,
        DTYPE=TRITON_DTYPES.get(dtype, tl.float32), ROWS=NORM_ROWS, BLOCK_D=block, num_warps=warps)
    return x_out, h, stats


def _norm_outputs(x, dtype, e4m3):  # h and stats, or e4m3 codes and their scales
    M, D = x.numel() // x.shape[-1], x.shape[-1]
    if e4m3:
        return x.new_empty(M, D, dtype=torch.float8_e4m3fn), x.new_empty(M, 1, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(M, 2, dtype=torch.float32)


# Rename an op below whenever what it keeps for backward changes: torch.compile's caches know a custom op by its
# name, and a cache written by another version brings that version's backward (docs/LOG.md, "Fused adaLN kernels").
@torch.library.custom_op("opensora::norm_modulate", mutates_args=())
def norm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(x) (no affine) * (1 + scale) + shift in dtype, and each row's (mean, 1/std) for backward."""
    _, h, stats = _launch_norm_fwd(x, None, None, shift, scale, eps, dtype)
    return h, stats


@norm_modulate_op.register_fake
def _(x, shift, scale, eps, dtype):
    return _norm_outputs(x, dtype, False)


# v2: with a gate it keeps x, not the sum (renamed: see above)
@torch.library.custom_op("opensora::add_norm_modulate_v2", mutates_args=())
def add_norm_modulate_op(x: torch.Tensor, a: torch.Tensor, gate: Optional[torch.Tensor], shift: torch.Tensor,
                         scale: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x + gate * a (gate None: x + a), and norm_modulate of it."""
    return _launch_norm_fwd(x, a, gate, shift, scale, eps, dtype)


@add_norm_modulate_op.register_fake
def _(x, a, gate, shift, scale, eps, dtype):
    return x.new_empty(x.shape, dtype=_sum_dtype(x, a, gate)), *_norm_outputs(x, dtype, False)


# Sampling with fp8 linears: the norms' rows go straight to an Fp8Linear, whose first step rounds them to e4m3
# (fp8.py). These ops write the codes and scales instead of the rows: the rows are never written in bf16 nor read
# back. Only fp8.py's compiler pass (FuseRounding, in sample.compile_for_sampling) puts them in a graph.
@torch.library.custom_op("opensora::norm_modulate_e4m3", mutates_args=())
def norm_modulate_e4m3(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_modulate's rows in dtype, rounded as fp8.py rounds a linear's input rows: (e4m3 codes, scales (M, 1))."""
    return _launch_norm_fwd(x, None, None, shift, scale, eps, dtype, e4m3=True)[1:]


@norm_modulate_e4m3.register_fake
def _(x, shift, scale, eps, dtype):
    return _norm_outputs(x, dtype, True)


@torch.library.custom_op("opensora::add_norm_modulate_e4m3", mutates_args=())
def add_norm_modulate_e4m3(x: torch.Tensor, a: torch.Tensor, gate: Optional[torch.Tensor], shift: torch.Tensor,
                           scale: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_norm_modulate with its rows rounded as norm_modulate_e4m3's: (e4m3 codes, scales, x + gate * a)."""
    x_out, codes, scales = _launch_norm_fwd(x, a, gate, shift, scale, eps, dtype, e4m3=True)
    return codes, scales, x_out


@add_norm_modulate_e4m3.register_fake
def _(x, a, gate, shift, scale, eps, dtype):
    return *_norm_outputs(x, dtype, True), x.new_empty(x.shape, dtype=_sum_dtype(x, a, gate))


# The fused norms as compiled graphs hold them (op overloads, not the Python functions above), each -> its e4m3
# twin and the index of its rows among its outputs (add_norm_modulate's sum comes first). Exported for fp8.py's
# compiler pass (FuseRounding), which finds these ops in a graph by identity, not by name.
E4M3_TWINS = {
    torch.ops.opensora.norm_modulate.default: (torch.ops.opensora.norm_modulate_e4m3.default, 0),
    torch.ops.opensora.add_norm_modulate_v2.default: (torch.ops.opensora.add_norm_modulate_e4m3.default, 1),
}


@torch.library.custom_op("opensora::norm_modulate_backward", mutates_args=())
def norm_modulate_backward(dh: torch.Tensor, dx_out: Optional[torch.Tensor], x: torch.Tensor, a: Optional[torch.Tensor],
                           gate: Optional[torch.Tensor], scale: torch.Tensor, stats: torch.Tensor,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x (all of it: dx_out, the gradient that reached the stored residual stream, added), of a
    (gate * dx; empty without a gate, where it is dx), and of shift, scale and gate as sums (3, B, D) in fp32.
    x is what was normalised, or with a gate the input of the residual add (the sum is recomputed from x and a)."""
    B, D = x.shape[0], x.shape[-1]
    N = x.numel() // D // B
    x, a = x.contiguous(), None if a is None else a.contiguous()  # as the forward read them (saved as given)
    dx = torch.empty(x.shape, dtype=x.dtype if gate is None else _sum_dtype(x, a, gate), device=x.device)
    da = torch.empty_like(a) if gate is not None else x.new_empty(0)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    groups = min(N, triton.cdiv(NORM_BWD_PROGRAMS_PER_SM * sms, B))
    rows = triton.cdiv(N, groups)
    groups = triton.cdiv(N, rows)
    sums = torch.empty(B, groups, 3, D, dtype=torch.float32, device=x.device)
    block, warps = _norm_tiles(D)
    _norm_modulate_bwd[(B, groups)](
        dh.contiguous(), dh if dx_out is None else dx_out.contiguous(), x, x if a is None else a, scale if gate is None else gate,
        scale, stats, dx, da, sums, N, D, scale.stride(0), rows, GATED=gate is not None, HAS_DX_OUT=dx_out is not None,
        ROWS=NORM_ROWS, BLOCK_D=block, num_warps=warps)
    return dx, da, sums.sum(1).transpose(0, 1).contiguous()


@norm_modulate_backward.register_fake
def _(dh, dx_out, x, a, gate, scale, stats):
    B, D = x.shape[0], x.shape[-1]
    return (x.new_empty(x.shape, dtype=x.dtype if gate is None else _sum_dtype(x, a, gate)),
            torch.empty_like(a, memory_format=torch.contiguous_format) if gate is not None else x.new_empty(0),
            x.new_empty(3, B, D, dtype=torch.float32))


def _norm_modulate_setup(ctx, inputs, output):  # inputs: x, shift, scale, eps, dtype
    x, shift, scale = inputs[:3]
    ctx.save_for_backward(x, shift, scale, output[1])


def _add_norm_modulate_setup(ctx, inputs, output):  # inputs: x, a, gate, shift, scale, eps, dtype
    x, a, gate, shift, scale = inputs[:5]
    # backward reads the sum, or with a gate (where it reads a anyway) recomputes it from x, which the block's
    # first norm keeps: one activation less kept
    ctx.save_for_backward(output[0] if gate is None else x, a, gate, shift, scale, output[2])
    ctx.dtypes = x.dtype, a.dtype


def _as_input(grad, tensor):  # a (B, D) fp32 sum as the gradient of a (B, 1.., D) modulation row
    return grad.to(tensor.dtype).view(tensor.shape)


def _norm_modulate_grads(ctx, dh, dstats):
    x, shift, scale, stats = ctx.saved_tensors
    dx, _, sums = norm_modulate_backward(dh, None, x, None, None, scale, stats)
    return dx, _as_input(sums[0], shift), _as_input(sums[1], scale), None, None


def _add_norm_modulate_grads(ctx, dx_out, dh, dstats):
    x, a, gate, shift, scale, stats = ctx.saved_tensors
    dx, da, sums = norm_modulate_backward(dh, dx_out, x, a, gate, scale, stats)
    x_dtype, a_dtype = ctx.dtypes
    return (dx.to(x_dtype), (dx if gate is None else da).to(a_dtype), None if gate is None else _as_input(sums[2], gate),
            _as_input(sums[0], shift), _as_input(sums[1], scale), None, None)


norm_modulate_op.register_autograd(_norm_modulate_grads, setup_context=_norm_modulate_setup)
add_norm_modulate_op.register_autograd(_add_norm_modulate_grads, setup_context=_add_norm_modulate_setup)


def _output_dtype(x):
    """What the LayerNorm's consumer, a Linear, computes in: autocast's dtype where autocast is on."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def norm_modulate(x, shift, scale, eps, reference):
    """LayerNorm(x) (no affine) * (1 + scale) + shift: the fused kernel where it fits, else reference (model.py)."""
    if not norm_kernel_fits(x, shift, scale):
        return reference(x, shift, scale, eps)
    return norm_modulate_op(x, shift, scale, eps, _output_dtype(x))[0]


def add_norm_modulate(x, a, gate, shift, scale, eps, reference):
    """(x + gate * a, its norm_modulate); gate None: x + a. The fused kernel where it fits, else reference."""
    if not (norm_kernel_fits(x, gate, shift, scale) and a.shape == x.shape):
        return reference(x, a, gate, shift, scale, eps)
    x, h, _ = add_norm_modulate_op(x, a, gate, shift, scale, eps, _output_dtype(x))
    return x, h


# The fused attention kernels' ops. A checkpointed block keeps their outputs (selective checkpointing): at long
# sequences attention is most of a block's forward, yet its output is one row of D values a token (plus a
# log-sum-exp a head), where all of a block's activations are 25-30 rows
ATEN_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (  # q, k, v laid out (B, h, N, d)
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")}
FUSED_ATTENTION_OPS = set(ATEN_ATTENTION_OPS)
FUSED_ATTENTION_OPS.add(torch.ops.opensora.flash4_attention.default)
FUSED_ATTENTION_OPS.add(torch.ops.opensora.short_attention.default)  # qkv (B, N, 3D)
if hasattr(getattr(torch.ops, "flash_attn", None), "_flash_attn_forward"):  # flash-attn >= 2.6 registers its op
    FUSED_ATTENTION_OPS.add(torch.ops.flash_attn._flash_attn_forward.default)


def keep_attention(ctx, op, *args, **kwargs):
    if op in FUSED_ATTENTION_OPS:
        if op is torch.ops.opensora.short_attention.default:
            keys = args[0].shape[1]
        else:
            keys = args[1].shape[2] if op in ATEN_ATTENTION_OPS else args[1].shape[1]  # flash-attn: (B, M, h, d)
        if keys > SHORT_KEYS:  # attention over few keys (to caption tokens) is cheap to redo: recompute it
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# torch.compile warns once that a checkpoint policy must not meet in-place ops: the blocks have none
logging.getLogger("torch._higher_order_ops.wrap").addFilter(lambda record: "context_fn" not in record.getMessage())
