"""
ZeRO-2 (Rajbhandari et al., 2020): AdamW whose fp32 state is sharded over the ranks.

    opt = ZeRO2(model, lr=2e-5, compute_dtype=torch.bfloat16)   # casts the model to bf16 for compute
    opt.scale(loss).backward()          # buckets of gradients are reduce-scattered while backward runs
    grad_norm = opt.clip_grad_norm_(1.0)
    opt.step()                          # AdamW on this rank's fp32 slice, then all-gather into the weights
    opt.zero_grad()

Every rank keeps the whole model in the compute dtype (2 bytes a parameter in bf16) but only 1/N of the
fp32 master weights, Adam moments and gradient (16 bytes a parameter / N). A bucket's gradient slice is
made when its reduce-scatter lands and freed by zero_grad(), so it never sits on top of the activations that
the forward builds and the backward frees (the peak of a step).

Layout: parameters, in reverse order of registration (roughly the order backward produces their gradients),
are packed into buckets of about bucket_mb; each bucket is flattened, padded to a multiple of N, and rank r
owns the r-th of its N equal chunks. The bucket's compute weights are views of one flat tensor in that
layout, which the all-gather after each step fills in place. A bucket whose gradients are all there is
reduce-scattered at once (asynchronously, while backward goes on), each rank receiving only its chunk; the
full gradients are freed, and at most two buckets' worth of full gradients are in flight at once.

The update is torch.optim.AdamW itself, run on this rank's fp32 slice of each bucket (views of one flat
tensor). So the math is AdamW's by construction, and the tests check the sharding around it against AdamW on
one process.

Gradients are averaged over all N ranks of the group (the world by default), which is also right under
sequence parallelism: seqparallel.py's ranks hold gradients whose mean is the true one, as DDP assumes.
Every parameter needs a gradient in each backward; one without is counted as zero.
"""
import math

import torch
import torch.distributed as dist

from seqparallel import all_gather, reduce_scatter

try:  # the fused step's kernel: an optional speed path on CUDA
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# True: on CUDA, one Triton kernel per bucket slice clips the gradient, runs AdamW, moves the EMA and writes the
# compute weights, which otherwise take four passes over the slices and a copy. Off until whole rows are timed
# (docs/LOG.md, 2026-12-08): bench.py --fused-step
FUSED_STEP = False
FUSED_STEP_BLOCK = 4096  # values a program takes


if triton is not None:
    @triton.jit
    def _adamw_ema_kernel(w, g, m, v, ema, out, n, clip, skip, powers, lr, beta1, beta2, eps, decay, ema_weight,
                          HAS_EMA: tl.constexpr, BLOCK: tl.constexpr):
        """BLOCK values of a slice: AdamW as torch's fused kernel computes it, on the gradient times clip, with powers
        (beta1 ** step, beta2 ** step) of the step already counted; then the EMA's lerp toward the new weights, and the
        new weights in the compute dtype into out. Nothing where skip (a 0-d tensor) is set."""
        if tl.load(skip) == 0:
            at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            keep = at < n
            grad = tl.load(g + at, mask=keep) * tl.load(clip)
            p = tl.load(w + at, mask=keep)
            p = p - lr * decay * p
            m1 = beta1 * tl.load(m + at, mask=keep) + (1 - beta1) * grad
            v1 = beta2 * tl.load(v + at, mask=keep) + (1 - beta2) * grad * grad
            correction1 = 1 - tl.load(powers)  # 1 - beta1 ** step
            correction2 = 1 - tl.load(powers + 1)
            p = p - (lr / correction1) * m1 / (tl.sqrt(v1) / tl.sqrt(correction2) + eps)
            tl.store(w + at, p, mask=keep)
            tl.store(m + at, m1, mask=keep)
            tl.store(v + at, v1, mask=keep)
            if HAS_EMA:
                e = tl.load(ema + at, mask=keep)
                tl.store(ema + at, e + ema_weight * (p - e), mask=keep)
            tl.store(out + at, p.to(out.dtype.element_ty), mask=keep)



class ZeRO2:
    def __init__(self, model, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, compute_dtype=torch.bfloat16,
                 group=None, bucket_mb=64, ema_decay=None):
        self.group = group or dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = {p: n for n, p in model.named_parameters()}
        device = self.params[0].device
        # one starting point for all ranks: rank 0's weights and buffers (DDP does the same)
        src = dist.get_global_rank(self.group, 0)
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src, group=self.group)

        # buckets, and this rank's fp32 slice of each: the master weights
        self.buckets, bucket, size = [], [], 0
        limit = bucket_mb * 2**20 // 4
        for p in reversed(self.params):
            bucket.append(p)
            size += p.numel()
            if size >= limit:
                self.buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            self.buckets.append(bucket)
        self.padded = [math.ceil(sum(p.numel() for p in b) / self.world) * self.world for b in self.buckets]
        self.chunk = [n // self.world for n in self.padded]  # this rank's share of each bucket
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        with torch.no_grad():
            master = torch.cat([self._own(self._flat(b, torch.float32, i), i) for i, b in enumerate(self.buckets)])
        self.master = master  # (sum of chunks,) fp32: this rank's slice of every bucket, end to end
        # views of it, one per bucket: AdamW's parameters; a part's .grad (fp32) is made when its bucket's arrives
        self.parts = [torch.nn.Parameter(part) for part in self._slices(master)]
        self.ema = master.clone() if ema_decay is not None else None
        self.ema_decay = ema_decay
        self.clip = None  # the fused step's clip factor, from clip_grad_norm_
        self.betas = torch.tensor(betas, device=device)  # the fused step's, on the device (a copy there would wait)
        self.adamw = torch.optim.AdamW(self.parts, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       fused=device.type == "cuda")
        # fp16 needs loss scaling: grow x2 after 2000 clean steps, halve and skip the step on inf/nan
        self.dynamic = compute_dtype == torch.float16
        self.loss_scale, self.good_steps, self.skipped_steps = 2.0**16 if self.dynamic else 1.0, 0, 0

        # buffers (STDiT's fixed null caption) never change: keep them at full precision for checkpoints
        self.buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
        model.to(compute_dtype)  # the compute copy; the fp32 truth now lives in the slices
        self.compute_dtype = compute_dtype
        # the compute weights become views of one flat tensor per bucket, so the all-gather after each step
        # writes straight into them (no per-parameter copies)
        self.weights = [self._flat(b, compute_dtype, i) for i, b in enumerate(self.buckets)]
        for bucket, flat in zip(self.buckets, self.weights):
            for p, view in self._views(bucket, flat):
                p.data = view
        self.ready = [0] * len(self.buckets)  # gradients arrived, per bucket, in this backward
        self.launched, self.pending, self.callback_queued, self.finished = 0, [], False, False
        self.in_flight = 2  # reduce-scatters left running at once: bounds the full-size gradient copies alive
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    # layout helpers
    def _flat(self, bucket, dtype, i):
        """The bucket's tensors (weights, or grads where present) flattened and zero-padded: (padded,)."""
        parts = [p.detach().reshape(-1).to(dtype) for p in bucket]
        flat = torch.cat(parts)
        return torch.nn.functional.pad(flat, (0, self.padded[i] - flat.numel()))

    @staticmethod
    def _views(bucket, flat):
        """(parameter, its part of the bucket's flat tensor shaped like it), in bucket order."""
        offset = 0
        for p in bucket:
            yield p, flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()

    def _own(self, flat, i):
        return flat[self.rank * self.chunk[i]: (self.rank + 1) * self.chunk[i]]

    def _slices(self, tensor):
        """Split a slice-layout tensor (sum of chunks,) into per-bucket chunks."""
        return tensor.split(self.chunk)

    # backward: reduce-scatter each bucket as soon as its gradients are complete
    def _on_grad(self, p):
        if not self.callback_queued:  # at the end of this backward, flush what is left and collect
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self.callback_queued = True
        i = self.bucket_of[p]
        self.ready[i] += 1
        while self.launched < len(self.buckets) and self.ready[self.launched] == len(self.buckets[self.launched]):
            self._launch(self.launched)

    def _launch(self, i):
        """Start the reduce-scatter of bucket i (in bucket order on every rank) and free its full gradients."""
        bucket = self.buckets[i]
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=self.compute_dtype, device=p.device)
                 for p in bucket]
        flat = self.weights[i].new_empty(self.padded[i])
        n = sum(g.numel() for g in grads)
        torch.cat(grads, out=flat[:n])
        flat[n:].zero_()
        if self.world == 1:  # a group of one: the whole bucket is this rank's slice, nothing to exchange
            out, work = flat, None
        else:
            out = flat.new_empty(self.chunk[i])
            work = reduce_scatter(out, flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.pending.append((i, work, out, flat))
        for p in bucket:
            p.grad = None  # a rank keeps only its slice
        self.launched += 1
        while len(self.pending) > self.in_flight:  # the oldest has long finished: collect it, freeing its flat copy
            self._collect(*self.pending.pop(0))

    def _collect(self, i, work, out, flat):
        if work is not None:
            work.wait()  # on GPUs this only makes the compute stream wait for the reduce-scatter
        mean = out.to(torch.float32)
        if self.world > 1:
            mean.div_(self.world)  # the mean over ranks
        part = self.parts[i]
        if part.grad is None:  # allocated bucket by bucket as backward frees activations, never before
            part.grad = mean
        else:  # gradient accumulation
            part.grad.add_(mean)

    def _grads(self):
        return [p.grad for p in self.parts]

    def _end_of_backward(self):
        while self.launched < len(self.buckets):  # parameters that got no gradient count as zero
            self._launch(self.launched)
        for entry in self.pending:
            self._collect(*entry)
        self.pending, self.launched, self.callback_queued = [], 0, False
        self.ready = [0] * len(self.buckets)
        self.finished = False

    # the optimizer step
    def scale(self, loss):
        """loss x the current loss scale (1 unless fp16): call .backward() on this."""
        return loss * self.loss_scale if self.dynamic else loss

    def _finish(self):
        """Once per step: undo the loss scale and find out (on all ranks) whether any gradient overflowed."""
        if self.finished:
            return
        self.finished = True
        self.overflow = False
        for p in self.parts:
            if p.grad is None:  # no backward since zero_grad()
                p.grad = torch.zeros_like(p.detach())
        if self.dynamic:
            torch._foreach_div_(self._grads(), self.loss_scale)
            bad = torch.stack([(~torch.isfinite(g)).any() for g in self._grads()]).any().float()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
            self.overflow = bool(bad.item())

    def clip_grad_norm_(self, max_norm):
        """Clip the global gradient norm (over all slices) to max_norm, as torch.nn.utils.clip_grad_norm_."""
        self._finish()
        square = torch.nn.utils.get_total_norm(self._grads()).square()
        dist.all_reduce(square, group=self.group)
        norm = square.sqrt()
        if self._fused():  # the step multiplies by it, as clip_grads_with_norm_ would have (no fp16: no overflow)
            self.clip = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        elif not self.overflow:
            torch.nn.utils.clip_grads_with_norm_(self.parts, max_norm, norm)
        return norm

    def _fused(self):
        return FUSED_STEP and triton is not None and self.master.is_cuda and not self.dynamic

    @torch.no_grad()
    def step(self, skip=None):
        """AdamW on this rank's slices, the EMA, and the all-gather of the new weights. skip (a 0-d float tensor, the
        same on every rank): 1.0 leaves weights, moments and EMA as they are (train.py's non-finite steps); a fused
        AdamW skips on the device, without waiting for it."""
        self._finish()
        if self.overflow:  # skip: the weights, the moments and the step count stay as they are
            self.skipped_steps += 1
            self.loss_scale /= 2
            self.good_steps = 0
        elif self._fused():
            self._fused_step(skip)
        elif skip is not None and not self.adamw.defaults.get("fused") and skip.item():
            pass  # a skipped step: weights, moments and EMA stay (a CPU tensor, read without waiting)
        else:
            if self.adamw.defaults.get("fused"):
                self.adamw.found_inf = skip  # None: this step runs (a flag left from an earlier step must not stay)
            self.adamw.step()  # updates the parts in place, so self.master too
            if self.ema is not None:
                self.ema.lerp_(self.master, 1 - self.ema_decay if skip is None else (1 - self.ema_decay) * (1 - skip))
            if self.dynamic:
                self.good_steps += 1
                if self.good_steps % 2000 == 0:
                    self.loss_scale *= 2
            self._gather_into_weights()
        self.finished, self.clip = False, None

    def _fused_step(self, skip):
        """step()'s work in one kernel per bucket slice (FUSED_STEP): the clip, AdamW, the EMA, the compute weights."""
        group, device = self.adamw.param_groups[0], self.master.device
        skip = torch.zeros((), device=device) if skip is None else skip.to(device, torch.float32)
        clip = torch.ones((), device=device) if self.clip is None else self.clip
        states = [self.adamw.state[part] for part in self.parts]
        for part, state in zip(self.parts, states):
            if not state:  # what torch's fused AdamW makes on its first step: checkpoints look the same
                state.update(step=torch.zeros((), device=device), exp_avg=torch.zeros_like(part),
                             exp_avg_sq=torch.zeros_like(part))
            state["step"].add_(1 - skip)
        powers = self.betas ** states[0]["step"]  # (beta1 ** step, beta2 ** step): all slices step together
        emas = [None] * len(self.parts) if self.ema is None else self._slices(self.ema)
        for i, (part, state, ema) in enumerate(zip(self.parts, states, emas)):
            out = self.weights[i] if self.world == 1 else part.new_empty(self.chunk[i], dtype=self.compute_dtype)
            _adamw_ema_kernel[(triton.cdiv(part.numel(), FUSED_STEP_BLOCK),)](
                part, part.grad, state["exp_avg"], state["exp_avg_sq"], part if ema is None else ema, out, part.numel(),
                clip, skip, powers, group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                0.0 if ema is None else 1 - self.ema_decay, HAS_EMA=ema is not None, BLOCK=FUSED_STEP_BLOCK)
            if self.world > 1:
                all_gather(self.weights[i], out, group=self.group)

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none)  # the gradient slices
        self.clip = None
        for p in self.params:
            p.grad = None

    def _gather(self, slice_tensor, dtype):
        """Yield, bucket by bucket, the full (padded,) tensor from every rank's chunk of slice_tensor (one bucket
        alive at a time: gathering all at once would cost a second full copy of the model)."""
        for i, own in enumerate(self._slices(slice_tensor)):
            full = own.new_empty(self.padded[i], dtype=dtype)
            all_gather(full, own.to(dtype).contiguous(), group=self.group)
            yield full

    def _gather_into_weights(self):
        for own, flat in zip(self._slices(self.master), self.weights):  # flat: the bucket's compute weights
            if self.world == 1:
                flat.copy_(own)
            else:
                all_gather(flat, own.to(self.compute_dtype), group=self.group)

    # checkpoints
    @torch.no_grad()
    def full_state(self, which="master"):
        """Consolidated fp32 weights {name: tensor on CPU} of the master weights or the EMA, plus the model's
        buffers: a state dict that sample.py loads. Every rank must call it (all-gathers)."""
        source = self.master if which == "master" else self.ema
        state = dict(self.buffers)
        for bucket, full in zip(self.buckets, self._gather(source, torch.float32)):
            for p, view in self._views(bucket, full):
                state[self.names[p]] = view.cpu()
        return state

    def layout(self):
        return dict(world=self.world, buckets=[[self.names[p] for p in b] for b in self.buckets])

    def state_dict(self):
        """This rank's slices: master weights, EMA, AdamW moments, loss scale, and the layout they follow."""
        return dict(layout=self.layout(), master=self.master.cpu(), adamw=self.adamw.state_dict(),
                    ema=None if self.ema is None else self.ema.cpu(),
                    scaler=dict(loss_scale=self.loss_scale, good_steps=self.good_steps, skipped_steps=self.skipped_steps))

    def recut(self, states):
        """This rank's state_dict from the slices another number of ranks wrote (states: every rank's, in rank order):
        each bucket of master weights, EMA and Adam moments is joined from their chunks and cut for this world."""
        old = states[0]["layout"]
        if old["buckets"] != self.layout()["buckets"]:
            raise ValueError(f"these optimizer slices hold {len(old['buckets'])} buckets, this run {len(self.buckets)}: "
                             "resume with the --zero-bucket-mb they were written with")
        sizes = [sum(p.numel() for p in b) for b in self.buckets]
        chunks = [math.ceil(n / old["world"]) for n in sizes]  # the writers' share of each bucket

        def bucket(i, pieces):  # the writers' chunks of bucket i -> this rank's
            full = torch.nn.functional.pad(torch.cat(pieces)[:sizes[i]], (0, self.padded[i] - sizes[i]))
            return full[self.rank * self.chunk[i]: (self.rank + 1) * self.chunk[i]].clone()

        def flat(tensors):  # one slice-layout tensor (every bucket's chunk, end to end) per writer -> this rank's
            return torch.cat([bucket(i, pieces) for i, pieces in enumerate(zip(*(t.split(chunks) for t in tensors)))])
        adam = [s["adamw"]["state"] for s in states]  # one AdamW parameter per bucket: its moments are chunks too
        moments = {i: dict(adam[0][i], **{k: bucket(i, [a[i][k] for a in adam]) for k in ("exp_avg", "exp_avg_sq")})
                   for i in adam[0]}
        return dict(layout=self.layout(), master=flat([s["master"] for s in states]),
                    ema=None if states[0]["ema"] is None else flat([s["ema"] for s in states]),
                    adamw=dict(states[0]["adamw"], state=moments), scaler=states[0]["scaler"])

    @torch.no_grad()
    def load_state_dict(self, state):
        if state["layout"] != self.layout():
            raise ValueError(f"these optimizer slices were cut for {state['layout']['world']} ranks with "
                             f"{len(state['layout']['buckets'])} buckets, this run has {self.world} ranks and "
                             f"{len(self.buckets)}: resume with the same number of processes and --zero-bucket-mb, "
                             "or start a new run from the checkpoint's model.safetensors with --init")
        self.master.copy_(state["master"])
        self.adamw.load_state_dict(state["adamw"])
        if self.ema is not None:
            self.ema.copy_(state["ema"])
        self.loss_scale, self.good_steps, self.skipped_steps = (state["scaler"][k] for k in ("loss_scale", "good_steps", "skipped_steps"))
        self._gather_into_weights()
