"""
The run folder, written and read in one place: train.py, sample.py and train_vqvae.py all go through here.

  OUTDIR/run.lock                       process id and host while a run writes there (RunLock)
  OUTDIR/log.jsonl                      train.py's records, one a log step
  OUTDIR/checkpoints/latest             the name of the newest complete step folder
  OUTDIR/checkpoints/step_0001000/      meta.json (step, data position, the run's flags, ModelConfig),
                                        model.safetensors and ema.safetensors (full fp32 weights),
                                        optimizer.pt (AdamW + loss scaler) or zero_rank{r}.pt (ZeRO-2 slices),
                                        rng_rank{r}.pt (every rank's RNG states)

Writing: save_checkpoint (atomic: a .tmp folder, flushed to disk, renamed, then `latest` replaced). Reading:
check_resume_flags (before anything loads: a resume that changes what the run is, refused), resume_newest
(training: every piece of state, from the newest step folder that reads whole), load_for_sampling (a folder's EMA
weights and meta.json), load_weights_file (a bare or released .pt/.pth/.safetensors file,
downloaded into a cache where it is a released name). Run safety: RunFolder (RunLock, claim_outdir) and
Interrupts. Weights are read through model.read_state_dict and states with weights_only=True: nothing read here
runs pickled code.
"""
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import urllib.request

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from safetensors.torch import save_file
from tqdm import tqdm

import model as M


class RunError(Exception):
    """A run that cannot go on as asked. Its message is one sentence for the user that names the fix; the scripts
    exit with it (with code, the exit status instead: an interrupt that was saved)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Unreadable(RunError):
    """A checkpoint that cannot be read whole (truncated, missing files, not tensors): the readers try an older one."""


def barrier():
    if dist.is_initialized():
        dist.barrier()


def agree(ok, device):
    """True where every rank's ok is true (one all-reduce under torchrun)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor(float(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# Writing a step folder.

def save_checkpoint(folder, step, position, model, ema, opt, scaler, args, rank):
    """Write step_XXXXXXX/ atomically: into a .tmp folder first, flushed to disk, renamed once complete, then `latest`
    is replaced atomically. A crash mid-write leaves the previous checkpoint untouched; a full disk removes the
    partial folder and says so. Under ZeRO-2 the model and EMA are gathered into full fp32 files (what sample.py
    loads) and each rank adds its slices."""
    final = os.path.join(folder, f"step_{step:07d}")
    tmp = final + ".tmp"
    if args.zero:  # collectives: every rank takes part
        weights, ema_weights = opt.full_state("master"), opt.full_state("ema")
    elif args.fsdp2:
        weights, ema_weights = full_state(model), full_state(ema)
        optimizer = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights, ema_weights = model.state_dict(), ema.state_dict()
    bad = M.nonfinite_keys(weights) + M.nonfinite_keys(ema_weights)  # the same on every rank
    if bad:  # cannot happen while non-finite steps are skipped; a checkpoint must never spread it
        raise RunError(f"step {step}: {len(bad)} weights are not finite (e.g. {bad[0]}); no checkpoint was written: "
                       "restart from the last one (--resume auto) with a lower --lr")
    rng = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with writing_checkpoint(tmp, step, rank):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
            save_file({k: v.contiguous() for k, v in ema_weights.items()}, os.path.join(tmp, "ema.safetensors"))
            if not args.zero:  # FSDP2: the whole state, keyed by parameter names, so any number of ranks reads it
                torch.save({"optimizer": optimizer if args.fsdp2 else opt.state_dict(), "scaler": scaler.state_dict()},
                           os.path.join(tmp, "optimizer.pt"))
            # batch: the epoch's batches done by all data-parallel ranks together (before: by each rank, see resume)
            meta = dict(step=step, epoch=position[0], batch=position[1], batch_of_all_ranks=True, args=vars(args),
                        model_config=M.config_dict(model))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
        barrier()
        torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))  # every rank draws its own noise
        if args.zero:
            torch.save(opt.state_dict(), os.path.join(tmp, f"zero_rank{rank}.pt"))
        sync_files(tmp, only=None if rank == 0 else f"_rank{rank}.pt")  # on disk before the rename makes it count
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(folder, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(folder, "latest.tmp"), os.path.join(folder, "latest"))
        sync_files(folder, only="latest")
    barrier()
    return final


def full_state(model):
    """An FSDP2 model's whole state dict on every rank, on the CPU (a collective)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.cpu() for k, v in state.items()}


def prune_checkpoints(folder, keep_last, keep=()):
    """Delete all but the newest keep_last step folders (0: keep every one), never the one `latest` names nor those
    in keep (the one a run resumed from)."""
    if keep_last < 1:
        return
    steps = step_folders(folder)  # `latest`'s first, then the newest to the oldest
    spared = {os.path.abspath(p) for p in [*steps[:1], *sorted(steps, reverse=True)[:keep_last], *keep] if p}
    for path in steps:
        if os.path.abspath(path) not in spared:
            shutil.rmtree(path, ignore_errors=True)


def sync_files(folder, only=None):
    """fsync the files of folder (those whose name ends with `only`), then the folder itself (its entries)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and (only is None or name.endswith(only)):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing_checkpoint(tmp, step, rank):
    """Turns a failed checkpoint write into one sentence, after deleting the partial folder. A full disk often shows
    as torch.save's "unexpected pos" or safetensors' I/O error rather than ENOSPC: the free space decides."""
    try:
        yield
    except RunError:
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        folder = os.path.dirname(tmp)
        free = shutil.disk_usage(folder).free
        previous = "the previous checkpoint is intact" if os.path.exists(os.path.join(folder, "latest")) else \
            "there is no earlier checkpoint"
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(e) or free < 256 << 20:
            raise RunError(f"no space left on device for the step {step} checkpoint in {folder} ({free >> 20} MB "
                           f"free): the partial checkpoint was removed and {previous}; free some space, then continue "
                           "with --resume auto") from e
        raise RunError(f"writing the step {step} checkpoint in {folder} failed on rank {rank} ({type(e).__name__}: "
                       f"{e}): the partial checkpoint was removed and {previous}") from e


# Reading step folders: the newest first, falling back to older ones that read whole.

def step_folders(folder, log=print):
    """The step_* folders of a checkpoints folder, the one `latest` names first, then the newest to the oldest."""
    names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"step_\d+", n)), reverse=True) \
        if os.path.isdir(folder) else []
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            named = f.read().strip()
        if named in names:
            names.remove(named)
            names.insert(0, named)
        else:
            log(f"skipping `latest`: it names {named}, which is not there")
    return [os.path.join(folder, name) for name in names]


def read_meta(checkpoint):
    """meta.json of a step folder: the step, the data position, the run's flags and its ModelConfig."""
    try:
        with open(os.path.join(checkpoint, "meta.json")) as f:
            meta = json.load(f)
        missing = [k for k in ("step", "epoch", "batch", "args", "model_config") if k not in meta]
        if missing or not isinstance(meta["model_config"], dict):
            raise KeyError(", ".join(missing) or "model_config")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Unreadable(f"its meta.json cannot be read ({type(e).__name__}: {e})") from e
    return meta


def read_weights(checkpoint, name, device):
    """model.safetensors or ema.safetensors of a step folder."""
    try:
        return M.read_state_dict(os.path.join(checkpoint, f"{name}.safetensors"), device)
    except ValueError as e:  # missing or corrupt: the sentence names the file
        raise Unreadable(str(e)) from e


def load_states(path, device):
    """An optimizer, scaler or RNG state file: tensors and plain values only (weights_only: no pickled code)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # missing, truncated, or pickled objects that weights_only refuses
        raise Unreadable(f"{os.path.basename(path)} cannot be read ({type(e).__name__})") from e


def resume(checkpoint, args, model, ema, opt, scaler, device, rank):
    """Load a step folder that save_checkpoint wrote: weights, EMA, optimizer, loss scale and this rank's RNG states.
    Returns (step, (epoch, batches done in it by all ranks)): where the loop and the data go on. Written by another
    number of processes: ZeRO-2's slices are cut again for these ranks and the RNG starts anew (said by
    check_resume_flags)."""
    meta = read_meta(checkpoint)
    writers, world = written_by(checkpoint), dist.get_world_size() if dist.is_initialized() else 1
    new_layout = layout_changed(checkpoint, meta, args, world)
    check_same_model(checkpoint, meta, model)
    adamw = opt.adamw if args.zero else opt
    kernels = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in adamw.param_groups]
    weights = read_weights(checkpoint, "model", device)
    if args.fsdp2:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)
    written_with = "--zero 2" if meta["args"].get("zero") else "DDP"
    if args.zero:  # this rank's slices: master weights, Adam moments, EMA, loss scale
        slices = [os.path.join(checkpoint, f"zero_rank{r}.pt") for r in range(writers)]
        if not all(map(os.path.exists, slices)):
            raise RunError(f"{checkpoint} has no ZeRO-2 slices (written with {written_with}): resume with the same "
                           "flags, or start from its weights with --init")
        try:
            if writers == world:  # ZeRO-2's group is every process: --sp-size does not cut its slices
                opt.load_state_dict(load_states(slices[rank], device))
            else:  # every rank reads every slice and keeps its own cut
                opt.load_state_dict(opt.recut([load_states(path, "cpu") for path in slices]))
        except ValueError as e:  # cut for another number of ranks or buckets: the message says how to go on
            raise RunError(f"{checkpoint}: {e}") from e
    else:
        if not os.path.exists(os.path.join(checkpoint, "optimizer.pt")):
            raise RunError(f"{checkpoint} was written with --zero 2: resume with --zero 2 and the same number of "
                           "processes, or start from its weights with --init")
        states = load_states(os.path.join(checkpoint, "optimizer.pt"), device)
        try:
            if args.fsdp2:  # each rank keeps its shards of the whole state
                whole = StateDictOptions(full_state_dict=True)
                set_model_state_dict(ema, read_weights(checkpoint, "ema", device), options=whole)
                set_optimizer_state_dict(model, opt, states["optimizer"], options=whole)
            else:
                ema.load_state_dict(read_weights(checkpoint, "ema", device))
                opt.load_state_dict(states["optimizer"])
            scaler.load_state_dict(states["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise Unreadable(f"its optimizer.pt does not hold this run's optimizer ({e})") from e
    for group, kept in zip(adamw.param_groups, kernels):  # this command line's values and this machine's kernels
        group.update(kept, lr=args.lr, weight_decay=args.weight_decay)  # (a GPU's fused AdamW), not the checkpoint's
    if not new_layout:
        rng = load_states(os.path.join(checkpoint, f"rng_rank{rank}.pt"), "cpu")
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # other ranks: new streams, from the seed, the step and the data-parallel rank (a sequence-parallel group
        seed = args.seed + rank // args.sp_size + 1_000_003 * meta["step"]  # draws the same; seeds the GPU's too)
        torch.manual_seed(seed)
        random.seed(seed)
    done = meta["batch"] if meta.get("batch_of_all_ranks") else meta["batch"] * data_ranks(meta["args"], writers)
    return meta["step"], (meta["epoch"], done)


def layout_changed(checkpoint, meta, args, world_size):
    """Whether this run lays the checkpoint's run out anew: another number of processes or another --sp-size."""
    return (written_by(checkpoint), meta["args"].get("sp_size") or 1) != (world_size, args.sp_size)


def data_ranks(flags, processes):
    """The data-parallel ranks of a run: its processes over its sequence-parallel size."""
    return processes // (flags.get("sp_size") or 1)


# Flags read at every step, and the autocast precision between fp32 and bf16 under DDP (a CPU demo goes on on a
# GPU): a resume takes them from the command line and says so (a lower --lr after a loss spike is the usual
# recovery). A data set or features folder may have moved: its new path is taken and said (the data position counts
# rows, so it must hold the same ones). The other flags fix what the run is: the model, and what its data position,
# global batch and RNG streams mean (batch, sizes, encoders, objective, seed, optimizer layout; the precision to or
# from fp16, or under ZeRO-2). Another number of processes or --sp-size is a new layout of the same run (said, and
# the RNG starts anew: check_resume_flags, resume). A resume that changes an exact flag is refused before
# anything loads, since it would not continue this run; --init starts a new one from its weights.
HONOURED_FLAGS = ("lr", "weight_decay", "grad_clip", "ema_decay", "min_snr", "mid_timesteps", "mask_ratios", "precision")
MOVED_FLAGS = ("data", "features")
EXACT_FLAGS = ("model", "cond", "space_scale", "time_scale", "objective", "rflow_t", "timestep_shift", "batch_size",
               "grad_accum", "seed", "num_frames", "frame_interval", "image_size", "text_encoder",
               "text_len", "vae", "vae_path", "pixel_norm", "vae_sample", "zero", "fsdp2")


def newest_meta(args):
    """(step folder, meta) of the checkpoint that --resume would read (auto: the newest readable one), or (None, None)."""
    if args.resume in (None, "auto"):
        candidates = step_folders(os.path.join(args.outdir, "checkpoints"), log=lambda *a: None)  # resume_newest says
    else:
        candidates = [args.resume]
    for checkpoint in candidates:
        try:
            return checkpoint, read_meta(checkpoint)
        except Unreadable:  # resume_newest skips it and says why
            continue
    return None, None


def changed_flags(meta, args, flags):
    """'--flag old -> new, ...' for the flags among these that args changes from the checkpoint's (empty: none)."""
    old = {"objective": "iddpm", "fsdp2": False, **meta["args"]}  # runs from before these flags: IDDPM, no FSDP2
    new = json.loads(json.dumps(vars(args)))  # as meta.json holds them: lists, not tuples
    return ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {new[k]!r}" for k in flags if k in old and old[k] != new[k])


def exact_flags(meta, args):
    """EXACT_FLAGS, and the precision where it is state: DDP keeps fp32 weights under fp32 and bf16 alike, fp16's
    loss scale and ZeRO-2's buffers are not."""
    fp16 = "fp16" in (meta["args"].get("precision"), args.precision)
    return EXACT_FLAGS + (("precision",) if args.zero or fp16 else ())


def written_by(checkpoint):
    """How many processes wrote a step folder (one RNG file each)."""
    return len([n for n in os.listdir(checkpoint) if re.fullmatch(r"rng_rank\d+\.pt", n)])


def check_resume_flags(args, world_size, log):
    """Before any encoder, model or data loads: the checkpoint that --resume will read against this command line.
    A change of an EXACT_FLAGS flag is refused (the same sentence on every rank, no collective); HONOURED_FLAGS and
    another number of processes are taken and said."""
    checkpoint, meta = newest_meta(args)
    if checkpoint is None:
        return
    if layout_changed(checkpoint, meta, args, world_size):  # weights, EMA and moments carry over; the RNG cannot
        n, sp = written_by(checkpoint), meta["args"].get("sp_size") or 1
        old, new = (data_ranks(flags, k) * args.batch_size * args.grad_accum for flags, k in ((meta["args"], n),
                                                                                             (vars(args), world_size)))
        groups = lambda k: f" in sequence-parallel groups of {k}" if k > 1 else ""
        log(f"{checkpoint} was written by {n} processes{groups(sp)}, this run has {world_size}{groups(args.sp_size)}: "
            f"the weights, EMA, optimizer state and data position carry over (the batches left of epoch "
            f"{meta['epoch']} are dealt to these ranks in turn), the global batch is {new} clips (was {old}), and the "
            "random draws (noise, timesteps, dropout) start anew from --seed and the step")
    if exact := changed_flags(meta, args, exact_flags(meta, args)):
        raise RunError(f"{checkpoint} was written with other flags ({exact}): resume with the flags it was written "
                       f"with (its meta.json), or start a new run from its weights with --init "
                       f"{os.path.join(checkpoint, 'model.safetensors')}")
    if honoured := changed_flags(meta, args, HONOURED_FLAGS):
        log(f"resuming {checkpoint} with {honoured}: from step {meta['step'] + 1} on")
    if moved := changed_flags(meta, args, MOVED_FLAGS):
        log(f"resuming {checkpoint} with {moved}: the data position counts rows, so they must be the same rows")


def interrupted(args):
    """Whether OUTDIR's newest checkpoint is a run of these flags stopped short of --steps: the same demo command
    continues it (claim_outdir starts a finished or different demo over)."""
    checkpoint, meta = newest_meta(args)
    return checkpoint is not None and meta["step"] < args.steps and not changed_flags(meta, args, exact_flags(meta, args))


def check_same_model(checkpoint, meta, model):
    """The model built here against the one the checkpoint holds (its ModelConfig): what features or encoders gave
    it (channels, caption sizes) can differ where the flags are the same."""
    runtime = ("attn", "grad_checkpoint")  # how the model computes, not what it is
    written = {k: v for k, v in meta["model_config"].items() if k not in runtime}
    ours = {k: v for k, v in M.config_dict(model).items() if k not in runtime}
    differ = [f"{k} {written.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(ours) if written.get(k) != ours.get(k)
              and not (isinstance(ours.get(k), tuple) and list(ours[k]) == written.get(k))]
    if differ:
        raise RunError(f"{checkpoint} holds another model ({meta['args'].get('model')}: {'; '.join(differ[:3])}): resume "
                       "with the flags it was trained with (its meta.json), or train this one in another --outdir")


def resume_newest(args, model, ema, opt, scaler, device, rank, log):
    """(checkpoint, step, (epoch, batch)) from --resume: the folder named, or with 'auto' the newest checkpoint in
    --outdir that reads whole (the one `latest` names first), saying which were skipped and why. (None, 0, (0, 0))
    where there is none yet."""
    if args.resume != "auto":
        if not os.path.exists(os.path.join(args.resume, "meta.json")):
            raise RunError(f"--resume {args.resume}: no checkpoint there (a folder with meta.json); pass a step_* "
                           "folder or 'auto'")
        try:
            return (args.resume, *resume(args.resume, args, model, ema, opt, scaler, device, rank))
        except Unreadable as e:
            raise RunError(f"--resume {args.resume}: {e}; resume from an older step_* folder or with --resume auto") from e
    folder = os.path.join(args.outdir, "checkpoints")
    candidates = step_folders(folder, log)
    for checkpoint in candidates:
        try:
            found = resume(checkpoint, args, model, ema, opt, scaler, device, rank)
            error = None
        except Unreadable as e:
            found, error = None, e
        if agree(error is None, device):  # every rank read its part, or all move on to an older one
            return (checkpoint, *found)
        log(f"skipping {checkpoint}: {error or 'another rank could not read its part'}")
    if candidates:
        raise RunError(f"no checkpoint in {folder} can be read whole (see above): start over with --overwrite, or "
                       "restore a copy of the folder")
    return None, 0, (0, 0)


def load_for_sampling(path, device, weights="ema"):
    """(model, meta) from a train.py folder: an experiment folder or its checkpoints/ (the step `latest` names, or
    the newest that reads whole), or one step_* folder. weights: "ema" or "model"."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        candidates = [path]
    else:
        folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        candidates = step_folders(folder)
    if not candidates:
        raise RunError(f"no checkpoint in {path}: pass an experiment folder or a checkpoints/step_* folder written "
                       "by train.py")
    for checkpoint in candidates:
        try:
            meta = read_meta(checkpoint)
            state = read_weights(checkpoint, weights, "cpu")
        except Unreadable as e:
            if len(candidates) == 1:
                raise RunError(f"{checkpoint}: {e}; sample an older step_* folder") from e
            print(f"skipping {checkpoint}: {e}")
            continue
        refuse_nonfinite(state, os.path.join(checkpoint, f"{weights}.safetensors"))
        model = M.model_from_config(meta["model_config"])
        model.load_state_dict(state)
        return model.to(device).eval(), meta
    raise RunError(f"no checkpoint in {path} can be read whole (see above): restore a copy of the folder")


def refuse_nonfinite(state, name):
    bad = M.nonfinite_keys(state)
    if bad:
        raise RunError(f"{name}: {len(bad)} weights hold NaN or infinity (e.g. {bad[0]}), so every sample would be "
                       "blank: sample an earlier checkpoint (checkpoints/step_*) or retrain with a lower --lr")


# Bare and released weights files. Released: file name -> where the original scripts download it (Open-Sora v1.0
# from its hub repo, through HF_ENDPOINT when set; DiT from Meta's server). Plain state dicts of tensors.
RELEASED = {
    **{name: ("hub", f"hpcai-tech/Open-Sora/resolve/main/{name}") for name in
       ("OpenSora-v1-16x256x256.pth", "OpenSora-v1-HQ-16x256x256.pth", "OpenSora-v1-HQ-16x512x512.pth")},
    **{name: ("url", f"https://dl.fbaipublicfiles.com/DiT/models/{name}") for name in
       ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")},
}


def weights_cache():
    return os.path.expanduser(os.environ.get("WEIGHTS_CACHE") or "~/.cache/opensora-min")


def released_url(name):
    kind, where = RELEASED[name]
    return f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{where}" if kind == "hub" else where


def download(url, path):
    """url -> path through path.part, renamed only once complete, with a progress bar."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 20):
                    bar.update(f.write(chunk))
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def fetch_weights(name):
    """A weights file: name itself where it is a file, else a released file by name, from the cache or downloaded
    into it; offline, one sentence names the file and where to put it."""
    if os.path.isfile(name):
        return name
    base = os.path.basename(name)
    if base not in RELEASED:
        raise RunError(f"--ckpt {name}: no such file or folder; pass a train.py folder, a .pt/.pth/.safetensors file "
                       f"or a released file name ({', '.join(RELEASED)})")
    path = os.path.join(weights_cache(), base)
    if os.path.isfile(path):
        return path
    url = released_url(base)
    fix = f"download {url} and put it at {path} (or pass the file's path to --ckpt)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise RunError(f"{base} is not in the cache and HF_HUB_OFFLINE forbids downloading it: {fix}")
    try:
        download(url, path)
    except OSError as e:  # URLError and socket timeouts are OSErrors
        raise RunError(f"{base} could not be downloaded ({getattr(e, 'reason', e)}): {fix}") from None
    return path


def model_for_weights(name, state, **fields):
    """The model `name` (model.PRESETS, e.g. STDiT-XL/2) shaped like the weights in state: input channels, learned
    variance, classes or caption size are read from the tensors; fields (space_scale, ...) are set as given."""
    try:
        patch = M.PRESETS[name]["patch"]
        in_channels = state["x_embedder.proj.weight"].shape[1]
        out_channels = state["final_layer.linear.weight"].shape[0] // math.prod(patch)
        shape = dict(in_channels=in_channels, learn_sigma=out_channels == 2 * in_channels)
        if "y_embedder.embedding_table.weight" in state:  # class labels; the last row is the null class
            shape.update(num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1)
        else:
            shape.update(zip(("caption_len", "caption_channels"), state["y_embedder.y_embedding"].shape))
        cross = "blocks.0.cross_attn.q_linear.weight" in state
        if M.PRESETS[name]["arch"] == "dit":
            shape.update(cond="cross" if cross else "adaln")
    except KeyError as e:
        raise RunError(f"--model {name}: {'unknown model' if name not in M.PRESETS else f'the weights lack {e}'}; "
                       f"name the architecture the file holds ({', '.join(M.PRESETS)})") from None
    return M.build_model(name, **shape, **fields)


def load_weights_file(path, name, fields, device):
    """(model, meta) for a bare weights file: the architecture `name` built to fit it, the tensors loaded."""
    if not name:
        raise RunError(f"{path} is a bare weights file: name its architecture with --model (e.g. STDiT-XL/2, "
                       "DiT-XL/2) or a --preset")
    try:
        state = M.unwrap_state_dict(M.read_state_dict(fetch_weights(path)))
        refuse_nonfinite(state, path)
        model = M.load_checkpoint(model_for_weights(name, state, **fields), state)
    except ValueError as e:  # unreadable, or keys and shapes that do not fit: the sentence says which
        raise RunError(str(e)) from None
    return model.to(device).eval(), dict(step=None, args={})


# Run safety: one live run per folder, an earlier run never overwritten unasked, interrupts end in a checkpoint.

class RunLock:
    """OUTDIR/run.lock (process id and host) while a run writes there: a second live run into the folder is refused.
    A lock whose process is gone (killed, or the machine restarted) is stale and taken over."""

    def __init__(self, outdir):
        self.path, self.held = os.path.join(outdir, "run.lock"), False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self, log=print):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == socket.gethostname() and not _alive(owner.get("pid")):
                    log(f"taking over {self.path}: its process {owner.get('pid')} is no longer running")
                elif owner:
                    raise RunError(f"another run (process {owner.get('pid')} on {owner.get('host')}) is writing to "
                                   f"{os.path.dirname(self.path)}: wait for it, choose another output folder, or "
                                   f"delete {self.path} if that run is gone") from None
                with contextlib.suppress(FileNotFoundError):  # stale, or half written by a process that died
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(dict(pid=os.getpid(), host=socket.gethostname()), f)
            self.held = True
            return
        raise RunError(f"{self.path} keeps coming back: another run is starting in {os.path.dirname(self.path)}")

    def _owner(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # gone meanwhile, or half written: stale

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def _alive(pid):
    """Whether process pid runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


class RunFolder:
    """Holds OUTDIR for one run (rank 0 takes the lock, every rank waits for the folder): an earlier run's
    checkpoints are continued or started over only when asked (claim_outdir), and checkpoints/ is made."""

    def __init__(self, args, rank, log):
        self.args, self.rank, self.log, self.lock = args, rank, log, RunLock(args.outdir)

    def __enter__(self):
        if self.rank == 0:
            self.lock.acquire(self.log)
            try:
                claim_outdir(self.args, self.log)
                os.makedirs(os.path.join(self.args.outdir, "checkpoints"), exist_ok=True)
            except BaseException:
                self.lock.release()
                raise
        barrier()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def unwritable(folder):
    """Why folder (made later, with its parents) cannot be written, as the end of a sentence; None where it can."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not os.path.isdir(existing) else "read-only"
        return f"{folder} cannot be written to ({existing} is {why}): choose a folder you can write to"
    return None


def claim_outdir(args, log):
    """An --outdir with an earlier run's checkpoints is continued only with --resume and started over only with
    --overwrite (or --demo, which says so): its checkpoints, log and samples are then deleted."""
    folder = os.path.join(args.outdir, "checkpoints")
    earlier = os.path.isdir(folder) and any(n.startswith("step_") for n in os.listdir(folder))
    if not earlier or args.resume:
        return
    if not (args.overwrite or args.demo):
        raise RunError(f"{args.outdir} holds an earlier run's checkpoints: continue it with --resume auto, start over "
                       "there with --overwrite (deletes them), or choose another --outdir")
    log(f"{args.outdir} holds an earlier run: starting over, its checkpoints, log and samples deleted "
        "(--resume auto continues a run instead)")
    shutil.rmtree(folder)
    for name in os.listdir(args.outdir):  # samples/ and train.py's other samples_* folders
        if name.startswith("samples"):
            shutil.rmtree(os.path.join(args.outdir, name), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(args.outdir, "log.jsonl"))


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before killing a job) ask the loop to finish the
    current step and write a checkpoint; a second signal aborts at once. Under torchrun the ranks agree at every step,
    through a CPU (gloo) group: one number all-reduced there waits for no GPU work, and torchrun's grace period
    (about 30 s after it forwards the signal) is shorter than many --log-every intervals."""

    def __init__(self):
        self.signal, self.previous, self.group = None, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        if dist.is_initialized():  # every rank enters here at the same point of train.run: a collective call
            self.group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C (or SIGTERM): abort now, even inside a step that never ends
        self.signal = signum
        print(f"\n{self.name}: finishing this step, then writing a checkpoint (Ctrl-C again aborts at once)",
              file=sys.stderr, flush=True)

    @property
    def name(self):
        return signal.Signals(self.signal).name

    def requested(self):
        """Whether to stop after this step: on every rank once any rank was signalled."""
        if self.group is None:
            return self.signal is not None
        asked = torch.tensor([float(self.signal is not None)])
        dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        if asked.item() and self.signal is None:
            self.signal = signal.SIGTERM  # another rank was asked
        return bool(asked.item())
