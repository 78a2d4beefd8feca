"""
Sequence parallelism: the tokens of one video split over the P ranks of a group, by Ulysses or FastSeq.

    model = build_model("STDiT-XL/2")
    apply_sequence_parallel(model, group, kind="ulysses")   # or "fastseq"; model.py is not touched

What is split (shape letters as in model.py; P ranks, this one is r):
  DiT   - the token sequence: block 0 receives (B, N/P, D), the last block's output is gathered back to
          (B, N, D). Every self-attention communicates; cross-attention and the MLP are per token.
  STDiT - the frames: blocks see (B, T/P, S, D). Spatial attention, cross-attention and the MLP work
          inside a frame and stay local; only temporal attention communicates. (Open-Sora v1.0 ran the
          all-to-all in spatial attention too, which mixes frames: a published bug avoided here.)
A length that P does not divide is padded with zero tokens (or frames) that attention masks out as keys
and the gather drops. P must divide the head count: both schemes hand each rank h/P heads.

Ulysses (DeepSpeed-Ulysses): q, k, v for this rank's N/P tokens and all heads; one all-to-all turns them
into all N tokens for h/P heads; attention; the inverse all-to-all brings (N/P tokens, all heads) back.
FastSeq (OpenDiT): all-gather the input x, project q, k, v for this rank's h/P heads only (rows of the
qkv weight), attention, then one all-to-all back to N/P tokens. Chunk j of x is projected as soon as it
arrives while later chunks are still in flight, for any P; the all-gather's backward is a
reduce-scatter (a sum: each rank's gradient of chunk j is a partial), sent chunk by chunk the same way.

The gradient contract. Every rank of a group computes the same loss on the gathered output. The gather's
backward sums the P identical output gradients (reduce-scatter), so each rank's parameter and input
gradients are P times its own share, and their mean over the group is the exact single-process gradient.
That mean is what DDP (and zero.py) compute anyway when they average over the whole world, so hybrid
data x sequence parallelism needs no extra scaling: SP ranks behave like DP ranks holding one sample.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import fp8
from model import attention

SP_KINDS = ("ulysses", "fastseq")
# torch 2.13 renamed the flat-buffer collectives (the old names still work, with a warning); 2.11 has only the old
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


# Collectives with their adjoints. Each is an autograd Function so gradients travel the reverse way.

def _all_to_all(x, group, scatter_dim, gather_dim):
    """Chunk j of x along scatter_dim goes to rank j; the chunks received are concatenated along
    gather_dim in rank order. Stacking on a new leading dim keeps B and P apart: a reshape that
    interleaves them is a published bug that only batches > 1 reveal."""
    P = dist.get_world_size(group)
    send = torch.stack(x.chunk(P, dim=scatter_dim)).contiguous()  # (P, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):  # the adjoint of an all-to-all is the all-to-all with the two dims swapped
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad, group, gather_dim, scatter_dim), None, None, None


class _Split(torch.autograd.Function):
    """Keep this rank's chunk along dim. Backward: its gradient in place, zeros elsewhere (no traffic)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        ctx.args, ctx.shape = (P, r, dim), x.shape
        return x.chunk(P, dim=dim)[r].contiguous()

    @staticmethod
    def backward(ctx, grad):
        _, r, dim = ctx.args
        full = grad.new_zeros(ctx.shape)
        full.narrow(dim, r * grad.shape[dim], grad.shape[dim]).copy_(grad)
        return full, None, None


class _Gather(torch.autograd.Function):
    """All-gather along dim. Backward: reduce-scatter, summing every rank's gradient of each chunk."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.args = group, dim
        P = dist.get_world_size(group)
        out = x.new_empty((P * x.shape[0], *x.shape[1:]))  # chunks stacked along dim 0: (P B, ...)
        all_gather(out, x.contiguous(), group=group)
        return torch.cat(out.chunk(P), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        group, dim = ctx.args
        send = torch.cat(grad.chunk(dist.get_world_size(group), dim=dim))  # (P B, ...): chunk j for rank j
        out = send.new_empty((grad.shape[0], *send.shape[1:]))
        reduce_scatter(out, send, op=dist.ReduceOp.SUM, group=group)
        return out, None, None


class _GatherProject(torch.autograd.Function):
    """F.linear(all_gather(x, dim=1), weight, bias) with the communication hidden behind the matmuls.

    Forward: P async broadcasts (rank j sends its chunk) are queued at once; the local chunk is projected
    first, then chunk j as soon as broadcast j has landed, while j+1.. are still in flight.
    Backward: the gradient of chunk j is computed and its reduce (sum) to rank j launched, then the next;
    the weight gradient is computed while the reduces run. (Without overlap, FastSeqAttention simply
    projects _Gather's output: one all-gather, one reduce-scatter.)
    fp8 (w8 ... wt_scale given, from fp8.fp8_weight): the projection and the input gradients multiply in fp8 as
    fp8.Fp8TrainLinear's do (train.py --fp8); the weight and bias gradients stay as they are."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, w8=None, w_scale=None, w8t=None, wt_scale=None):  # (B, n, D) -> (B, P*n, F)
        P, r, ranks = dist.get_world_size(group), dist.get_rank(group), dist.get_process_group_ranks(group)
        x = x.contiguous()
        chunks = [x if j == r else torch.empty_like(x) for j in range(P)]
        works = [dist.broadcast(chunks[j], src=ranks[j], group=group, async_op=True) for j in range(P)]
        outs = [None] * P
        for j in [r] + [j for j in range(P) if j != r]:  # own chunk first: it needs no wait
            if j != r:
                works[j].wait()
            if w8 is not None:
                outs[j] = fp8.fp8_forward(chunks[j].flatten(0, 1), (w8, w_scale), bias).view(*x.shape[:2], -1)
            else:
                outs[j] = F.linear(chunks[j], weight, bias)
        works[r].wait()  # our own send
        ctx.save_for_backward(weight, w8t, wt_scale, *chunks)
        ctx.group = group
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad):  # grad (B, P*n, F)
        weight, w8t, wt_scale, *chunks = ctx.saved_tensors
        group = ctx.group
        P, r, ranks = dist.get_world_size(group), dist.get_rank(group), dist.get_process_group_ranks(group)
        grads = grad.chunk(P, dim=1)
        dx, works = [], []
        for j in range(P):
            if w8t is not None:
                rows, _ = fp8.fp8_input_grad(grads[j].flatten(0, 1), (w8t, wt_scale), chunks[j].dtype)
                dx.append(rows.view(chunks[j].shape))
            else:
                dx.append(grads[j] @ weight)  # (B, n, D)
            works.append(dist.reduce(dx[j], dst=ranks[j], op=dist.ReduceOp.SUM, group=group, async_op=True))
        d_weight = sum(g.flatten(0, 1).T.to(c.dtype) @ c.flatten(0, 1) for g, c in zip(grads, chunks))  # (F, D)
        d_bias = grad.sum((0, 1))
        for work in works:
            work.wait()
        return dx[r], d_weight.to(weight.dtype), d_bias.to(weight.dtype), None, None, None, None, None


# torch.compile'd blocks (train.py --compile) run the collectives eagerly, between compiled graphs
all_to_all = torch.compiler.disable(_AllToAll.apply)
gather_project = torch.compiler.disable(_GatherProject.apply)
split = torch.compiler.disable(_Split.apply)
gather = torch.compiler.disable(_Gather.apply)


# Attention modules. They take over the wrapped module's qkv and proj layers, so parameter names, and
# with them checkpoints, stay exactly those of model.py.

class SequenceAttention(nn.Module):
    def __init__(self, attn, shards):
        super().__init__()
        self.heads, self.impl, self.qkv, self.proj = attn.heads, attn.impl, attn.qkv, attn.proj
        self.shards = shards

    def forward(self, x, mask=None):  # x (B, n, D): this rank's n = N/P tokens
        if x.dim() == 4:  # STDiT's temporal attention, (B, T/P, S, D): along the frames of every spatial position
            B = x.shape[0]
            x = self.attend(rearrange(x, "B T S D -> (B S) T D"), mask)
            return rearrange(x, "(B S) T D -> B T S D", B=B)
        return self.attend(x, mask)


class UlyssesAttention(SequenceAttention):
    def attend(self, x, mask=None):  # x (B, n, D)
        group = self.shards.group
        qkv = rearrange(self.qkv(x), "B n (three h d) -> B n three h d", three=3, h=self.heads)
        qkv = all_to_all(qkv, group, 3, 1)  # scatter heads, gather tokens: (B, N, 3, h/P, d)
        q, k, v = qkv.unbind(2)
        x = attention(q, k, v, self.shards.key_mask(mask, x), self.impl)  # (B, N, h/P, d)
        x = all_to_all(x, group, 1, 2)  # scatter tokens, gather heads: (B, n, h, d)
        return self.proj(rearrange(x, "B n h d -> B n (h d)"))


class FastSeqAttention(SequenceAttention):
    def __init__(self, attn, shards, overlap=True):
        super().__init__(attn, shards)
        self.overlap = overlap

    def attend(self, x, mask=None):  # x (B, n, D)
        group, P, r = self.shards.group, self.shards.size, self.shards.rank
        h, D = self.heads // P, x.shape[-1]
        # the qkv rows of this rank's heads: the weight is laid out (three h d) x D
        weight = self.qkv.weight.view(3, self.heads, -1, D)[:, r * h: (r + 1) * h].reshape(-1, D)
        bias = self.qkv.bias.view(3, self.heads, -1)[:, r * h: (r + 1) * h].reshape(-1)
        weight8s = ()
        if isinstance(self.qkv, fp8.Fp8TrainLinear):  # train.py --fp8: the whole weight rounded as one process rounds
            # it (scales per output channel, and per input channel over all heads), then this rank's heads
            mine = lambda t: t.reshape(3, self.heads, -1, t.shape[-1])[:, r * h: (r + 1) * h].reshape(-1, t.shape[-1])
            with torch.no_grad():
                w8, w_scale = fp8.fp8_weight(self.qkv.weight)
                w8t, wt_scale = fp8.fp8_weight(self.qkv.weight, transpose=True)
            weight8s = (mine(w8), mine(w_scale), mine(w8t.t()).t().contiguous(), wt_scale)
        if torch.is_autocast_enabled(x.device.type):  # cast before the gather: half the bytes travel
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if self.overlap:
            qkv = gather_project(x, weight, bias, group, *weight8s)  # (B, N, 3 h/P d)
        elif weight8s:
            qkv = fp8.fp8_linear(gather(x, group, 1), weight, bias, *weight8s)
        else:
            qkv = F.linear(gather(x, group, 1), weight, bias)
        q, k, v = rearrange(qkv, "B N (three h d) -> three B N h d", three=3, h=h)
        x = attention(q, k, v, self.shards.key_mask(mask, x), self.impl)  # (B, N, h/P, d)
        x = all_to_all(x, group, 1, 2)  # (B, n, h, d)
        return self.proj(rearrange(x, "B n h d -> B n (h d)"))


class Shards:
    """The group and the padding of the current forward pass, shared by the hooks and attention modules."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.length, self.pad = 0, 0

    def split(self, x, dim):
        """Pad dim to a multiple of P with zeros and keep this rank's chunk."""
        self.length, self.pad = x.shape[dim], -x.shape[dim] % self.size
        if self.pad:
            x = torch.cat([x, x.new_zeros((*x.shape[:dim], self.pad, *x.shape[dim + 1:]))], dim=dim)
        return split(x, self.group, dim)

    def gather(self, x, dim):
        return gather(x, self.group, dim).narrow(dim, 0, self.length)

    def key_mask(self, mask, x):
        """The attention key mask (B, padded length) for queries x (B, ...): padding is never attended to."""
        if not self.pad:
            return mask
        if mask is None:
            mask = torch.ones(x.shape[0], self.length, dtype=torch.bool, device=x.device)
        return F.pad(mask.bool(), (0, self.pad), value=False)


def apply_sequence_parallel(model, group, kind="ulysses", overlap=True):
    """Make model (DiT or STDiT from model.py) split each sample's sequence over the ranks of group.
    Every rank of the group must feed the same inputs. Returns the model, changed in place."""
    if kind not in SP_KINDS:
        raise ValueError(f"unknown sequence-parallel kind {kind!r}: use one of {SP_KINDS}")
    P, heads = dist.get_world_size(group), model.cfg.heads
    if heads % P:
        raise ValueError(f"{P} sequence-parallel ranks cannot share {heads} attention heads: "
                         f"choose a sequence-parallel size that divides {heads}")
    shards = Shards(group)
    name = "attn" if model.cfg.arch == "dit" else "attn_temp"  # the attention that communicates
    for block in model.blocks:
        old = getattr(block, name)
        setattr(block, name, UlyssesAttention(old, shards) if kind == "ulysses" else FastSeqAttention(old, shards, overlap))
        # the collectives are compiler-disabled, and torch.compile runs a checkpoint around such a call eagerly:
        # checkpoint these blocks whole, around their compiled forward (2 H200s; docs/LOG.md, "Selective checkpointing")
        block.selective_checkpoint = False

    def split_inputs(block, args):  # DiT: (x (B, N, D), c, y, y_mask, x_mask, given); STDiT: (x (B, T, S, D), t0, y, y_mask, tpe)
        args = list(args)
        args[0] = shards.split(args[0], dim=1)
        if model.cfg.arch == "stdit" and args[4] is not None:  # temporal position table (1, T, D)
            args[4] = shards.split(args[4], dim=1)
        return tuple(args)

    def split_frame_mask(block, args):  # every block's: a frame mask's STDiT t0 per frame (B, T, 6D), DiT tokens (B, N, 1)
        args, at = list(args), 1 if model.cfg.arch == "stdit" else 5
        if len(args) > at and args[at] is not None and (model.cfg.arch == "dit" or args[at].dim() == 3):
            args[at] = shards.split(args[at], dim=1)
        return tuple(args)

    model.blocks[0].register_forward_pre_hook(split_inputs)
    for block in model.blocks:
        block.register_forward_pre_hook(split_frame_mask)
    model.blocks[-1].register_forward_hook(lambda block, args, out: shards.gather(out, dim=1))
    model.shards = shards
    return model


def init_groups(sp_size):
    """Cut the world into sequence-parallel groups of sp_size contiguous ranks: [0, sp), [sp, 2 sp), ...
    Contiguous ranks share a node under torchrun, where the all-to-alls run over NVLink. Returns
    (this rank's group, data-parallel rank, data-parallel size); every rank must call it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"--sp-size {sp_size} does not divide the {world} ranks: pick a divisor of {world}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node % sp_size:
        raise ValueError(f"--sp-size {sp_size} would span nodes of {per_node} GPUs each: "
                         f"keep it a divisor of the GPUs per node")
    groups = [dist.new_group(list(range(start, start + sp_size))) for start in range(0, world, sp_size)]
    return groups[rank // sp_size], rank // sp_size, world // sp_size


def init_process_group(device, alone=False):
    """NCCL bound to this process's GPU, or gloo on the CPU. alone: a group of one without torchrun (ZeRO-2 and
    FSDP2 on a single process)."""
    single = dict(store=dist.HashStore(), rank=0, world_size=1) if alone else {}
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, **single)
    else:
        dist.init_process_group("gloo", **single)


def local_device():
    """This process's device: cuda:LOCAL_RANK when there are GPUs (torchrun sets LOCAL_RANK), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= count:
        raise SystemExit(f"process {local_rank} of this node has no GPU of its own (the node has {count}): start torchrun "
                         f"with --nproc_per_node={count} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
