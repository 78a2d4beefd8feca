"""
Video data for Open-Sora-style training: file I/O, a CSV-manifest dataset, resolution buckets,
a synthetic demo set and a scorer that grades generated demo clips.

Shape letters: T frames, H height, W width, C channels (3, RGB). Files hold uint8 (T, H, W, C);
the model sees float (C, T, H, W) in [-1, 1], batched as (B, C, T, H, W).

    python data.py demo OUT_DIR [--num-videos N --num-frames T --size S]
    python data.py manifest FOLDER OUT.csv [--caption-from filename]
    python data.py precompute --data data.csv --out feats/ [--vae sd --text-encoder t5 ...]   # then train.py --features feats/
    torchrun --nproc_per_node=8 data.py precompute --data data.csv --out feats/                # one GPU per rank
"""
import argparse
import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
from itertools import product

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from seqparallel import init_process_group, local_device
from text import TextEncoder
from vae import build_vae

log = logging.getLogger(__name__)
# What a broken or missing file raises (av's errors subclass these). Anything else, say a TypeError in a
# transform, is a bug and should stop the run rather than be skipped as a "bad file".
UNREADABLE = (OSError, ValueError, RuntimeError, av.error.FFmpegError)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif", ".mpg", ".mpeg", ".flv"}


def is_image(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTS


def mix_seed(*numbers):
    # SeedSequence hashes (seed, epoch, index) so nearby tuples give unrelated streams.
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


# Video I/O. Images go through av too (its image2 demuxer), so one code path reads both.

class ShortVideo(ValueError):
    """A video with fewer frames than the count its frame indices were drawn from (frames: the true count)."""

    def __init__(self, message, frames):
        super().__init__(message)
        self.frames = frames


def read_video(path, indices=None):
    """Decode frames of a video or image as uint8 (T, H, W, 3); `indices` picks frames (default all)."""
    wanted, stop = (None, None) if indices is None else (set(indices), max(indices))
    kept, last = {}, None
    # One shared converter: frame.to_ndarray() builds a fresh swscale context per frame, 3x slower here.
    to_rgb = VideoReformatter()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding, free speed on long clips
        for k, frame in enumerate(container.decode(stream)):
            last = (k, frame)
            if wanted is None or k in wanted:
                kept[k] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            if stop is not None and k >= stop:
                break  # everything after the last sampled frame would be decoded for nothing
    if last is None:
        raise ValueError(f"{path} has no decodable frames")
    if indices is None:
        return torch.from_numpy(np.stack([kept[k] for k in sorted(kept)]))
    if stop - last[0] > 2:  # far past the end: the count these indices came from was wrong
        raise ShortVideo(f"{path} has {last[0] + 1} frames, fewer than the {stop + 1} asked for", last[0] + 1)
    # Headers can overstate the frame count by a frame or two: missing tail frames repeat the last one.
    tail = kept.get(last[0])
    if tail is None:
        tail = to_rgb.reformat(last[1], format="rgb24").to_ndarray()
    return torch.from_numpy(np.stack([kept.get(k, tail) for k in indices]))


def write_video(path, frames, fps=8, crf=10):
    """Write uint8 (T, H, W, 3) frames as h264 mp4; crf 10 is near-lossless (18 is 'visually lossless')."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video needs uint8 frames shaped (T, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}; convert with ((x + 1) * 127.5).clamp(0, 255).byte()")
    # yuv420p stores chroma at half resolution, so libx264 needs even sizes: drop an odd last row/column.
    frames = np.ascontiguousarray(frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2])
    with written_whole(path) as part, av.open(part, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"  # the pixel format every player decodes
        stream.options = {"crf": str(crf)}
        to_yuv = VideoReformatter()
        for frame in frames:
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            # swscale's default chroma filter smears colour ~2 pixels past an edge (ruinous at 32x32);
            # AREA averages each 2x2 block, so block-aligned edges come back nearly exact.
            container.mux(stream.encode(to_yuv.reformat(frame, format="yuv420p", interpolation="AREA")))
        container.mux(stream.encode())  # flush the frames the encoder still holds for look-ahead


@contextlib.contextmanager
def written_whole(path):
    """A partial file's name for path (its extension kept: av picks the format by it), renamed to path once the
    block ends without an error and removed where it fails: no half-written file ever carries the final name."""
    stem, ext = os.path.splitext(path)
    part = f"{stem}.part{ext}"
    try:
        yield part
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def write_png(path, image):
    """Write an (H, W, 3) uint8 image as PNG with av (no extra image library needed)."""
    image = torch.as_tensor(image)
    with written_whole(path) as part, av.open(part, "w") as container:
        stream = container.add_stream("png")
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image.numpy(), format="rgb24")))
        container.mux(stream.encode())


def probe_video(path):
    """Return dict(num_frames, fps, height, width) from the stream header (decodes only if no count)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        num_frames = stream.frames
        if num_frames == 0:  # images, webm and some avi store no count: count by decoding
            num_frames = sum(1 for _ in container.decode(stream))
        if num_frames == 0:
            raise ValueError(f"{path} has no decodable frames")
        rate = stream.average_rate or stream.guessed_rate or 0
        return dict(num_frames=num_frames, fps=float(rate),
                    height=stream.codec_context.height, width=stream.codec_context.width)


# Frame sampling and spatial resizing.

def sample_frame_indices(total, num_frames, interval, generator):
    """Pick num_frames indices `interval` apart from a random start.

    Short clips first shrink the interval (motion stays natural, the clip is still covered); clips with
    fewer than num_frames frames then repeat their last frame, so every video gives exactly num_frames."""
    # E.g. 16 frames every 3 need 46 source frames; a 20-frame clip drops to every 1 (16 of 20 frames).
    interval = max(1, min(interval, (total - 1) // max(num_frames - 1, 1)))
    span = (num_frames - 1) * interval + 1
    start = int(torch.randint(0, max(total - span, 0) + 1, (1,), generator=generator))
    return [min(start + j * interval, total - 1) for j in range(num_frames)]


def center_crop(video, size):
    """Crop float (T, C, H, W) to the centred (h, w) window."""
    h, w = size
    top, left = (video.shape[-2] - h) // 2, (video.shape[-1] - w) // 2
    return video[..., top: top + h, left: left + w]


def resize_crop(video, size):
    """Scale float (T, C, H, W) so it covers (h, w) keeping aspect, then centre-crop to (h, w)."""
    (h, w), (H, W) = size, video.shape[-2:]
    if (H, W) == (h, w):
        return video
    scale = max(h / H, w / W)
    # max() guards against rounding leaving the short side one pixel shy of the target.
    new_size = (max(h, round(H * scale)), max(w, round(W * scale)))
    # antialias=True low-pass filters when shrinking; plain bilinear would alias fine detail.
    video = F.interpolate(video, size=new_size, mode="bilinear", antialias=True, align_corners=False)
    return center_crop(video, (h, w))


# The dataset: one CSV row per clip, Open-Sora's manifest format.

def missing_manifest(csv_path):
    """The sentence for a --data manifest that is not there (None where it is): the commands check it first."""
    if not os.path.isfile(csv_path):
        return f"--data {csv_path}: no such file; write a manifest with `python data.py manifest VIDEO_FOLDER {csv_path}`"


def refuse_counts_below_one(error, args, names):
    """Call error (a parser's .error, or sys.exit) with one sentence for the first command-line count in names
    (argparse dests; None means not given) that is below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            error(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def read_manifest(csv_path):
    if missing_manifest(csv_path):
        raise FileNotFoundError(missing_manifest(csv_path))
    # newline="" lets the csv module keep quoted captions that contain line breaks intact; bytes that are not UTF-8
    # come through as lone surrogates, so one bad row is skipped (and named) instead of stopping the whole run
    rows = []
    # utf-8-sig: a byte-order mark (what some spreadsheet programs write first) is not part of the first column's name
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or None in row.values():  # more fields than the header, or fewer: a caption cut or lost
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
                raise ValueError(f"row {reader.line_num} of {csv_path} has {fields} fields and its header "
                                 f"{len(reader.fieldnames)}: quote captions that hold commas (\"a cat, sleeping\") and "
                                 "give every row a path and a caption")
            if any(_NOT_UTF8.search(value or "") for value in row.values() if isinstance(value, str)):
                log.warning("skipping row %d of %s: it is not UTF-8 text (re-save the file as UTF-8)", reader.line_num, csv_path)
                continue
            rows.append(row)
        columns = reader.fieldnames or []
    if "path" not in columns or "caption" not in columns:
        raise ValueError(f"Manifest {csv_path} needs a header row with 'path' and 'caption' columns "
                         f"(found {columns}); rebuild it with `python data.py manifest`.")
    if not rows:
        raise ValueError(f"Manifest {csv_path} has no rows; point it at a folder that holds videos.")
    return rows


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def _number(value):
    # Optional CSV columns may be missing or empty; 0 also means "unknown".
    try:
        return int(float(value)) or None
    except (TypeError, ValueError):
        return None


class VideoDataset(torch.utils.data.Dataset):
    """Clips from a CSV manifest (columns path, caption; optional num_frames, fps, height, width).

    image_size=(h, w) resizes every clip to cover (h, w) and centre-crops. image_size=None keeps the
    native size (dynamic resolution), only cropping H and W down to a multiple of size_multiple
    (16 = VAE x8 times patch 2). Items are {"video": (C, T, H, W) in [-1, 1], "caption", "index"};
    an unreadable file gives {"unreadable": index}, is counted in self.skipped, and collate() drops it.
    cache_mb keeps decoded frames in memory up to that size, so an epoch after the first decodes nothing: for a small
    data set read by the main process (the demo's); loader workers start each epoch from a fresh copy."""

    def __init__(self, csv_path, num_frames=16, frame_interval=3, image_size=(256, 256),
                 transform=None, size_multiple=16, seed=0, cache_mb=0):
        self.rows, self.csv_path = read_manifest(csv_path), csv_path
        self.cache, self.cache_left = {}, cache_mb * 2**20
        if isinstance(image_size, int):
            image_size = (image_size, image_size)  # --image-size 256 means 256x256
        self.root = os.path.dirname(os.path.abspath(csv_path))  # relative paths start here
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be (height, width) or None, got {image_size}.")
        self.num_frames, self.frame_interval = num_frames, frame_interval
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.transform, self.size_multiple, self.seed = transform, size_multiple, seed
        self.epoch, self.skipped = 0, 0
        self._warned = set()
        if self.image_size is None:
            # Native sizes decide the buckets: probe the files whose CSV row does not give them.
            for i in tqdm([i for i, r in enumerate(self.rows) if not _number(r.get("height"))
                           or not _number(r.get("width"))], desc="probing sizes", leave=False):
                try:
                    info = probe_video(self.path(i))
                    self.rows[i].update(height=info["height"], width=info["width"])
                except UNREADABLE:
                    pass  # left unknown: the clip lands in a (T, 0, 0) bucket and __getitem__ skips it

    def __len__(self):
        return len(self.rows)

    def path(self, index):
        return os.path.join(self.root, self.rows[index]["path"])

    def set_epoch(self, epoch):
        # DataLoader copies the dataset into each worker when an epoch's iterator starts, so set this
        # before iterating (and keep persistent_workers=False) for the workers to see the new epoch.
        self.epoch = epoch

    def bucket_key(self, index):
        """(T, H, W) of item `index` after sampling, resize and crop, from the CSV alone."""
        row = self.rows[index]
        T = 1 if is_image(row["path"]) else self.num_frames  # short clips are padded to num_frames
        if self.image_size is not None:
            return (T, *self.image_size)  # fixed size: one bucket for videos, one for images
        m = self.size_multiple
        height, width = _number(row.get("height")) or 0, _number(row.get("width")) or 0
        return (T, height // m * m, width // m * m)

    def __getitem__(self, index):
        try:
            video = self.load(index)
        except UNREADABLE as error:  # one bad file in millions must not stop a week-long run
            self.skipped += 1
            if index not in self._warned:  # once per file, not once per epoch
                self._warned.add(index)
                log.warning("skipping unreadable clip %s (%s)", self.path(index), error)
            return {"unreadable": index}
        return {"video": video, "caption": self.rows[index]["caption"], "index": index}

    def read(self, index, indices):
        """read_video of these frames of clip index, from the cache where it holds them (uint8, as decoded)."""
        key = (index, tuple(int(i) for i in indices))
        frames = self.cache.get(key)
        if frames is None:
            frames = read_video(self.path(index), indices)
            if frames.numel() <= self.cache_left:
                self.cache[key], self.cache_left = frames, self.cache_left - frames.numel()
        return frames

    def load(self, index):
        T, h, w = self.bucket_key(index)
        if h == 0 or w == 0:
            raise ValueError(f"size unknown or under {self.size_multiple} pixels")
        if is_image(self.rows[index]["path"]):
            frames = self.read(index, [0])
        else:
            # The CSV's frame count saves opening the file twice; without it, read the header.
            total = _number(self.rows[index].get("num_frames")) or probe_video(self.path(index))["num_frames"]
            # The generator depends on (seed, epoch, index) only: same clip window in any worker layout.
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index))
            try:
                frames = self.read(index, sample_frame_indices(total, T, self.frame_interval, generator))
            except ShortVideo as short:  # the row's num_frames overstates the file: the file's count from now on
                log.warning("%s: its row in %s says %d frames, the file has %d; sampling from those", self.path(index),
                            self.csv_path, total, short.frames)
                self.rows[index]["num_frames"] = short.frames
                frames = self.read(index, sample_frame_indices(short.frames, T, self.frame_interval, generator))
        video = rearrange(frames, "T H W C -> T C H W").float()  # F.interpolate wants channels first
        if self.image_size is None:
            video = center_crop(video, (min(h, video.shape[-2]), min(w, video.shape[-1])))
        # In native mode this only resizes when the CSV's height/width were wrong, so batches still stack.
        video = resize_crop(video, (h, w)) / 127.5 - 1  # [0, 255] -> [-1, 1], the VAE's input range
        video = rearrange(video, "T C H W -> C T H W")
        return self.transform(video) if self.transform is not None else video


def collate(batch):
    """Stack the readable items; workers are separate processes, so the unreadable ones travel in the batch (their
    manifest rows, so that a run counts each bad file once, not once per epoch)."""
    kept = [item for item in batch if "video" in item]
    return {"video": torch.stack([item["video"] for item in kept]) if kept else None,  # (B, C, T, H, W)
            "caption": [item["caption"] for item in kept],
            "index": [item["index"] for item in kept],
            "skipped": len(batch) - len(kept),
            "unreadable": [item["unreadable"] for item in batch if "unreadable" in item]}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of clips sharing one (T, H, W) key, so a run mixes lengths and resolutions unscaled.

    dataset_sizes: a dataset with bucket_key(i), or a list of (T, H, W) keys. Each epoch (set_epoch)
    shuffles within buckets, cuts batches, shuffles the batch order, and deals batches to ranks in turn;
    every rank gets the same count (drop_last drops the extras, else a few batches repeat).
    To resume mid-epoch without loading what was trained: start_batch=k skips this rank's first k batches; done=n
    skips the epoch's first n batches, dealt to any number of ranks before, and deals the rest to these ranks in
    turn (the last few, fewer than the ranks, are dropped so that every rank gets as many)."""

    def __init__(self, dataset_sizes, batch_size, shuffle=True, seed=0, rank=0, world_size=1,
                 drop_last=True, start_batch=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}; check the launcher settings.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if hasattr(dataset_sizes, "bucket_key"):
            keys = [dataset_sizes.bucket_key(i) for i in range(len(dataset_sizes))]
        else:
            keys = [tuple(key) for key in dataset_sizes]
        self.buckets = {}
        for index, key in enumerate(keys):
            self.buckets.setdefault(key, []).append(index)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.done = 0, start_batch * world_size

    def set_epoch(self, epoch, start_batch=0, done=None):
        self.epoch, self.done = epoch, start_batch * self.world_size if done is None else done

    def batches_per_rank(self):
        sizes = [len(indices) for indices in self.buckets.values()]
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes) // self.world_size
        return math.ceil(sum(math.ceil(n / self.batch_size) for n in sizes) / self.world_size)

    def __len__(self):
        return max(self.batches_per_rank() * self.world_size - self.done, 0) // self.world_size

    def __iter__(self):
        # Every rank builds the same global list from (seed, epoch), then takes its own share.
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        batches = []
        for key in sorted(self.buckets):  # sorted: dict order must not depend on the CSV's order
            indices = self.buckets[key]
            if self.shuffle:
                indices = [indices[j] for j in torch.randperm(len(indices), generator=generator)]
            for s in range(0, len(indices), self.batch_size):
                if len(indices[s: s + self.batch_size]) == self.batch_size or not self.drop_last:
                    batches.append(indices[s: s + self.batch_size])
        if self.shuffle:  # mixes buckets over the epoch instead of one resolution after another
            batches = [batches[j] for j in torch.randperm(len(batches), generator=generator)]
        # Pad by repeating batches from the start (as DistributedSampler does) so no rank waits at a
        # collective for a batch that never comes; with drop_last the surplus is cut instead.
        needed = self.batches_per_rank() * self.world_size
        batches += [batches[j % len(batches)] for j in range(max(needed - len(batches), 0))]
        # Dealing in turn keeps each rank's order a fixed subsequence, so a resume on as many ranks is exact
        yield from batches[self.done + self.rank: needed: self.world_size][: len(self)]


# Demo set: coloured shapes moving on a dark background, a task a small model learns on a CPU.

# Hues far apart, each with one channel >= 200 so it stands 184+ above the background in that channel;
# the closest pair (red, yellow) is still 180 apart, far beyond h264's few-level colour error.
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx), rows grow down
BACKGROUND = (16, 16, 16)  # dark grey; the scorer finds the shape as "clearly brighter" than this
# All 4 colours x 4 directions, shapes cycling: the fixed prompts a trained model is scored on.
DEMO_PROMPTS = [f"a {c} {SHAPES[i % len(SHAPES)]} moving {d}"
                for i, (c, d) in enumerate(product(COLOURS, DIRECTIONS))]


def draw_shape(canvas, shape, cy, cx, r, colour):
    """Paint a shape of half-size r centred at (cy, cx) into uint8 (H, W, 3) canvas."""
    y, x = np.mgrid[0: canvas.shape[0], 0: canvas.shape[1]]
    dy, dx = y - cy, x - cx
    if shape == "circle":
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == "square":
        mask = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    else:  # triangle, apex up: half-width grows from 0 at the top to r at the base
        mask = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    canvas[mask] = colour


def make_demo_clip(colour, shape, direction, num_frames=16, size=64, rng=None):
    """One uint8 (T, H, W, 3) clip; the shape is ~1/4 of the frame and travels half of it."""
    rng = rng or np.random.default_rng()
    # r = size/8: the shape is 1/4 of the frame wide (16 px at 64^2, 2 latent pixels after the VAE's x8),
    # big enough to keep its colour through h264 and the VAE, small enough to travel half the frame.
    r, travel = size / 8, size / 2
    step = np.array(DIRECTIONS[direction]) * travel
    # Start where the whole path stays inside the frame: margin r, plus the travel on the moving side.
    low = r + np.maximum(-step, 0)
    high = size - 1 - r - np.maximum(step, 0)
    # Centred paths with a jitter of +-size/16: a distribution a small model learns in minutes, while
    # the caption alone still decides colour, shape and direction.
    start = np.clip((low + high) / 2 + rng.uniform(-1, 1, 2) * size / 16, low, high)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = BACKGROUND
        cy, cx = start + step * t / max(num_frames - 1, 1)
        draw_shape(frames[t], shape, cy, cx, r, COLOURS[colour])
    return frames


def demo_manifest(folder, num_videos, num_frames, size, write=True, log=print, colour_in_caption=True):
    """folder/demo.csv, the demo set that train.py --demo and vae.py train --demo learn from; written first (by
    make_demo_dataset) where write is true and it is not there yet. Under torchrun only rank 0 writes."""
    path = os.path.join(folder, "demo.csv")
    if write and not demo_set_is_complete(path, num_videos, num_frames, size, colour_in_caption):
        if os.path.exists(path):
            log(f"the demo set in {folder} is incomplete or was made at other settings: rebuilding it")
        log(f"writing {num_videos} demo videos to {folder}")
        make_demo_dataset(folder, num_videos, num_frames, size, colour_in_caption=colour_in_caption)
    return path


def demo_set_is_complete(path, num_videos, num_frames, size, colour_in_caption=True):
    """Whether path is a demo manifest of num_videos clips of num_frames x size x size, captions naming the colour or
    not, whose files are all there (a build that was interrupted leaves no manifest, or one of other settings)."""
    try:
        rows = read_manifest(path)
    except (OSError, ValueError):
        return False
    folder = os.path.dirname(path)
    return len(rows) == num_videos and all(
        _number(r.get("num_frames")) == num_frames and _number(r.get("height")) == size
        and (parse_caption(r["caption"])[0] is not None) == colour_in_caption
        and os.path.isfile(os.path.join(folder, r["path"])) for r in rows)


def make_demo_dataset(folder, num_videos=256, num_frames=16, size=64, fps=8, seed=0, colour_in_caption=True):
    """Write num_videos mp4 clips and folder/demo.csv; returns the CSV path. Without colour_in_caption the captions
    name the shape and the motion only (train.py --demo-i2v: the given first frame tells the colour)."""
    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = list(product(COLOURS, SHAPES, DIRECTIONS))
    # Whole shuffled rounds of the 48 combinations keep colours, shapes and directions balanced.
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(math.ceil(num_videos / len(combos)))])
    csv_path = os.path.join(folder, "demo.csv")
    with contextlib.suppress(FileNotFoundError):  # a manifest appears only once every clip is written
        os.remove(csv_path)
    with open(csv_path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "num_frames", "fps", "height", "width"])
        for i in tqdm(range(num_videos), desc="demo clips", leave=False):
            colour, shape, direction = combos[order[i]]
            name = f"videos/{i:05d}.mp4"
            clip = make_demo_clip(colour, shape, direction, num_frames, size, rng)
            write_video(os.path.join(folder, name), clip, fps)
            caption = f"a {colour} {shape} moving {direction}"
            writer.writerow([name, caption if colour_in_caption else colourless(caption), num_frames, fps, size, size])
    os.replace(csv_path + ".tmp", csv_path)
    return csv_path


# Scorer: reads colour and direction back from pixels, so generated demo clips grade themselves.

def blob_labels(mask):
    """Connected regions (4-neighbour) of a bool (H, W) mask: int labels (H, W), 0 off the mask. Each pixel takes
    its smallest neighbouring label until nothing changes (as many rounds as the widest region is long)."""
    H, W = mask.shape
    none = H * W + 1
    labels = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        smallest = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        smallest = np.where(mask, smallest, none)
        if (smallest == labels).all():
            return np.where(mask, labels, 0)
        labels = smallest


def find_shape(foreground, min_area=0.01, max_area=0.2, min_share=0.8, min_fill=0.35):
    """(rows, cols) of the one compact shape in a bool (H, W) foreground, or None: its largest connected region
    must cover min_area to max_area of the frame, hold min_share of all foreground pixels (the rest of the frame is
    plain background) and fill min_fill of its bounding box (a circle fills 0.79, a triangle 0.5; speckle less)."""
    if not foreground.any():
        return None
    labels = blob_labels(foreground)
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    area = sizes.max()
    rows, cols = np.nonzero(labels == ids[sizes.argmax()])
    box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    if not min_area * foreground.size <= area <= max_area * foreground.size or area < min_share * foreground.sum() \
            or area < min_fill * box:
        return None
    return rows, cols


def describe_video(frames, margin=64, min_frames=0.75, min_motion=0.1):
    """Return (colour or None, direction or None) of the one shape in uint8 (T, H, W, 3) frames, as a person
    would name them; (None, None) unless one compact shape stands on a plain background in min_frames of them.

    margin: how far (strongest channel) from the background colour a shape pixel must be; every palette colour is
    120 or more away, h264's and a sampler's speckle rarely are. The colour is the majority of the shape pixels'
    nearest palette colours; the direction is the shape's centroid path (a least-squares line over the frames that
    show it), which must cross min_motion of the frame (demo clips cross half of it): a standing shape has none."""
    video = np.asarray(frames, dtype=np.float32)
    T, H, W, _ = video.shape
    background = np.median(video.reshape(-1, 3), axis=0)  # the shape covers ~6% of pixels
    foreground = np.abs(video - background).max(-1) > margin  # (T, H, W)
    shapes = {t: shape for t in range(T) if (shape := find_shape(foreground[t])) is not None}
    if len(shapes) < min_frames * T:
        return None, None
    palette = np.array(list(COLOURS.values()), np.float32)
    pixels = np.concatenate([video[t][rows, cols] for t, (rows, cols) in shapes.items()])
    nearest = ((pixels[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
    colour = list(COLOURS)[np.bincount(nearest, minlength=len(palette)).argmax()]
    times = np.array(list(shapes), np.float32)
    centres = np.array([(rows.mean(), cols.mean()) for rows, cols in shapes.values()])  # (n, 2): (y, x)
    slope = np.polyfit(times, centres, 1)[0] if len(times) > 1 else np.zeros(2)  # pixels per frame, (dy, dx)
    dy, dx = slope * (T - 1)
    if max(abs(dx), abs(dy)) < min_motion * max(H, W):
        return colour, None  # a standing shape has no direction
    if abs(dx) >= abs(dy):
        return colour, "right" if dx > 0 else "left"
    return colour, "down" if dy > 0 else "up"


def parse_caption(caption):
    """Return (colour or None, direction or None) named in a caption."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    return colour, direction


def score_videos(pairs):
    """pairs: (frames uint8 (T, H, W, 3), prompt). Returns dict(colour_acc, direction_acc, both_acc, n)."""
    hits = np.zeros(3)
    for frames, prompt in pairs:
        (want_c, want_d), (got_c, got_d) = parse_caption(prompt), describe_video(frames)
        hits += [got_c == want_c, got_d == want_d, got_c == want_c and got_d == want_d]
    n = len(pairs)
    acc = hits / max(n, 1)
    return dict(colour_acc=float(acc[0]), direction_acc=float(acc[1]), both_acc=float(acc[2]), n=n)


def demo_first_frames(captions, size, seed=1):
    """(len(captions), 3, size, size) in [-1, 1]: the first frame of a new demo clip of each caption (drawn here, with
    another seed than the training set's), the given frame of image-to-video on the demo."""
    rng = np.random.default_rng(seed)
    frames = [make_demo_clip(*describe_caption(c), num_frames=1, size=size, rng=rng)[0] for c in captions]  # (H, W, 3)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


def describe_caption(caption):
    """(colour, shape, direction) that a demo caption names."""
    colour, direction = parse_caption(caption)
    return colour, next(w for w in caption.split() if w in SHAPES), direction


def recoloured(caption):
    """The caption with the next demo colour: the same shape and direction."""
    colour, names = parse_caption(caption)[0], list(COLOURS)
    return caption.replace(colour, names[(names.index(colour) + 1) % len(names)], 1)


def colourless(caption):
    """The caption without its colour: "a red circle moving left" -> "a circle moving left"."""
    return " ".join(w for w in caption.split() if w not in COLOURS)


# Precomputed features (Open-Sora's "option 1"): run the frozen VAE and text encoder over a manifest once,
# store their outputs, and train from them with no encoder loaded (train.py --features). Layout of OUT:
#   settings.json              what the features were made with; a resumed run must match it
#   shard_00000.safetensors    samples [s * shard_size, (s + 1) * shard_size) of the manifest, per sample
#                              "{i}.latent" (C, T', H', W'), "{i}.text" (L, dim), "{i}.mask" (L,) bool;
#                              its metadata lists the samples (caption, shapes) and the unreadable rows
#   index.json                 the settings plus every shard's sample list, written last

FEATURE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_shard(path, rows, skipped=()):
    """rows: dicts with index, caption, video_shape, latent, text, mask. Written to path.tmp and renamed, so a
    shard file that exists is complete: this is what makes an interrupted run resumable."""
    tensors, samples = {}, []
    for row in rows:
        for key in ("latent", "text", "mask"):
            tensors[f"{row['index']}.{key}"] = row[key].contiguous()
        samples.append({"index": row["index"], "caption": row["caption"], "video_shape": list(row["video_shape"]),
                        "latent_shape": list(row["latent"].shape)})
    save_file(tensors, path + ".tmp", metadata={"samples": json.dumps(samples), "skipped": json.dumps(list(skipped))})
    os.replace(path + ".tmp", path)


def precompute(args):
    """Encode args.data into shards under args.out; under torchrun each rank encodes the shards s with
    s % world == rank on its own GPU, and rank 0 writes index.json once every shard is there."""
    distributed, device = "RANK" in os.environ, local_device()
    if distributed:
        init_process_group(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    text_encoder = TextEncoder(args.text_encoder, max_length=args.text_len, device=device)
    vae = build_vae(args.vae, path=args.vae_path, micro_batch=args.vae_micro_batch, device=device,
                    dtype=FEATURE_DTYPES[args.vae_dtype])
    size = None if args.image_size == [0, 0] else tuple(args.image_size)
    # native sizes are cropped to a multiple of the VAE's factor times the patch (2 in every published model)
    dataset = VideoDataset(args.data, args.num_frames, args.frame_interval, size, size_multiple=2 * vae.compression[1],
                           seed=args.seed)
    vae.check_size(args.num_frames, *(size or (2 * vae.compression[1],) * 2))    # now, not at the first batch
    # what train.py --features needs to rebuild the run (and sample.py the encoders): the same names as its flags
    with open(args.data, "rb") as f:  # its content, not only its path: a manifest edited in place is another one
        manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
    settings = {"manifest": os.path.abspath(args.data), "manifest_sha256": manifest_sha256, "vae": args.vae, "vae_path": args.vae_path,
                "vae_dtype": args.vae_dtype, "text_encoder": args.text_encoder,
                "text_len": text_encoder.max_length, "num_frames": args.num_frames, "frame_interval": args.frame_interval,
                "image_size": list(args.image_size), "seed": args.seed, "shard_size": args.shard_size, "dtype": args.dtype,
                "latent_channels": vae.out_channels, "compression": list(vae.compression),
                "caption_channels": text_encoder.dim}
    os.makedirs(args.out, exist_ok=True)
    settings_file = os.path.join(args.out, "settings.json")
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            before = json.load(f)
        # (folders written before manifest_sha256 was kept lack it: for them the path alone is compared)
        changed = sorted(k for k in settings if before.get(k) != settings[k] and (k in before or k != "manifest_sha256"))
        if changed:
            raise ValueError(f"{args.out} holds features made with other settings ({', '.join(changed)}): "
                             "pass the same flags to resume, or another --out")
    elif rank == 0:
        with open(settings_file + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(settings_file + ".tmp", settings_file)

    shard_file = lambda s: os.path.join(args.out, f"shard_{s:05d}.safetensors")
    shards = range(math.ceil(len(dataset) / args.shard_size))
    todo = [s for s in shards if s % world == rank and not os.path.exists(shard_file(s))]   # resume: skip finished
    dtype = FEATURE_DTYPES[args.dtype]
    bar = tqdm(total=sum(min(args.shard_size, len(dataset) - s * args.shard_size) for s in todo),
               desc=f"encoding {len(todo)} of {len(shards)} shards", disable=rank != 0, dynamic_ncols=True)
    for s in todo:
        indices = list(range(s * args.shard_size, min((s + 1) * args.shard_size, len(dataset))))
        # micro-batches of clips of one size (a native-size manifest mixes sizes), in manifest order
        batches = BucketBatchSampler([dataset.bucket_key(i) for i in indices], args.batch_size, shuffle=False, drop_last=False)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_sampler=batches,
                                             num_workers=args.num_workers, collate_fn=collate,
                                             pin_memory=device.type == "cuda")
        rows = []
        for batch in loader:
            bar.update(len(batch["index"]) + batch["skipped"])
            if batch["video"] is None:
                continue
            with torch.no_grad():
                # the posterior mean, not a draw: a draw frozen to disk would repeat the same noise every epoch
                z = vae.encode(batch["video"].to(device, non_blocking=True), sample=False)
                y, mask, _ = text_encoder.encode(batch["caption"])
            for j, i in enumerate(batch["index"]):
                rows.append({"index": i, "caption": batch["caption"][j], "video_shape": dataset.bucket_key(i),
                             "latent": z[j].to(dtype).cpu(), "text": y[j].to(dtype).cpu(), "mask": mask[j].cpu()})
        write_shard(shard_file(s), sorted(rows, key=lambda r: r["index"]),
                    skipped=sorted(set(indices) - {r["index"] for r in rows}))
    bar.close()

    if distributed:
        dist.barrier()                          # every rank's shards are on disk
    if rank == 0:
        index = dict(settings, shards=[], skipped=[])
        for s in shards:
            with safe_open(shard_file(s), "pt") as f:
                meta = f.metadata()
            index["shards"].append({"file": os.path.basename(shard_file(s)), "samples": json.loads(meta["samples"])})
            index["skipped"] += json.loads(meta["skipped"])
        index["num_samples"] = sum(len(shard["samples"]) for shard in index["shards"])
        with open(os.path.join(args.out, "index.json.tmp"), "w") as f:
            json.dump(index, f)
        os.replace(os.path.join(args.out, "index.json.tmp"), os.path.join(args.out, "index.json"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return os.path.join(args.out, "index.json")


class FeatureDataset(torch.utils.data.Dataset):
    """The samples of a precomputed folder: {"latent" (C, T', H', W'), "text" (L, dim), "mask" (L,), "caption", "index"}.

    Features are frozen: each video has the one clip window (and crop) epoch 0 of VideoDataset gave it. Samples
    keep the manifest order and their (T, H, W) bucket keys, so BucketBatchSampler deals the same batches as
    it does from the manifest (exactly the same when no row was unreadable), and resuming works the same way."""

    def __init__(self, folder):
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no index.json: write the features with `python data.py precompute "
                                    f"--data CSV --out {folder}` (an interrupted run resumes where it stopped)")
        with open(path) as f:
            self.info = json.load(f)
        self.folder = folder
        self.samples = sorted((s["index"], shard["file"], s) for shard in self.info["shards"] for s in shard["samples"])
        if not self.samples:
            raise ValueError(f"{folder} holds no samples: every clip of {self.info['manifest']} was unreadable")
        self.epoch, self._warned = 0, set()

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch  # nothing to resample: the clip windows were fixed when the features were written

    def bucket_key(self, i):
        return tuple(self.samples[i][2]["video_shape"])

    def __getitem__(self, i):
        index, file, sample = self.samples[i]
        try:  # safe_open maps the file and reads only this sample's tensors
            with safe_open(os.path.join(self.folder, file), "pt") as f:
                latent, text, mask = (f.get_tensor(f"{index}.{key}") for key in ("latent", "text", "mask"))
        except (OSError, SafetensorError) as error:  # a truncated or lost shard: skipped and counted, as a bad video
            if file not in self._warned:
                self._warned.add(file)
                log.warning("skipping the samples of unreadable shard %s (%s)", os.path.join(self.folder, file), error)
            return {"unreadable": index}
        return {"latent": latent, "text": text, "mask": mask, "caption": sample["caption"], "index": index}


def collate_features(batch):
    """Stack the readable samples (latent None where there is none), as collate() does with clips."""
    kept = [item for item in batch if "latent" in item]
    stack = lambda key: torch.stack([item[key] for item in kept]) if kept else None
    return {"latent": stack("latent"), "text": stack("text"), "mask": stack("mask"),   # (B, C, T', H', W'), (B, L, dim), (B, L)
            "caption": [item["caption"] for item in kept], "index": [item["index"] for item in kept],
            "skipped": len(batch) - len(kept), "unreadable": [item["unreadable"] for item in batch if "unreadable" in item]}


# Manifest builder and command line.

def caption_for(path, caption_from="auto"):
    """Caption from a sidecar STEM.txt when present (and allowed), else from the file name."""
    sidecar = os.path.splitext(path)[0] + ".txt"
    if caption_from == "auto" and os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            return " ".join(f.read().split())
    return " ".join(os.path.splitext(os.path.basename(path))[0].replace("_", " ").replace("-", " ").split())


def build_manifest(folder, out_csv, caption_from="auto"):
    """Probe every video and image under folder into out_csv; returns (rows written, unreadable paths)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Folder {folder} not found; pass the folder that holds your videos.")
    files = sorted(os.path.join(d, name) for d, _, names in os.walk(folder) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTS | VIDEO_EXTS)
    out_dir = os.path.dirname(os.path.abspath(out_csv))
    rows, unreadable = [], []
    for path in tqdm(files, desc="probing"):
        try:
            info = probe_video(path)
        except UNREADABLE:  # a broken file is reported at the end, never fatal
            unreadable.append(path)
            continue
        rows.append([os.path.relpath(os.path.abspath(path), out_dir), caption_for(path, caption_from),
                     info["num_frames"], round(info["fps"], 3), info["height"], info["width"]])
    os.makedirs(out_dir, exist_ok=True)
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "num_frames", "fps", "height", "width"])
        writer.writerows(rows)
    return len(rows), unreadable


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="write the moving-shapes demo set")
    demo.add_argument("out_dir")
    demo.add_argument("--num-videos", type=int, default=256)
    demo.add_argument("--num-frames", type=int, default=16)
    demo.add_argument("--size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    manifest = commands.add_parser("manifest", help="build a CSV manifest from a folder of videos/images")
    manifest.add_argument("folder")
    manifest.add_argument("out_csv")
    manifest.add_argument("--caption-from", choices=["auto", "filename"], default="auto",
                          help="auto: sidecar STEM.txt if present, else the file name")
    pre = commands.add_parser("precompute", help="encode a manifest once: latents and caption states into shards")
    pre.add_argument("--data", required=True, help="CSV manifest")
    pre.add_argument("--out", required=True, help="folder for the shards and index.json (a rerun resumes)")
    # defaults: Open-Sora v1.0's 16x256x256 config, as train.py's
    pre.add_argument("--vae", default="sd", choices=["raw", "sd", "vqvae", "video"])
    pre.add_argument("--vae-path", default=None, help="hub id or folder (default: the kind's published weights)")
    pre.add_argument("--vae-micro-batch", type=int, default=32, help="frames per VAE call")
    pre.add_argument("--vae-dtype", default="fp32", choices=list(FEATURE_DTYPES), help="the VAE's weights (train.py: fp32)")
    pre.add_argument("--text-encoder", default="t5")
    pre.add_argument("--text-len", type=int, default=None)
    pre.add_argument("--num-frames", type=int, default=16)
    pre.add_argument("--frame-interval", type=int, default=3)
    pre.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="0 0: native sizes")
    pre.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
    pre.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    pre.add_argument("--dtype", default="bf16", choices=list(FEATURE_DTYPES), help="stored latents and caption states")
    pre.add_argument("--num-workers", type=int, default=4)
    pre.add_argument("--seed", type=int, default=42, help="train.py's --seed: it picks the clip windows")
    args = parser.parse_args(argv)
    refuse_bad_values({"demo": demo, "precompute": pre}.get(args.command, parser).error, args)
    try:
        if args.command == "precompute":
            path = precompute(args)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"wrote {path}")
        elif args.command == "demo":
            path = make_demo_dataset(args.out_dir, args.num_videos, args.num_frames, args.size,
                                     seed=args.seed)
            print(f"wrote {args.num_videos} clips and {path}")
        else:
            written, unreadable = build_manifest(args.folder, args.out_csv, args.caption_from)
            for path in unreadable:
                print(f"skipped unreadable file: {path}")
            print(f"wrote {written} rows to {args.out_csv}; skipped {len(unreadable)} unreadable files")
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")


def refuse_bad_values(error, args):
    """One sentence (error: the subcommand's parser's) for a value that would write nonsense or fail later, before
    any video is written or any encoder loads."""
    if args.command == "demo":
        refuse_counts_below_one(error, args, ("num_videos", "num_frames", "size"))
    if args.command == "precompute":
        if missing_manifest(args.data):
            error(missing_manifest(args.data))
        refuse_counts_below_one(error, args, ("vae_micro_batch", "num_frames", "frame_interval", "batch_size",
                                              "shard_size", "text_len"))
        if args.image_size != [0, 0] and min(args.image_size) < 1:
            error(f"--image-size {args.image_size[0]} {args.image_size[1]}: give a positive height and width, or 0 0 "
                  "to keep each clip's own size")
        if args.num_workers < 0:
            error(f"--num-workers {args.num_workers}: give 0 or more")


if __name__ == "__main__":
    main()
