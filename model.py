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

The GPU kernels live in gpu_kernels.py, dispatched by name from inside this file's seams, as nanochat's model
calls its flash_attention module: `attention` (impl auto and flash), `norm_modulate` and `add_norm_modulate` (on
CUDA) call the gpu_kernels functions of the same names and hand over their own plain code as the reference, which
CPUs run. Four calls sit beside the seams: TemporalAttention runs gpu_kernels.frame_attention itself where
gpu_kernels.frame_kernel_fits (CUDA, up to 64 frames; the kernel reads the qkv projection's (B, T, S, 3D) output
in place), `attention` elsewhere; Attention runs gpu_kernels.short_attention where gpu_kernels.short_kernel_fits
(training over few tokens on CUDA, when turned on); checkpoint_block takes gpu_kernels.keep_attention as its policy; ModelConfig
asks gpu_kernels.flash_version() whether attn="flash" can run.
"""
import math
from dataclasses import dataclass, asdict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import gpu_kernels


def modulate(x, shift, scale):
    # adaLN: the "1 +" makes a zero-initialised modulation the identity, so training starts from LN(x)
    return x * (1 + scale) + shift


def norm_modulate(x, shift, scale, eps=1e-6):
    """LayerNorm without affine parameters (eps 1e-6 as in DiT), then modulate: the input of each adaLN branch.
    On GPUs gpu_kernels.norm_modulate does it in one fused kernel (training and sampling); this is the reference
    it falls back to."""
    if x.is_cuda:
        return gpu_kernels.norm_modulate(x, shift, scale, eps, reference=norm_modulate_reference)
    return norm_modulate_reference(x, shift, scale, eps)


def norm_modulate_reference(x, shift, scale, eps):
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def add_norm_modulate(x, a, gate, shift, scale, eps=1e-6):
    """The residual add of a branch (x + gate * a; gate None: x + a) and norm_modulate of the sum for the next
    branch: (sum, its norm_modulate). One fused kernel on GPUs (gpu_kernels.add_norm_modulate)."""
    if x.is_cuda:
        return gpu_kernels.add_norm_modulate(x, a, gate, shift, scale, eps, reference=add_norm_modulate_reference)
    return add_norm_modulate_reference(x, a, gate, shift, scale, eps)


def add_norm_modulate_reference(x, a, gate, shift, scale, eps):
    x = x + a if gate is None else x + gate * a
    return x, norm_modulate_reference(x, shift, scale, eps)


ATTENTION_IMPLS = ("auto", "flash", "sdpa", "math")


def attention(q, k, v, mask=None, impl="auto"):
    """The single attention seam. q (B, N, h, d), k and v (B, M, h, d), mask (B, M) bool, True = attend.

    impl sdpa: torch's fused kernels (flash, cuDNN or memory-efficient, picked by torch); math: the plain
    formula, the reference for tests and benchmarks. auto (the default) and flash go to gpu_kernels.attention,
    which picks a GPU speed path by the shapes and hands back to these two where none pays (gpu_kernels.py)."""
    if impl not in ("sdpa", "math"):
        return gpu_kernels.attention(q, k, v, mask, impl, reference=attention)
    q, k, v = (rearrange(t, "B N h d -> B h N d") for t in (q, k, v))
    bias = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M): one key mask for all heads
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, N, M), Attention(Q, K, V) of Vaswani et al.
        if bias is not None:
            scores = scores.masked_fill(~bias, float("-inf"))
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v  # softmax in fp32 even under bf16/fp16
    return rearrange(out, "B h N d -> B N h d")


def checkpoint_block(forward, *args):
    """Gradient checkpointing of one block: backward recomputes its activations from its inputs, all but the
    fused attention outputs, which it keeps (gpu_kernels.keep_attention names those ops). Called inside the block's
    forward, so that a compiled block compiles the recomputation too (torch.compile honours the policy)."""
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, gpu_kernels.keep_attention))


class Attention(nn.Module):
    """Multi-head self-attention; used for DiT's full attention and STDiT's spatial and temporal ones."""

    def __init__(self, dim, heads, impl="auto"):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (B, N, D)
        qkv = self.qkv(x)
        if mask is None and gpu_kernels.short_kernel_fits(qkv, self.heads, self.impl):  # few tokens, training, CUDA
            return self.proj(gpu_kernels.short_attention(qkv, self.heads))
        q, k, v = rearrange(qkv, "B N (three h d) -> three B N h d", three=3, h=self.heads)
        x = attention(q, k, v, mask, self.impl)
        return self.proj(rearrange(x, "B N h d -> B N (h d)"))


class TemporalAttention(Attention):
    """STDiT's attention along the frames at every spatial position, on x laid out (B, T, S, D) as the block
    holds it: on CUDA one Triton kernel, called here beside the `attention` seam (gpu_kernels.frame_attention),
    else (B S) folded into the batch of `attention`."""

    def forward(self, x):  # x (B, T, S, D)
        qkv = self.qkv(x)
        if gpu_kernels.frame_kernel_fits(qkv, self.impl):
            x = gpu_kernels.frame_attention(qkv, self.heads)
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
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


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
        # its row with that stride (6x slower on an H100; docs/LOG.md, "Token layout"). One copy puts tokens in rows.
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
        self.attn = Attention(dim, heads, impl)  # both branches take norm_modulate(x): LayerNorm without parameters
        self.cross_attn = CrossAttention(dim, heads, impl) if cross else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, y=None, y_mask=None, x_mask=None, given=None, recompute=False):  # x (B, N, D), c (B, D)
        if recompute:
            return checkpoint_block(self.forward, x, c, y, y_mask, x_mask, given)
        if given is None:
            mod = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        else:  # c (B, 2, D), t's and t = 0's; the tokens of given frames (given, (B, N, 1)) take t = 0's: (B, N, 6D)
            mod = torch.where(given, self.adaLN_modulation(c[:, 1])[:, None], self.adaLN_modulation(c[:, 0])[:, None])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = self.attn(norm_modulate(x, shift_msa, scale_msa), x_mask)
        if self.cross_attn is None:  # x + gate_msa * h, and the MLP's input from it
            x, h = add_norm_modulate(x, h, gate_msa, shift_mlp, scale_mlp)
        else:  # cross-attention ungated, like PixArt; its zero-initialised proj starts it at 0
            x = x + gate_msa * h
            x, h = add_norm_modulate(x, self.cross_attn(x, y, y_mask), None, shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)


class STDiTBlock(nn.Module):
    """Open-Sora v1.0 block on x (B, T, S, D); the steps follow STDiTBlock.forward in Open-Sora v1.0's
    opensora/models/stdit/stdit.py (github.com/hpcaitech/Open-Sora, tag v1.0.0)."""
    selective_checkpoint = True  # checkpointed: keep the attention outputs (checkpoint_block)

    def __init__(self, dim, heads, mlp_ratio, impl):
        super().__init__()
        self.attn = Attention(dim, heads, impl)
        self.cross_attn = CrossAttention(dim, heads, impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # adaLN-single (PixArt-alpha): one t_block shared by all blocks, plus this per-block learned table
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn_temp = TemporalAttention(dim, heads, impl)

    def forward(self, x, t0, y, y_mask=None, tpe=None, recompute=False):  # x (B, T, S, D), t0 (B, 6D), y (B, L, D), tpe (1, T, D)
        if recompute:
            return checkpoint_block(self.forward, x, t0, y, y_mask, tpe)
        B, T, S, D = x.shape
        # t0 (B, 6D), or with a frame mask (B, T, 6D): given frames carry t = 0's modulation (STDiT.forward)
        mod = self.scale_shift_table + t0.reshape(B, -1, 6, D)  # (B, 1 or T, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, :, None].unbind(2)  # (B, 1 or T, 1, D)
        # 1. spatial self-attention inside each frame
        h = norm_modulate(x, shift_msa, scale_msa)
        h = self.attn(rearrange(h, "B T S D -> (B T) S D"))
        x = x + gate_msa * rearrange(h, "(B T) S D -> B T S D", B=B)
        # 2. temporal self-attention along each spatial position, on the un-normalised, un-modulated x;
        #    the temporal position embedding enters block 0's attention input only
        h = self.attn_temp(x if tpe is None else x + tpe[:, :, None])
        # the spatial gate is reused here: a quirk of Open-Sora v1.0, reproduced on purpose for its checkpoints
        x = x + gate_msa * h
        # 3. cross-attention to the caption tokens: no norm, no gate (its sum and the MLP's input in one step)
        x, h = add_norm_modulate(x, self.cross_attn(rearrange(x, "B T S D -> B (T S) D"), y, y_mask).view(B, T, S, D),
                                 None, shift_mlp, scale_mlp)
        # 4. modulated, gated MLP
        return x + gate_mlp * self.mlp(h)


class FinalLayer(nn.Module):
    """LN, modulate, Linear to p_t*p_h*p_w*C_out values per token. DiT computes shift and scale from c
    through adaLN_modulation; STDiT (T2IFinalLayer) adds t to a learned (2, D) table."""

    def __init__(self, dim, patch_volume, out_channels, adaln_single):
        super().__init__()
        self.linear = nn.Linear(dim, patch_volume * out_channels)
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, c):  # c (B, D) -> shift, scale (B, 1, D)
        if hasattr(self, "scale_shift_table"):
            return (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        return self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)

    def forward(self, x, c, keep=None):
        """x (B, N, D), c (B, D). With keep (B, T, 1, 1), the frames to generate: c (B, 2, D) is t's and t = 0's, x
        is (B, T, S, D), and the given frames take t = 0's shift and scale."""
        if keep is None:
            shift, scale = self.modulation(c)
        else:
            (shift, scale), (shift0, scale0) = self.modulation(c[:, 0]), self.modulation(c[:, 1])
            shift = torch.where(keep, shift[:, None], shift0[:, None])  # (B, T, 1, D)
            scale = torch.where(keep, scale[:, None], scale0[:, None])
        return self.linear(norm_modulate(x, shift, scale))


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
    eps_skip: bool = False         # add sqrt(1 - abar_t) x_t to the predicted noise (DiT-demo; off as published)
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
        if self.attn == "flash" and gpu_kernels.flash_version() is None:
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
        if cfg.eps_skip:  # sqrt(1 - abar_t) of the training schedule (sample.SCHEDULE: betas 1e-4 to 0.02, linear)
            abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
            self.register_buffer("skip_scale", (1 - abar).sqrt().float(), persistent=False)

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

    def add_skip(self, out, x, t):
        """With cfg.eps_skip, out's noise channels plus sqrt(1 - abar_t) x_t: for data of unit variance, the best
        linear guess of the noise from x_t (EDM's c_skip, written for noise prediction). Where x_t is nearly all
        noise the blocks then add a small correction instead of copying x_t through exactly, which a small model
        trained for minutes does not do well enough. The loss is the same; published models have it off."""
        if not self.cfg.eps_skip:
            return out
        C = x.shape[1]
        skip = self.skip_scale[t.long()].view(-1, 1, 1, 1, 1).to(out.dtype) * x.to(out.dtype)
        return torch.cat([out[:, :C] + skip, out[:, C:]], dim=1)

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

    def forward(self, x, t, y, mask=None, force_drop=None, frame_mask=None):
        """x (B, C, T, H, W) latents, t (B,) steps, y labels (B,) or caption states (B, L, C_text),
        mask (B, L) bool, force_drop (B,) bool: use the null condition. frame_mask (B, T) bool: the frames to
        generate; the others are given (clean), and their tokens take the conditioning of t = 0. Returns (B, C_out,
        T, H, W)."""
        grid, xt = self.grid(x), x  # xt for add_skip
        x = self.x_embedder(x)  # (B, T, S, D)
        B, T, S, D = x.shape
        x = x + pos_embed_3d(self.cfg.hidden, grid, self.cfg.space_scale, self.cfg.time_scale, x.device).to(x.dtype)
        x = rearrange(x, "B T S D -> B (T S) D")
        c = self.t_embedder(t)  # (B, D)
        y, y_mask = self.embed_condition(y, mask, force_drop)  # (B, L, D), (B, L) or None
        x_mask, L, given = None, y.shape[1], None
        if frame_mask is not None:  # c and c at t = 0 side by side, (B, 2, D); given: the tokens of given frames
            check_frame_mask(frame_mask, B, T)
            c = torch.stack([c, self.t_embedder(torch.zeros_like(t))], dim=1)
            given = (~frame_mask).repeat_interleave(S, dim=1)[..., None]  # (B, N, 1)
        if self.cfg.cond == "adaln":  # pooled condition: the mean over the valid condition tokens
            w = torch.ones(y.shape[:2], device=y.device) if y_mask is None else y_mask.to(y.dtype)
            pooled = (y * w[..., None]).sum(1) / w.sum(1, keepdim=True)
            c = c + (pooled if frame_mask is None else pooled[:, None])
        elif self.cfg.cond == "concat":  # in-context: condition tokens first, one self-attention over both
            x = torch.cat([y, x], dim=1)  # (B, L+N, D)
            if y_mask is not None:
                x_mask = F.pad(y_mask, (0, x.shape[1] - L), value=True)
            if given is not None:  # the condition tokens take t's conditioning
                given = F.pad(given, (0, 0, L, 0), value=False)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, c, y, y_mask, x_mask, given)
        if self.cfg.cond == "concat":
            x = x[:, L:]  # drop the condition tokens before the final layer
        if frame_mask is None:
            x = self.final_layer(x, c)
        else:  # the final layer's conditioning per frame, on x as (B, T, S, D)
            x = self.final_layer(x.view(B, T, S, D), c, frame_mask[:, :, None, None]).flatten(1, 2)
        return self.add_skip(self.unpatchify(x, grid), xt, t)


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

    def forward(self, x, t, y, mask=None, force_drop=None, frame_mask=None):
        """x (B, C, T, H, W), t (B,), y caption states (B, L, C_text), mask (B, L) bool, force_drop (B,) bool.
        frame_mask (B, T) bool: the frames to generate; given frames take the modulation of t = 0 in every block
        and the final layer (Open-Sora 1.2's STDiT3, t_mask_select), with no new parameters."""
        T, H, W = grid = self.grid(x)
        xt, steps = x, t  # for add_skip
        x = self.x_embedder(x)  # (B, T, S, D)
        x = x + pos_embed_2d(self.cfg.hidden, H, W, self.cfg.space_scale, x.device).to(x.dtype)
        tpe = pos_embed_1d(self.cfg.hidden, T, self.cfg.time_scale, x.device).to(x.dtype)[None]  # (1, T, D)
        t = self.t_embedder(t)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        if frame_mask is not None:  # per frame: t's modulation, or t = 0's on given frames, (B, T, 6D)
            check_frame_mask(frame_mask, x.shape[0], T, self.cfg.patch[0])
            zero = self.t_embedder(torch.zeros_like(steps))
            t0 = torch.where(frame_mask[..., None], t0[:, None], self.t_block(zero)[:, None])
            t = torch.stack([t, zero], dim=1)  # (B, 2, D) for the final layer
        y, y_mask = self.embed_condition(y, mask, force_drop)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, t0, y, y_mask, tpe if i == 0 else None)
        if frame_mask is None:  # the final layer takes t, not t0
            x = self.final_layer(rearrange(x, "B T S D -> B (T S) D"), t)
        else:
            x = rearrange(self.final_layer(x, t, frame_mask[:, :, None, None]), "B T S K -> B (T S) K")
        return self.add_skip(self.unpatchify(x, grid), xt, steps)


def check_frame_mask(frame_mask, B, T, patch_t=1):
    """A frame mask must be (B, T) bool over latent frames that are token frames (a time patch of 1)."""
    if patch_t != 1:
        raise ValueError(f"frame masks need a time patch of 1 (each latent frame its own tokens), not {patch_t}")
    if frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (B, T):
        raise ValueError(f"frame_mask must be bool (B, T) = ({B}, {T}), not {frame_mask.dtype} {tuple(frame_mask.shape)}")


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


def read_state_dict(path, device="cpu"):
    """The tensors of a weights file (.safetensors, or .pt/.pth read with weights_only=True): the one place that
    opens weight files, so none is ever unpickled into code. One sentence (ValueError) where it cannot be read."""
    try:
        if str(path).endswith(".safetensors"):
            return load_file(str(path), device=str(device))
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # missing, corrupt, not a checkpoint, or pickled objects (which weights_only refuses)
        raise ValueError(f"{path} cannot be read as weights ({type(e).__name__}): pass a .pt, .pth or .safetensors file "
                         "of tensors (torch.load runs with weights_only=True: pickled objects are refused)") from e


def nonfinite_keys(state):
    """The names of the floating-point tensors in state that hold a NaN or an infinity (one wait for the device)."""
    keys = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not keys:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all() for k in keys]).cpu()
    return [k for k, ok in zip(keys, finite) if not ok]


def unwrap_state_dict(state):
    """The model's tensors from a training script's file: out of the containers those scripts use ("ema", "model",
    ...), without DDP's "module." prefix and without the fixed position tables (ours are computed for any grid)."""
    for wrapper in ("ema", "model", "state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in ("pos_embed", "pos_embed_temporal")}


def load_checkpoint(model, source):
    """Load a published DiT / Open-Sora v1.0 checkpoint or one of ours into model: source is a .pt/.pth/.safetensors
    path, or the tensors already read from one. Never unpickles code."""
    state = unwrap_state_dict(source if isinstance(source, dict) else read_state_dict(source))
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        name = "the file" if isinstance(source, dict) else source
        raise ValueError(f"the weights in {name} do not fit this model ({len(missing)} missing keys e.g. {missing[:3]}, "
                         f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, {len(wrong)} shape mismatches e.g. {wrong[:2]}): "
                         "choose the preset and conditioning the checkpoint was trained with")
    model.load_state_dict(state)
    return model


# Presets. DiT sizes from the DiT paper (Table 1): S, B, L, XL with patch 2, 4 or 8.
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DiT_models = {f"DiT-{size}/{p}": dict(arch="dit", depth=d, hidden=D, heads=h, patch=(1, p, p))
              for size, (d, D, h) in _DIT_SIZES.items() for p in (2, 4, 8)}
# the CPU demo's: patches of 2x2 pixels (12 values a token; with 4x4, 48, it learnt colours but not shapes), and
# eps_skip (without it, 1,440 steps of 16 gave no shapes: docs/LOG.md, "The CPU demo, fourth day")
DiT_models["DiT-demo"] = dict(arch="dit", depth=4, hidden=128, heads=4, patch=(1, 2, 2), eps_skip=True)
# the CPU demo's now: patches of 3x3 (27 values) learn the same shapes at 2.5x the speed (docs/LOG.md, "The CPU demo
# in three minutes")
DiT_models["DiT-demo/3"] = dict(DiT_models["DiT-demo"], patch=(1, 3, 3))
DiT_models["DiT-debug"] = dict(arch="dit", depth=2, hidden=64, heads=4, patch=(1, 2, 2))
# STDiT-XL/2 is Open-Sora v1.0's; S and B reuse DiT's widths for small runs.
STDiT_models = {f"STDiT-{size}/{p}": dict(arch="stdit", depth=d, hidden=D, heads=h, patch=(1, p, p))
                for size, (d, D, h) in _DIT_SIZES.items() if size != "L" for p in (2, 4)}
STDiT_models["STDiT-demo"] = dict(arch="stdit", depth=4, hidden=128, heads=4, patch=(1, 4, 4))  # small, for CPU runs
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
