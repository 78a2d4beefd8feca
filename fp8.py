"""
FP8 matmuls for the blocks' linears, applied from outside the model (like torchao's convert_to_float8_training):

    quantize_fp8(model)          # sampling (sample.py --fp8): weights rounded once, for inference only
    enable_fp8_training(model)   # training (train.py --fp8): same parameters, same state-dict keys

Both swap modules in place and take over the existing linears' tensors, so `blocks.0.mlp.fc1.weight` stays
`blocks.0.mlp.fc1.weight`. model.py knows nothing of fp8. This file imports gpu_kernels.py for one thing: the
fused-norm ops that its sampling compiler pass (FuseRounding) rewrites, taken by reference (gpu_kernels.E4M3_TWINS).

The recipe. Hopper's tensor cores multiply e4m3 (4 exponent bits, 3 mantissa bits, largest value 448) at twice
the bf16 rate. Rounding to e4m3 costs up to 1/16 relative error per element, averaged down over a dot product,
so the scales decide the quality:
  - Row scales. Every fp8 operand gets one fp32 scale per row of its matmul, chosen so that the row's largest
    |value| lands on 448: per token for activations and output gradients, per output channel for the
    forward's weights, per input channel for the input gradient's weights. An outlier token costs only its own
    row's precision. torch._scaled_mm takes exactly these row scales; torchao calls this recipe "rowwise with
    high-precision weight gradient".
  - What runs in fp8: the forward (x W^T) and the input gradient (dY W). What stays bf16: the weight gradient
    (dY^T x, a sum over every token of the batch, where rounding errors would add up) from the bf16
    activations a bf16 linear keeps anyway; the fp32 master weights, the optimizer and the EMA; and every linear
    outside the blocks or in adaLN, whose rows are the batch (too few to pay for the rounding pass), or whose
    sides are not multiples of 16 (the kernels' requirement; all of XL's are).
  - Fusion. On CUDA one Triton pass reads each row once, finds its max and writes e4m3 values and the scale.
    In the MLP that pass also applies the GELU (forward) and its derivative (backward), so the wide hidden rows
    (4 D) are read once each way; the output-gradient pass also sums the bias gradient. In compiled sampling the
    rows of the blocks' LayerNorms go to the qkv and fc1 linears already rounded: the norm kernel writes the e4m3
    codes itself, and so does a residual add whose sum goes to a linear (FuseRounding, a compiler pass): those rows
    are never read back in bf16.
  - Off CUDA the same e4m3 values are multiplied in fp32: the reference the GPU tests compare against, and what
    the CPU tests run.
What it is worth on H100 and H200: docs/LOG.md, "fp8 training (`train.py --fp8`)", "fp8 sampling (`sample.py
--fp8`)" and the later fp8 entries.
"""
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import gpu_kernels

try:  # ships with torch's CUDA builds; CPUs round with torch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

E4M3 = torch.float8_e4m3fn


def fp8_rows(t):
    """t (M, K) -> (t8 (M, K) e4m3, scale (M, 1) fp32) with t ~ t8 * scale; each row's max |t| lands on e4m3's 448."""
    top = torch.finfo(E4M3).max
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    return (t.float() * (top / amax)).clamp(-top, top).to(E4M3), amax / top


if triton is not None:
    @triton.jit
    def _fp8_rows_kernel(x, out, scale, M, K, a, gate, total, gate_stride, PER, GELU: tl.constexpr, ADD: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """fp8_rows for ROWS rows, each read once: max |x|, then x times 448 / max rounded (to nearest even) to
        e4m3. div_rn divides exactly, as torch does; the two still differ by one code in about 0.1% of values.
        GELU: the rows are first put through the tanh-approximated GELU (in fp32, without a bf16 copy between).
        ADD: the rows are the residual sum x + gate * a (gate: one row per PER rows, a sample's adaLN gate), written
        to total in its dtype and rounded from there, as if read back."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        at = rows.to(tl.int64)[:, None] * K + cols[None, :]
        keep = (rows[:, None] < M) & (cols[None, :] < K)
        v = tl.load(x + at, mask=keep, other=0.0).to(tl.float32)
        if ADD:
            g = tl.load(gate + (rows // PER).to(tl.int64)[:, None] * gate_stride + cols[None, :], mask=keep, other=0.0)
            v = (v + g.to(tl.float32) * tl.load(a + at, mask=keep, other=0.0).to(tl.float32)).to(total.dtype.element_ty)
            tl.store(total + at, v, mask=keep)
            v = v.to(tl.float32)
        if GELU:  # 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))), the tanh one approximate hardware instruction
            # (codes one apart from the exact GELU's in 0.03% of values); sigmoid's exp and division ran 1.4x slower
            # (docs/LOG.md, "Sampling table")
            z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)
            v = 0.5 * v * (1.0 + t)
        top = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12)  # (ROWS,)
        q = tl.clamp(v * tl.math.div_rn(448.0, top)[:, None], -448.0, 448.0)
        tl.store(out + at, q.to(tl.float8e4nv), mask=keep)
        tl.store(scale + rows, tl.math.div_rn(top, 448.0), mask=rows < M)


def _fp8_outputs(x):
    return torch.empty_like(x, dtype=E4M3), x.new_empty(x.shape[0], 1, dtype=torch.float32)


def _launch_rows(x, gelu=False, a=None, gate=None, total=None):
    """x (M, K) contiguous -> its e4m3 rows and scales through _fp8_rows_kernel (with a, gate and total: of the sum)."""
    out, scale = _fp8_outputs(x)
    block = triton.next_power_of_2(x.shape[1])
    # tiles of 4,096 values or one row, 64 a thread: 1.4-1.5x faster than 8 warps on 8,192 values on an H200
    # (docs/LOG.md, "Sampling table")
    rows = max(1, 4096 // block)
    add = a is not None
    _fp8_rows_kernel[(triton.cdiv(x.shape[0], rows),)](
        x, out, scale, x.shape[0], x.shape[1], a if add else x, gate if add else x, total if add else x,
        gate.stride(0) if add else 0, x.shape[0] // gate.shape[0] if add else 1, GELU=gelu, ADD=add, ROWS=rows,
        BLOCK=block, num_warps=max(1, rows * block // 2048))
    return out, scale


@torch.library.custom_op("opensora::fp8_rows", mutates_args=())
def fp8_rows_cuda(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_rows (of GELU(x) with gelu) as one Triton kernel that reads each row once (compiled torch ops read it
    twice, which left the first fp8 forward of STDiT-XL/2 no faster than bf16's: docs/LOG.md, "fp8 sampling")."""
    return _launch_rows(x.contiguous(), gelu)


@fp8_rows_cuda.register_fake
def _(x, gelu=False):
    return _fp8_outputs(x)


@torch.library.custom_op("opensora::add_fp8_rows", mutates_args=())
def add_fp8_rows_cuda(x: torch.Tensor, a: torch.Tensor,
                      gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's gated residual add and the rounding of its sum for the next Fp8Linear, in one pass: x and a
    (B, ..., K), gate (B, 1, ..., 1, K) -> e4m3 rows and scales of x + gate * a (as fp8_rows of it, flattened to
    rows of K), then the sum itself, which the rounding would otherwise read back. Put in by FuseRounding."""
    K = x.shape[-1]
    gate, total = gate.reshape(gate.shape[0], K), x.new_empty(x.shape)  # gate: a view of the adaLN rows, rows apart
    out, scale = _launch_rows(x.contiguous().view(-1, K), a=a.contiguous().view(-1, K),
                              gate=gate if gate.stride(1) == 1 else gate.contiguous(), total=total.view(-1, K))
    return out, scale, total


@add_fp8_rows_cuda.register_fake
def _(x, a, gate):
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    return x.new_empty(M, K, dtype=E4M3), x.new_empty(M, 1, dtype=torch.float32), x.new_empty(x.shape)


def _rows8(x, gelu=False):
    """x (M, K) -> e4m3 rows and scales (of GELU(x) with gelu): the Triton pass on CUDA."""
    if x.is_cuda and triton is not None:
        return fp8_rows_cuda(x, gelu)
    return fp8_rows(F.gelu(x.float(), approximate="tanh") if gelu else x)


def _mm8(a8, a_scale, b8, b_scale, bias=None, fast=False, dtype=torch.bfloat16):
    """(a8 * a_scale) @ (b8 * b_scale).T + bias in dtype (bf16 on CUDA): a8 (M, K) and b8 (N, K) e4m3, scales (M, 1)
    and (N, 1).
    fast: accumulate in the tensor cores' own accumulators (1.7x the bf16 rate at XL's shapes; docs/LOG.md, "fp8
    sampling"): the forward takes it, the input gradient (summed over 4,608 hidden channels) does not."""
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


def blocks_but_adaln(module, fqn):
    """The default filter: the linears inside the transformer blocks (attention, temporal attention, cross-attention,
    MLP), but not the adaLN ones, whose rows are the batch: too few to pay for the rounding."""
    return fqn.startswith("blocks.") and "adaLN" not in fqn


def _is_mlp(module):
    """Linear, tanh GELU, Linear as model.py's Mlp (fc1, act, fc2): its GELU can move into the rounding passes."""
    act = getattr(module, "act", None)
    return (isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None), nn.Linear)
            and isinstance(act, nn.GELU) and act.approximate == "tanh")


def _swap(model, fqn, module):
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)  # same slot: parameter order stays


def quantize_fp8(model, module_filter_fn=blocks_but_adaln):
    """Replace the linears that module_filter_fn(module, fqn) picks (and whose sides are multiples of 16) by
    Fp8Linear, in place, for sampling only (no gradients). In an MLP, fc2 takes the GELU into its input rounding.
    The rest of the model goes to bf16 first (a later .to(dtype) would cast the fp8 weights too). Returns the count."""
    model.to(torch.bfloat16)
    mlps = {fqn for fqn, module in model.named_modules() if _is_mlp(module)}
    picked = [(fqn, module) for fqn, module in model.named_modules()
              if type(module) is nn.Linear and module_filter_fn(module, fqn) and fp8_fits(module)]
    for fqn, module in picked:
        parent, _, name = fqn.rpartition(".")
        fuse = parent in mlps and name == "fc2"  # the GELU moves into fc2's rounding
        _swap(model, fqn, Fp8Linear(module, gelu=fuse))
        if fuse:
            model.get_submodule(parent).act = nn.Identity()
    return len(picked)


class FuseRounding(CustomGraphPass):
    """A compiler pass for sampling with fp8 linears (sample.compile_for_sampling adds it to Inductor's post-grad
    passes). An Fp8Linear's input is written in bf16 by the step before it and read back only to be rounded to
    e4m3. Where that step is one of a block's fused norms (gpu_kernels' LayerNorm + modulate ops), the pass has the
    norm kernel round its rows itself (its e4m3 twin: opensora::norm_modulate_e4m3, add_norm_modulate_e4m3; the
    norms and their twins are taken from gpu_kernels.E4M3_TWINS by reference), and the bf16 rows are neither
    written nor read; where it is a gated residual add x + gate * a (STDiT's temporal attention and
    cross-attention read the stream), the add and the rounding become one pass (opensora::add_fp8_rows), which
    writes the sum for the rest of the block and the rounded rows from the same registers. Same codes and scales
    (docs/LOG.md, "Norms that round to fp8", "Residual adds that round to fp8")."""

    def __call__(self, graph: torch.fx.Graph):
        for rounding in list(graph.find_nodes(op="call_function", target=torch.ops.opensora.fp8_rows.default)):
            _fuse_norm_rounding(graph, rounding) or _fuse_add_rounding(graph, rounding)

    def uuid(self):  # Inductor keeps graphs compiled with this pass while this file and gpu_kernels.py are unchanged
        return get_hash_for_files((__file__, gpu_kernels.__file__))


VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _rounded(rounding):
    """The node whose values fp8_rows(views of them) rounds, and those views (each used only on the way), or
    (None, []) where the rounding applies a GELU (an MLP's fc2) or a view is used elsewhere too."""
    if (rounding.args[1] if len(rounding.args) > 1 else rounding.kwargs.get("gelu", False)):
        return None, []
    rows, views = rounding.args[0], []
    while rows.op == "call_function" and rows.target in VIEWS:
        views.append(rows)
        rows = rows.args[0]
    return (None, []) if any(len(n.users) > 1 for n in views) or rows.op != "call_function" else (rows, views)


def _swap_in(graph, producer, op, args, kwargs, rounding, sums, erased):
    """op(*args, **kwargs) right after producer (where its inputs exist and before the sums' users), returning codes,
    scales[, sum], in place of rounding; the sums' users read its third output; then the nodes in erased (users
    before producers) go."""
    with graph.inserting_after(producer):
        fused = graph.call_function(op, args, kwargs)
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with detect_fake_mode(list(fake_args)):
        fused.meta["val"] = op(*fake_args, **fake_kwargs)
    rounding.replace_all_uses_with(fused)
    for total in sums:
        with graph.inserting_after(fused):
            new = graph.call_function(operator.getitem, (fused, 2))
        new.meta["val"] = fused.meta["val"][2]
        total.replace_all_uses_with(new)
    for node in [rounding, *erased]:
        graph.erase_node(node)
    return True


def _fuse_norm_rounding(graph, rounding):
    """rounding = fp8_rows(views of a fused norm's rows): the norm op's e4m3 twin in place of both, if nothing
    else uses the rows or the norm's statistics (a backward would)."""
    rows, views = _rounded(rounding)
    if rows is None or rows.target is not operator.getitem or len(rows.users) > 1:
        return False
    norm, index = rows.args
    e4m3, rows_index = gpu_kernels.E4M3_TWINS.get(norm.target, (None, None))  # the norm ops, by reference
    outputs = list(norm.users)  # getitems of the norm's outputs: add_norm_modulate's sum first, then rows, statistics
    others = [n for n in outputs if n is not rows and n.users]
    only_the_sum = rows_index == 1 and all(n.args[1] == 0 for n in others)  # not the statistics, which a backward reads
    if e4m3 is None or index != rows_index or (others and not only_the_sum):
        return False
    return _swap_in(graph, norm, e4m3, norm.args, norm.kwargs, rounding, others, [*views, *outputs, norm])


def _fuse_add_rounding(graph, rounding):
    """rounding = fp8_rows(views of x + gate * a), gate one row a sample (B, 1, ..., 1, K) and the sum's rows of K:
    opensora::add_fp8_rows in place of the add, its product and the rounding, if the product is used only there."""
    total, views = _rounded(rounding)
    aten = torch.ops.aten
    if total is None or total.target is not aten.add.Tensor or len(total.args) != 2 or total.kwargs:
        return False
    for x, product in (total.args, total.args[::-1]):
        if isinstance(product, torch.fx.Node) and product.target is aten.mul.Tensor and len(product.users) == 1:
            break
    else:
        return False
    if not all(isinstance(n, torch.fx.Node) for n in (x, *product.args)):
        return False
    shape = total.meta["val"].shape
    a, gate = product.args if product.args[0].meta["val"].shape == shape else product.args[::-1]
    values = [n.meta["val"] for n in (x, a, gate, total)]
    per_sample = values[2].dim() == len(shape) > 1 and values[2].shape[0] == shape[0] and values[2].shape[-1] == shape[-1]
    if (values[0].shape != shape or values[1].shape != shape or not per_sample or set(values[2].shape[1:-1]) - {1}
            or len({v.dtype for v in values}) > 1 or rounding.args[0].meta["val"].shape[-1] != shape[-1]):
        return False
    sums = [total] if set(total.users) - set(views) - {rounding} else []  # the residual stream goes on from it
    return _swap_in(graph, total, torch.ops.opensora.add_fp8_rows.default, (x, a, gate), {}, rounding, sums,
                    [*views, total, product])


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
    # measured fastest: 1 row at a time on 8 warps with the GELU; without it 2 or 4 rows on 4 warps
    # (docs/LOG.md, "Timings that code comments used to carry")
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


class Fp8TrainLinear(nn.Module):
    """Takes over an nn.Linear's weight and bias (the same parameters, so the same state-dict keys and optimizer
    state); its matmuls run as _Fp8Linear."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x):
        return fp8_linear(x, self.weight, self.bias)


class Fp8TrainMlp(nn.Module):
    """Takes over an MLP's fc1 and fc2 (keys mlp.fc1.weight ... stay) and runs fc1, GELU, fc2 as one _Fp8Mlp."""

    def __init__(self, mlp):
        super().__init__()
        self.fc1, self.act, self.fc2 = mlp.fc1, mlp.act, mlp.fc2

    def forward(self, x):
        return _as_rows(_Fp8Mlp.apply, x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


def enable_fp8_training(model, module_filter_fn=blocks_but_adaln):
    """Train the linears that module_filter_fn(module, fqn) picks in fp8, in place: each MLP (both linears picked
    and fitting) becomes one Fp8TrainMlp, the other linears Fp8TrainLinear; linears whose sides are not multiples of
    16 stay, as does an MLP that does not fit whole. Parameters and state-dict keys do not change. Call it after
    copying the EMA (which samples with the plain linears) and before sequence parallelism, compile and the
    optimizer. Returns the count of linears."""
    count, mlps = 0, []
    for fqn, module in list(model.named_modules()):
        if any(fqn.startswith(m + ".") for m in mlps):  # the linears of an MLP go with it, or stay with it
            continue
        if _is_mlp(module) and all(module_filter_fn(m, f"{fqn}.{n}") for n, m in (("fc1", module.fc1), ("fc2", module.fc2))):
            mlps.append(fqn)
            if fp8_fits(module.fc1) and fp8_fits(module.fc2):
                _swap(model, fqn, Fp8TrainMlp(module))
                count += 2
        elif type(module) is nn.Linear and module_filter_fn(module, fqn) and fp8_fits(module):
            _swap(model, fqn, Fp8TrainLinear(module))
            count += 1
    return count
