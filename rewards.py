"""Differentiable rewards r(x_0, c) for reward backpropagation, chosen by name.

Paper Sec. 3: the fine-tuning objective is max_θ E_c E_{x_0 ~ p_θ(·|c)} r(x_0, c), optimised
by backpropagating ∇r through the sampling chain. Every reward here has one signature:

    reward(x, cond) -> (B,) tensor, differentiable in x
        toy:  x (B, 2) points,            cond (B,) class labels
        SD:   x (B, 3, H, W) images in [0, 1], cond list[str] prompts

`make_reward("name")` builds one; `make_reward("pickscore:10,hpsv2:2,aesthetic:0.05")` a weighted sum
(the paper's combined reward). Heavy reward models import lazily and fail with one line naming the
missing package or the hub id / file to fetch. The paper's weight-free, hackable rewards are `symmetry`
(−mean |x − mirror(x)|) and `compressibility` (− a differentiable JPEG bit count), each with the paper's
HPSv2 : PickScore = 1 : 10 regulariser written as a sum, e.g. "symmetry:1,hpsv2:0.001,pickscore:0.01";
`symmetry_distance` and `jpeg_bits_per_pixel` (PIL, measured) are the evaluation-table numbers.

Notation: x images (B, 3, H, W) in [0, 1]; c prompts; r(x, c) reward (B,); d symmetry distance;
z = DCT/Q quantised-domain JPEG coefficients.

Run: python -c "import rewards; print(sorted(rewards.REWARDS))"
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch

Reward = Callable[[torch.Tensor, object], torch.Tensor]

# name -> factory(**kwargs) -> Reward ; filled in by the sections below
REWARDS: dict[str, Callable[..., Reward]] = {}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'a' → [('a', 1.0)];  'a:10, b:-0.5' → [('a', 10.0), ('b', -0.5)]  (spaces around names and weights
    are ignored; weights are any finite float, negative ones included). One-line ValueError for an empty name,
    a ':' without a weight, a weight that is not a finite number, or a name given twice."""
    if not isinstance(spec, str):
        raise TypeError(f"reward spec must be a string such as 'pickscore:10,hpsv2:2', got {type(spec).__name__}")
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, colon, weight = (s.strip() for s in part.partition(":"))
        if not name:
            raise ValueError(f"empty reward name in {spec!r}: write e.g. 'pickscore:10,hpsv2:2'")
        if colon and not weight:
            raise ValueError(f"reward {name!r} in {spec!r} has ':' but no weight: write '{name}:1' or just '{name}'")
        try:
            w = float(weight) if colon else 1.0
        except ValueError:
            raise ValueError(f"reward weight {weight!r} in {spec!r} is not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"reward weight {weight!r} of {name!r} in {spec!r} is not finite: use a finite number")
        if any(name == n for n, _ in terms):
            raise ValueError(f"reward {name!r} appears twice in {spec!r}: give it once, with the summed weight")
        terms.append((name, w))
    return terms


def check_reward_spec(spec: str, names: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """`parse_reward_spec`, and every name a known reward (one of `names` when given): one-line ValueError."""
    terms = parse_reward_spec(spec)
    known = sorted(REWARDS if names is None else names)
    for name, _ in terms:
        if name not in known:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(known)}")
    return terms


def weighted_sum(terms: list[tuple[Reward, float]]) -> Reward:
    """r(x, c) = Σ_i w_i r_i(x, c)."""

    def reward(x, cond):
        return sum(w * r(x, cond) for r, w in terms)

    return reward


def make_reward(spec: str, **kwargs) -> Reward:
    """Build a reward (or weighted sum) by name; kwargs go to every factory that accepts them."""
    terms = []
    for name, weight in parse_reward_spec(spec):
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(sorted(REWARDS))}")
        factory = REWARDS[name]
        accepted = inspect.signature(factory).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        terms.append((factory(**{k: v for k, v in kwargs.items() if takes_all or k in accepted}), weight))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return weighted_sum(terms)


# ----------------------------------------------------------------------------- toy rewards (2D points)
#
# Analytic rewards on the toy's ring of Gaussians (mode j at angle 2πj/modes, radius `ring_radius`;
# class c owns `modes/classes` consecutive modes). x (B, 2) points, cond (B,) long class labels.


def mode_centers(ring_radius: float = 2.0, modes: int = 8) -> torch.Tensor:
    """μ_j = R (cos 2πj/m, sin 2πj/m), (modes, 2)."""
    angle = torch.arange(modes, dtype=torch.float32) * (2 * torch.pi / modes)
    return ring_radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def class_directions(modes: int = 8, classes: int = 4) -> torch.Tensor:
    """Unit vector to the middle of each class's sector of modes, (classes, 2)."""
    if modes % classes:
        raise ValueError(f"modes ({modes}) must be a multiple of classes ({classes})")
    per = modes // classes
    angle = (torch.arange(classes, dtype=torch.float32) * per + (per - 1) / 2) * (2 * torch.pi / modes)
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def region(center: tuple[float, float] = (0.0, 2.0), region_radius: float = 0.3) -> Reward:
    """Pull to a region:  r(x) = −max(‖x − center‖ − ρ, 0)²  (0 inside the disc of radius ρ)."""
    c = torch.tensor(center, dtype=torch.float32)

    def reward(x, cond=None):
        d = (x - c.to(x.device, x.dtype)).norm(dim=-1)
        return -torch.relu(d - region_radius).pow(2)

    return reward


def class_agreement(modes: int = 8, classes: int = 4, sharpness: float = 4.0) -> Reward:
    """Agree with the class condition:  r(x, c) = log p(c | x) of a von Mises sector classifier,
    p(c | x) ∝ exp(κ cos ∠(x, u_c)) with u_c the direction of class c's sector."""
    u = class_directions(modes, classes)

    def reward(x, cond):
        cos = x @ u.to(x.device, x.dtype).T / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (B, classes)
        logp = torch.log_softmax(sharpness * cos, dim=-1)
        return logp.gather(1, torch.as_tensor(cond, device=x.device).long().view(-1, 1)).squeeze(1)

    return reward


def quality(ring_radius: float = 2.0, modes: int = 8, smoothing: float = 0.25) -> Reward:
    """Smooth "quality" score: log-density of the ring smoothed to width σ, shifted so a mode scores 0:
    r(x) = log Σ_j exp(−‖x − μ_j‖² / 2σ²)."""
    mu = mode_centers(ring_radius, modes)

    def reward(x, cond=None):
        d2 = (x[:, None, :] - mu.to(x.device, x.dtype)[None]).pow(2).sum(-1)  # (B, modes)
        return torch.logsumexp(-d2 / (2 * smoothing**2), dim=-1)

    return reward


def class_shift(modes: int = 8, classes: int = 4, sharpness: float = 4.0, shift: int = 2) -> Reward:
    """Move every class to another class's sector (a change of composition, decided by the early steps):
    r(x, c) = log p((c + shift) mod classes | x), the von Mises sector classifier of `class_agreement`.
    The base puts class c in its own sector, so at the start every sample is in the wrong place."""
    agree = class_agreement(modes, classes, sharpness)

    def reward(x, cond):
        return agree(x, (torch.as_tensor(cond, device=x.device).long() + shift) % classes)

    return reward


def mode_shift(ring_radius: float = 2.0, modes: int = 8, classes: int = 4, smoothing: float = 0.25,
               shift: int = 2) -> Reward:
    """On the ring AND in another class's sector: the `quality` log-density restricted to the modes of
    class (c + shift) mod classes,  r(x, c) = log Σ_{j ∈ sector(c + shift)} exp(−‖x − μ_j‖² / 2σ²).
    0 on a target mode, −d²/2σ² at distance d from the nearest target mode: points must leave their
    own modes for modes across the ring, and points left between modes (off the data) lose reward."""
    mu = mode_centers(ring_radius, modes)
    per = modes // classes
    owner = torch.arange(modes) // per  # (modes,) class owning each mode

    def reward(x, cond):
        target = (torch.as_tensor(cond, device=x.device).long() + shift) % classes
        d2 = (x[:, None, :] - mu.to(x.device, x.dtype)[None]).pow(2).sum(-1)  # (B, modes)
        mask = owner.to(x.device)[None] == target[:, None]  # (B, modes)
        return torch.logsumexp((-d2 / (2 * smoothing**2)).masked_fill(~mask, float("-inf")), dim=-1)

    return reward


REWARDS["region"] = region
REWARDS["class_agreement"] = class_agreement
REWARDS["quality"] = quality
REWARDS["class_shift"] = class_shift
REWARDS["mode_shift"] = mode_shift
TOY_REWARDS = ("region", "class_agreement", "quality", "class_shift", "mode_shift")
"""The rewards of 2D points (the toy world); every other reward scores images."""



# ----------------------------------------------------------------------------- image rewards (SD)
#
# Every factory: name(device="cpu", dtype=torch.float32, <weights id or path>=..., local_files_only=False)
# -> reward(images (B, 3, H, W) in [0, 1], prompts list[str]) -> (B,) float32, differentiable in images.
# Reward models are frozen (eval mode, requires_grad False); the graph flows through them to the images.
# Preprocessing is tensor maths (resize, crop, normalise), never a PIL processor. Prompt features are
# cached per prompt. Weights: a local folder/file, or a hub id read from the local cache (or downloaded
# when local_files_only=False and the network is there); anything missing fails with one line.
# Each returned reward carries `reward.models`, the tuple of its frozen networks (to inspect or move).

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP; also open_clip ViT-H-14 laion2b and BLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing, as CLIPImageProcessor / open_clip / BLIP eval transforms do it:
    (B, 3, H, W) in [0, 1] → resize the short side to `size` (bicubic, antialiased; the long side to
    int(size·long/short)), centre-crop size×size, (x − mean)/std → (B, 3, size, size)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = images
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _looks_local(name: str) -> bool:
    """A path rather than a hub id 'owner/name': absolute, relative with ./ ~ or more than one '/',
    or ending in a weights-file suffix."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")))


def _no_path(path) -> FileNotFoundError:
    return FileNotFoundError(f"no folder/file at {str(path)!r}: check the path, or pass a hub id such as 'owner/name'")


def resolve_file(name_or_path: str, filename: str, what: str, local_files_only: bool = False) -> str:
    """Path of one weights file: `name_or_path` itself if it is a file, `name_or_path/filename` if it is a
    folder, else `filename` of hub repo `name_or_path` (huggingface_hub cache; downloaded only when
    local_files_only=False and the hub can be reached). One-line error naming what to fetch."""
    import os

    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, filename)):
            raise _no_path(os.path.join(path, filename))
        return os.path.join(path, filename)
    if _looks_local(name_or_path):
        raise _no_path(name_or_path)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name_or_path, filename, local_files_only=local_files_only)
    except Exception as e:  # offline / not cached / no such repo: all end the same way for the user
        raise FileNotFoundError(
            f"{what}: {filename!r} of hub repo {name_or_path!r} is not in the local cache: fetch it with "
            f"`hf download {name_or_path} {filename}` (or pass a local path) [{type(e).__name__}]"
        ) from None


def load_pretrained(cls, name_or_path: str, what: str, local_files_only: bool = False, **kwargs):
    """`cls.from_pretrained` from a local folder or a hub id; one clear line when it is not there."""
    import os

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        try:
            return cls.from_pretrained(path, **kwargs)
        except Exception as e:
            raise ValueError(f"cannot load {what} from folder {name_or_path!r}: {_first_line(e)}") from None
    if _looks_local(name_or_path):
        raise _no_path(name_or_path)
    fetch = f"fetch it with `hf download {name_or_path}` (or pass a local folder)"
    try:
        if local_files_only:
            # the cached snapshot folder: from_pretrained(hub id, local_files_only=True) still probes the
            # network for optional files (adapter_config.json) and waits through retries when offline
            from huggingface_hub import snapshot_download

            path = snapshot_download(name_or_path, local_files_only=True)
        else:
            path = name_or_path
        return cls.from_pretrained(path, local_files_only=local_files_only, **kwargs)
    except Exception as e:  # OSError, ValueError, huggingface_hub's LocalEntryNotFoundError, …
        raise FileNotFoundError(f"cannot load {what} {name_or_path!r} from the hub cache: {fetch} "
                                f"[{type(e).__name__}]") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch pickle with torch.load(weights_only=True) only
    (tensors and plain containers; nothing else is unpickled). A {'state_dict': …} wrapper is unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a plain weights file (torch.load weights_only=True failed: "
                         f"{type(e).__name__}); convert it to .safetensors") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _frozen(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Reward model on device/dtype, eval mode (no dropout), no parameter requires grad."""
    return model.to(device, dtype).eval().requires_grad_(False)


def _cached(encode: Callable[[list[str]], torch.Tensor]) -> Callable[[list[str]], torch.Tensor]:
    """prompts → stacked rows of encode(prompts), each prompt encoded once (no grad) and kept."""
    cache: dict[str, torch.Tensor] = {}

    def lookup(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            with torch.no_grad():
                cache.update(zip(missing, encode(missing)))
        return torch.stack([cache[p] for p in prompts])

    return lookup


def _features(out) -> torch.Tensor:
    """transformers 5.x returns an output object from get_*_features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


# --- weight-free image rewards (smoke tests, CPU notebooks) -------------------------------------------

REC709 = (0.2126, 0.7152, 0.0722)


def brightness() -> Reward:
    """Mean Rec. 709 luma Y = 0.2126 R + 0.7152 G + 0.0722 B of the image, in [0, 1]; ignores the prompt.
    Not a quality measure: maximised by a white image. Cheap and exact, for smoke tests only."""

    def reward(images: torch.Tensor, prompts=None) -> torch.Tensor:
        w = torch.tensor(REC709, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * w).sum(1).flatten(1).mean(1).float()

    return reward


def saturation() -> Reward:
    """Mean over pixels of the standard deviation of (R, G, B) at that pixel: 0 for any grey image,
    at most √2/3 ≈ 0.471 (every pixel a pure primary). Smooth (unlike HSV max − min); ignores the prompt.
    Not a quality measure: maximised by garish colours. For smoke tests only."""

    def reward(images: torch.Tensor, prompts=None) -> torch.Tensor:
        return images.std(dim=1, unbiased=False).flatten(1).mean(1).float()

    return reward


REWARDS["brightness"] = brightness
REWARDS["saturation"] = saturation


# --- hackable weight-free rewards: the paper's Symmetry and Compressibility ---------------------------
#
# Both ignore the prompt and invite reward hacking (a blank or mirrored image scores best), so the paper adds
# a regulariser HPSv2 : PickScore = 1 : 10 to them. In this repo's sum syntax, with λ the regulariser's
# overall strength (not given by the paper; λ = 0.001 is this repo's example):
#     make_reward("symmetry:1,hpsv2:0.001,pickscore:0.01")          (HPSv2 : PickScore = 0.001 : 0.01 = 1 : 10)
#     make_reward("compressibility:1,hpsv2:0.001,pickscore:0.01")
# The weights multiply the raw scores as computed here (HPSv2 a cosine ≈ 0.2–0.35, PickScore 100·cos ≈ 18–23).


def symmetry_distance(images: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Horizontal-symmetry distance (lower is more symmetric), images (B, 3, H, W) in [0, 1] → (B,):

        d_p(x) = 1/(3HW) Σ_{c,i,j} |x[c, i, j] − x[c, i, W−1−j]|^p,    p = 1 by default,

    the mean over pixels and channels of the difference between the image and its left-right mirror.
    Why this form: a mean, not a sum, so it does not grow with resolution; on the [0, 1] pixel scale, so
    d = 0 exactly for a mirror-symmetric image and d = 1 at most (every pixel black facing white; i.i.d.
    uniform noise gives 1/3 for p = 1); p = 1 (mean absolute difference) keeps a constant-size gradient down
    to perfect symmetry (p = 2's vanishes there) and does not let a few very asymmetric pixels dominate.
    d(x) = d(mirror(x)). The paper's own normalisation is not known here, so values are not comparable
    with its tables in absolute terms, only in order. Not differentiable at exact symmetry for p = 1
    (torch takes the subgradient 0 there, where d is already at its minimum)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if not p >= 1:
        raise ValueError(f"symmetry exponent p must be ≥ 1 (1: mean absolute, 2: mean squared), got {p}")
    x = images.float()
    diff = (x - x.flip(-1)).abs()
    return (diff if p == 1 else diff.pow(p)).flatten(1).mean(1)


def symmetry(symmetry_p: float = 1.0) -> Reward:
    """Symmetry reward r(x) = −d_p(x) (see `symmetry_distance`): ≤ 0, and 0 exactly for a mirror-symmetric
    image. Ignores the prompt. The paper reports the distance (lower is better); this is its negative."""
    if not symmetry_p >= 1:
        raise ValueError(f"symmetry_p must be ≥ 1 (1: mean absolute, 2: mean squared), got {symmetry_p}")

    def reward(images: torch.Tensor, prompts=None) -> torch.Tensor:
        return -symmetry_distance(images, symmetry_p)

    return reward


# JPEG's example quantisation tables (ITU-T T.81 Annex K, K.1 luminance and K.2 chrominance), row-major
# (natural order, not zigzag); libjpeg/PIL scale them by the IJG quality formula of `jpeg_quant_tables`.
JPEG_LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
                   14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
                   18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                   49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
JPEG_CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                     24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def _check_quality(quality) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1…100 (PIL's scale), got {quality!r}")


def jpeg_quant_tables(quality: int = 95) -> torch.Tensor:
    """Quantisation step Q[k, u, v] of (luma, chroma) at an IJG quality, (2, 8, 8) float32:
    Q = clamp(⌊(T·s + 50) / 100⌋, 1, 255) with s = ⌊5000/quality⌋ below 50, 200 − 2·quality from 50 on
    (libjpeg's jpeg_quality_scaling; what PIL writes for `quality=`), T the Annex K tables."""
    _check_quality(quality)
    s = 5000 // quality if quality < 50 else 200 - 2 * quality  # integer division, as libjpeg does
    t = torch.tensor([JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE], dtype=torch.float64).view(2, 8, 8)
    return ((t * s + 50) / 100).floor().clamp(1, 255).float()


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """JFIF colour transform with JPEG's level shift, (B, 3, H, W) RGB in [0, 1] → (B, 3, H, W) on the
    8-bit scale centred on 0:  Y = 0.299 R + 0.587 G + 0.114 B − 128,
    Cb = −0.168736 R − 0.331264 G + 0.5 B,  Cr = 0.5 R − 0.418688 G − 0.081312 B  (R, G, B = 255·x)."""
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                     device=images.device, dtype=images.dtype)
    shift = torch.tensor([128.0, 0.0, 0.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return torch.einsum("kc,bchw->bkhw", m, 255 * images) - shift


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix, (n, n): D[k, m] = a_k cos(π (2m + 1) k / 2n), a_0 = √(1/n), a_k = √(2/n).
    D X Dᵀ of an 8×8 block is JPEG's forward DCT F(u, v) (T.81 A.3.3); the DC term is 8 × the block mean."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(torch.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] = math.sqrt(1 / n)
    return d.float()


def block_dct(channel: torch.Tensor, n: int = 8) -> torch.Tensor:
    """2-D DCT of every n×n block: (B, H, W) with H, W multiples of n → (B, H/n, W/n, n, n), block (i, j)
    = D X_ij Dᵀ with X_ij = channel[:, n·i : n·i + n, n·j : n·j + n]."""
    b, h, w = channel.shape
    blocks = channel.reshape(b, h // n, n, w // n, n).transpose(2, 3)  # (B, H/n, W/n, n, n)
    d = dct_matrix(n).to(channel.device, channel.dtype)
    return d @ blocks @ d.T


def jpeg_bits_estimate(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Differentiable estimate of a baseline JPEG's entropy-coded size, in bits per pixel, images (B, 3, H, W)
    in [0, 1] → (B,). JPEG's own pipeline up to the entropy coder, then a smooth bit count:

        edge-pad to a multiple of 16 → YCbCr (`rgb_to_ycbcr`) → Cb, Cr averaged over 2×2 (4:2:0)
        → 8×8 block DCT (`block_dct`) → z = F / Q (`jpeg_quant_tables`), DC as the difference to the
        previous block in scan order (DPCM; luma blocks in 16×16-MCU order)
        bits(x) = 1/(HW) Σ_{channels, blocks, (u, v)} log2(1 + |z_uv|).

    Why: JPEG codes each non-zero quantised coefficient q with its magnitude category ⌈log2(|q| + 1)⌉ extra
    bits plus a Huffman code for (zero run, category), and zeros almost for free inside runs / end-of-block.
    log2(1 + |z|) is that category before rounding: 0 for z = 0, continuous and differentiable (the
    subgradient 0 at z = 0), growing like the bits. It leaves out the Huffman code lengths and the headers,
    so it is below the measured size (`jpeg_bits_per_pixel`); tests check that it ranks images (smooth,
    striped, noisy) as the measured size does, and that ascending its negative shrinks the real file.
    Computed in float32 with autocast off (bf16 DCTs would blur the small coefficients it counts)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    q = jpeg_quant_tables(quality).to(images.device)
    h, w = images.shape[-2:]
    with torch.autocast(images.device.type, enabled=False):
        x = torch.nn.functional.pad(images.float(), (0, -w % 16, 0, -h % 16), mode="replicate")
        ycc = rgb_to_ycbcr(x)
        b, _, hp, wp = ycc.shape
        luma = block_dct(ycc[:, 0])  # (B, Hp/8, Wp/8, 8, 8)
        luma = luma.reshape(b, hp // 16, 2, wp // 16, 2, 8, 8).transpose(2, 3).reshape(b, -1, 8, 8)  # MCU order
        chroma = torch.nn.functional.avg_pool2d(ycc[:, 1:], 2)  # (B, 2, Hp/2, Wp/2)
        bits = torch.zeros(b, device=images.device)
        for blocks, table in ((luma, q[0]), (block_dct(chroma[:, 0]).flatten(1, 2), q[1]),
                              (block_dct(chroma[:, 1]).flatten(1, 2), q[1])):
            z = blocks / table  # (B, N, 8, 8) in units of the quantisation step
            dc = z[:, :, 0, 0]
            dc_diff = dc - torch.nn.functional.pad(dc[:, :-1], (1, 0))  # DPCM, first block against 0
            ac = z.flatten(2)[:, :, 1:]
            bits = bits + torch.log2(1 + dc_diff.abs()).sum(1) + torch.log2(1 + ac.abs()).sum((1, 2))
    return bits / (h * w)


def jpeg_bits_per_pixel(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Measured baseline-JPEG size, bits per pixel = 8 · bytes / (H·W), (B, 3, H, W) in [0, 1] → (B,) float64:
    each image rounded to 8 bits and encoded in memory by PIL at `quality`, 4:2:0 chroma subsampling,
    standard Huffman tables (no `optimize`); the file includes its headers (≈ constant at a fixed quality).
    Not differentiable (no gradient; for evaluation tables). bytes = bpp · H·W / 8."""
    import io

    import numpy as np
    from PIL import Image

    _check_quality(quality)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality, subsampling=2)
        sizes.append(8 * buf.getbuffer().nbytes / (a.shape[0] * a.shape[1]))
    return torch.tensor(sizes, dtype=torch.float64)


def compressibility(jpeg_quality: int = 95) -> Reward:
    """Compressibility reward r(x) = −`jpeg_bits_estimate`(x, jpeg_quality): the differentiable stand-in for
    minus the JPEG file size (the size itself, `jpeg_bits_per_pixel`, has no gradient). Ignores the prompt.
    ≤ 0; for a constant image only the first block's DC coefficient costs bits (0 at grey 128/255)."""
    _check_quality(jpeg_quality)

    def reward(images: torch.Tensor, prompts=None) -> torch.Tensor:
        return -jpeg_bits_estimate(images, jpeg_quality)

    return reward


REWARDS["symmetry"] = symmetry
REWARDS["compressibility"] = compressibility


# --- CLIP score ----------------------------------------------------------------------------------------


def clipscore(device="cpu", dtype=torch.float32, clip_model: str = "openai/clip-vit-large-patch14",
              local_files_only: bool = False) -> Reward:
    """CLIP score (Hessel et al. 2021, without the 2.5·max(·, 0) rescaling): cos(E_img(x), E_txt(c))
    between the L2-normalised CLIP image and prompt embeddings, in [−1, 1] (≈ 0.2–0.35 for matching pairs)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = _frozen(load_pretrained(CLIPModel, clip_model, "CLIP model", local_files_only), device, dtype)
    tokenizer = load_pretrained(CLIPTokenizer, clip_model, "CLIP tokenizer", local_files_only)
    size = model.config.vision_config.image_size

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(device)
        return _normalize(_features(model.get_text_features(input_ids=ids)))

    text = _cached(encode)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device, torch.float32), size).to(dtype)
        img = _normalize(_features(model.get_image_features(pixel_values=pixels)))
        return (img * text(list(prompts))).sum(-1)

    reward.models = (model,)
    return reward


REWARDS["clipscore"] = clipscore


# --- LAION aesthetic predictor -------------------------------------------------------------------------

AESTHETIC_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


class AestheticMLP(torch.nn.Module):
    """LAION improved-aesthetic-predictor head: e (B, d) → score (B, 1) through Linear layers
    d→1024→128→64→16→1 with Dropout(0.2, 0.2, 0.1) between and no activations (so it is affine in e).
    State-dict keys layers.{0,2,4,6,7}.{weight,bias}, as in sac+logos+ava1-l14-linearMSE.pth."""

    def __init__(self, sizes=(768, 1024, 128, 64, 16, 1)):
        super().__init__()
        d = sizes
        nn = torch.nn
        self.layers = nn.Sequential(nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
                                    nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.layers(e)


def aesthetic_head(state_dict: dict[str, torch.Tensor]) -> AestheticMLP:
    """An AestheticMLP with the widths read off `state_dict` (768→…→1 for the LAION file) and its weights."""
    if sorted(state_dict) != sorted(AESTHETIC_KEYS):
        raise ValueError(f"not a LAION aesthetic head: expected keys {AESTHETIC_KEYS}, got {sorted(state_dict)[:10]}")
    sizes = [state_dict["layers.0.weight"].shape[1]] + [state_dict[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
    head = AestheticMLP(sizes)
    head.load_state_dict(state_dict)
    return head


def aesthetic(device="cpu", dtype=torch.float32, clip_model: str = "openai/clip-vit-large-patch14",
              aesthetic_head_path: str = "trl-lib/ddpo-aesthetic-predictor",
              aesthetic_head_file: str = "aesthetic-model.pth", local_files_only: bool = False) -> Reward:
    """LAION aesthetic score: MLP(e / ‖e‖), e = CLIP ViT-L/14 image embedding (`image_embeds`). Ignores
    the prompt. Roughly a 1–10 rating scale (SD 1.5 samples ≈ 5–6.5). The head is a local .pth
    (weights_only) / .safetensors file, a folder holding `aesthetic_head_file`, or that file of a hub repo."""
    from transformers import CLIPVisionModelWithProjection

    clip = load_pretrained(CLIPVisionModelWithProjection, clip_model, "CLIP vision model", local_files_only)
    clip = _frozen(clip, device, dtype)
    path = resolve_file(aesthetic_head_path, aesthetic_head_file, "aesthetic head", local_files_only)
    head = _frozen(aesthetic_head(load_weights_file(path)), device, torch.float32)
    if head.layers[0].in_features != clip.config.projection_dim:
        raise ValueError(f"aesthetic head takes {head.layers[0].in_features}-d embeddings but {clip_model!r} "
                         f"gives {clip.config.projection_dim}-d: use CLIP ViT-L/14 with the LAION head")
    size = clip.config.image_size

    def reward(images: torch.Tensor, prompts=None) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device, torch.float32), size).to(dtype)
        return head(_normalize(clip(pixel_values=pixels).image_embeds)).squeeze(-1)

    reward.models = (clip, head)
    return reward


REWARDS["aesthetic"] = aesthetic


# --- PickScore -----------------------------------------------------------------------------------------


def pickscore(device="cpu", dtype=torch.float32, pickscore_model: str = "yuvalkirstain/PickScore_v1",
              pickscore_tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
              local_files_only: bool = False) -> Reward:
    """PickScore (Kirstain et al. 2023): exp(logit_scale) · cos(E_img(x), E_txt(c)) of a CLIP ViT-H/14
    fine-tuned on Pick-a-Pic; exp(logit_scale) = 100 for the released model, scores ≈ 18–23."""
    from transformers import AutoModel, AutoTokenizer

    model = _frozen(load_pretrained(AutoModel, pickscore_model, "PickScore model", local_files_only), device, dtype)
    tokenizer = load_pretrained(AutoTokenizer, pickscore_tokenizer, "PickScore tokenizer", local_files_only)
    size = model.config.vision_config.image_size
    scale = model.logit_scale.detach().float().exp()

    def encode(prompts: list[str]) -> torch.Tensor:
        tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").to(device)
        return _normalize(_features(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)))

    text = _cached(encode)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device, torch.float32), size).to(dtype)
        img = _normalize(_features(model.get_image_features(pixel_values=pixels)))
        return scale * (img * text(list(prompts))).sum(-1)

    reward.models = (model,)
    return reward


REWARDS["pickscore"] = pickscore


# --- HPSv2 ---------------------------------------------------------------------------------------------


def _import_optional(module: str, package: str, reward: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or module.split(".")[0] == e.name.split(".")[0]:
            raise ModuleNotFoundError(f"reward {reward!r} needs the optional package {package}: "
                                      f"pip install {package} (see requirements-extras.txt)") from None
        raise ImportError(f"reward {reward!r}: the installed {package} does not import here ({e}); "
                          f"see requirements-extras.txt for versions that work") from None
    except ImportError as e:
        raise ImportError(f"reward {reward!r}: the installed {package} does not import here ({e}); "
                          f"see requirements-extras.txt for versions that work") from None


def hpsv2(device="cpu", dtype=torch.float32, hpsv2_checkpoint: str = "xswu/HPSv2",
          hpsv2_file: str = "HPS_v2.1_compressed.pt", hpsv2_arch: str = "ViT-H-14",
          local_files_only: bool = False) -> Reward:
    """HPSv2 / v2.1 (Wu et al. 2023): cos(E_img(x), E_txt(c)) of an open_clip ViT-H/14 fine-tuned on human
    preferences, as HPSv2's own scorer computes it (no logit scale); ≈ 0.2–0.35. `hpsv2_arch` is an
    open_clip model name or 'local-dir:/folder' with an open_clip_config.json; weights from a local file
    or `hpsv2_file` of a hub repo, loaded with weights_only=True. Needs open-clip-torch. Checked against
    HPSv2's own (vendored open_clip) scoring on a full-size, randomly perturbed ViT-H-14: |Δ| < 1e-7."""
    open_clip = _import_optional("open_clip", "open-clip-torch", "hpsv2")
    path = resolve_file(hpsv2_checkpoint, hpsv2_file, "HPSv2 checkpoint", local_files_only)
    model = open_clip.create_model(hpsv2_arch, pretrained=None)
    try:  # open_clip's loader: weights_only=True, unwraps 'state_dict', converts older layouts
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load HPSv2 weights {path!r} into open_clip {hpsv2_arch!r}: {_first_line(e)}") from None
    model = _frozen(model, device, dtype)
    tokenizer = open_clip.get_tokenizer(hpsv2_arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD

    text = _cached(lambda prompts: _normalize(model.encode_text(tokenizer(prompts).to(device))))

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device, torch.float32), size, mean, std).to(dtype)
        return (_normalize(model.encode_image(pixels)) * text(list(prompts))).sum(-1)

    reward.models = (model,)
    return reward


REWARDS["hpsv2"] = hpsv2


# --- ImageReward ---------------------------------------------------------------------------------------

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's own (r − μ)/σ


def blip_vision_from_imagereward(sd: dict[str, torch.Tensor], prefix: str = "blip.visual_encoder."):
    """ImageReward's BLIP ViT (timm layout: cls_token, pos_embed, blocks.N.{norm1,attn.qkv,attn.proj,norm2,
    mlp.fc1,mlp.fc2}, norm) as transformers' BlipVisionModel (same maths: pre-norm ViT, LayerNorm eps 1e-6,
    exact GELU, fused qkv, final LayerNorm on every token). Widths are read off the weights; heads = width/64."""
    from transformers import BlipVisionConfig, BlipVisionModel

    v = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
    width, patch = v["cls_token"].shape[-1], v["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in v if k.startswith("blocks."))
    config = BlipVisionConfig(hidden_size=width, intermediate_size=v["blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=depth, num_attention_heads=max(1, width // 64), patch_size=patch,
                              image_size=patch * round((v["pos_embed"].shape[1] - 1) ** 0.5), layer_norm_eps=1e-6,
                              hidden_act="gelu")
    blocks = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}

    def rename(k: str) -> str:
        if k in ("cls_token", "pos_embed"):
            return {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}[k]
        if k.startswith(("patch_embed.proj.", "norm.")):
            return k.replace("patch_embed.proj.", "embeddings.patch_embedding.").replace("norm.", "post_layernorm.")
        _, n, *sub, param = k.split(".")  # blocks.N.<sub>.<param>
        return f"encoder.layers.{n}.{blocks['.'.join(sub)]}.{param}"

    converted = {rename(k): t for k, t in v.items()}
    model = BlipVisionModel(config)
    model.load_state_dict(converted, strict=True)
    return model


def blip_text_from_imagereward(sd: dict[str, torch.Tensor], med_config: dict, vision_width: int,
                               prefix: str = "blip.text_encoder."):
    """ImageReward's BLIP text encoder (BERT with cross-attention to the image tokens in every layer,
    `med` in BLIP) as transformers' BlipTextModel, the port of the same code: same key names."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id", "sep_token_id")
    # config.is_decoder (default True) only builds the cross-attention layers; the forward pass stays
    # bidirectional (is_decoder=False there), as BLIP's 'multimodal' encoder mode
    config = BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config}, encoder_hidden_size=vision_width)
    model = BlipTextModel(config, add_pooling_layer=False)
    t = {k[len(prefix):]: w for k, w in sd.items() if k.startswith(prefix) and not k.endswith("position_ids")}
    result = model.load_state_dict(t, strict=False)  # position_ids is a buffer, in either file or not
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"ImageReward text encoder weights do not fit BLIP's: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    return model


def imagereward(device="cpu", dtype=torch.float32, imagereward_checkpoint: str = "THUDM/ImageReward",
                imagereward_tokenizer: str = "google-bert/bert-base-uncased", local_files_only: bool = False) -> Reward:
    """ImageReward (Xu et al. 2023), scored from an image tensor as its ReFL code does (score_gard): BLIP
    ViT-L/16 on the 224 px CLIP-normalised image, BERT text encoder cross-attending to the image tokens
    (prompt ids, max 35 tokens, cached), MLP on the [CLS] feature, (r − 0.1672)/1.0333; ≈ −2…2, 0 ≈ average.
    Re-implemented on transformers' BLIP classes (the image-reward package does not import with
    transformers 5): ImageReward.pt (weights_only=True) + med_config.json from a folder or hub repo.
    Checked against image-reward 1.5's score_gard on a full-size, randomly perturbed model: identical."""
    import json

    from transformers import BertTokenizer

    weights = resolve_file(imagereward_checkpoint, "ImageReward.pt", "ImageReward weights", local_files_only)
    med_path = resolve_file(imagereward_checkpoint, "med_config.json", "ImageReward BLIP config", local_files_only)
    tokenizer = load_pretrained(BertTokenizer, imagereward_tokenizer, "ImageReward (BERT) tokenizer", local_files_only)
    sd = load_weights_file(weights)
    with open(med_path) as f:
        med_config = json.load(f)
    vision = _frozen(blip_vision_from_imagereward(sd), device, dtype)
    text = _frozen(blip_text_from_imagereward(sd, med_config, vision.config.hidden_size), device, dtype)
    head = _frozen(aesthetic_head({k[4:]: w for k, w in sd.items() if k.startswith("mlp.")}), device, torch.float32)

    def encode(prompts: list[str]) -> torch.Tensor:
        tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        return torch.stack([tok.input_ids, tok.attention_mask], 1)  # (B, 2, 35): ids and mask

    tokens = _cached(encode)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device, torch.float32), vision.config.image_size).to(dtype)
        tok = tokens(list(prompts)).to(device)
        feats = vision(pixel_values=pixels).last_hidden_state  # (B, 1 + N, 1024) image tokens
        atts = torch.ones(feats.shape[:-1], dtype=torch.long, device=device)
        out = text(input_ids=tok[:, 0], attention_mask=tok[:, 1], encoder_hidden_states=feats,
                   encoder_attention_mask=atts, return_dict=True)
        r = head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    reward.models = (vision, text, head)
    return reward


REWARDS["imagereward"] = imagereward


# --- digit classifier (miniature SD on scikit-learn's digits) ------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitClassifier(torch.nn.Module):
    """A small CNN: images (B, 3, H, W) in [0, 1] → resized to image_size² (bilinear, antialiased) →
    [3×3 conv, SiLU, 2×2 max-pool] per width in `channels` → flatten → linear → logits (B, classes).
    `minisd.py` trains it on scikit-learn's digits; `config` (image_size, channels, classes) is the JSON
    file next to the weights."""

    def __init__(self, image_size: int = 16, channels=(32, 64), classes: int = 10):
        super().__init__()
        self.config = dict(image_size=image_size, channels=list(channels), classes=classes)
        nn, layers, width = torch.nn, [], 3
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
            width = c
        self.image_size = image_size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * (image_size // 2 ** len(channels)) ** 2, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = torch.nn.functional.interpolate(images, size=(self.image_size,) * 2, mode="bilinear",
                                                     align_corners=False, antialias=True)
        return self.head(self.features(images).flatten(1))


def digit_in_prompt(prompt: str) -> int:
    """The one digit a prompt names, as a numeral ('a handwritten 7') or a word ('seven'); one-line
    error when it names none or several."""
    import re

    found = {int(d) for d in re.findall(r"(?<!\d)\d(?!\d)", prompt)}
    found |= {DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", prompt.lower()) if w in DIGIT_WORDS}
    if len(found) != 1:
        what = "names no digit" if not found else f"names several digits {sorted(found)}"
        raise ValueError(f"digit reward: prompt {prompt!r} {what}: write one digit, e.g. 'a handwritten 7'")
    return found.pop()


def save_digit_classifier(model: "DigitClassifier", weights) -> None:
    """Write the classifier as `load_digit_classifier` reads it: weights (runio.save_tensors, with a checksum and the
    config in its metadata) and the config as the .json of the same name."""
    import json
    import os

    import runio

    runio.save_tensors(model.state_dict(), weights, {"config": json.dumps(model.config, sort_keys=True)})
    runio.write_json(model.config, os.path.splitext(str(weights))[0] + ".json")


def load_digit_classifier(weights: str, config: str) -> "DigitClassifier":
    """The classifier of the `digit` reward from its weights (.safetensors) and config (.json), checked before use: the
    config a JSON object of DigitClassifier's arguments, the weights its keys and shapes, finite and of trained size
    (runio.check_weights_finite: a NaN classifier makes every reward NaN), and the config the one saved in the
    weights' metadata (`save_digit_classifier`). ValueError (one line) naming the file."""
    import json

    import runio

    count = lambda v, lo, hi: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
        if not (isinstance(cfg, dict) and set(cfg) <= {"image_size", "channels", "classes"}
                and count(cfg.get("image_size", 16), 4, 512) and count(cfg.get("classes", 10), 10, 10_000)
                and isinstance(cfg.get("channels", []), list) and len(cfg.get("channels", [])) <= 8
                and all(count(c, 1, 4096) for c in cfg.get("channels", []))):
            raise ValueError("not image_size (4 … 512), channels (a list of widths), classes (≥ 10)")
        model = DigitClassifier(**cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"digit classifier config {config!r} is damaged ({_first_line(e)}): run `python minisd.py` "
                         "again") from None
    try:
        if str(weights).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                saved = (f.metadata() or {}).get("config")
            if saved is not None and json.loads(saved) != cfg:
                raise runio.CheckpointError(f"its config {config!r} is not the one its weights were saved with")
        state = runio.load_tensors(weights) if str(weights).endswith(".safetensors") else load_weights_file(weights)
        runio.check_weights_finite(state, f"digit classifier {weights!r}")
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # runio.CheckpointError is a ValueError
        raise ValueError(f"digit classifier {weights!r} is damaged ({_first_line(e)[:200]}): run `python minisd.py` "
                         "again") from None
    except OSError:
        raise
    except Exception as e:  # safetensors' own error type
        raise ValueError(f"digit classifier {weights!r} is not a readable weights file ({type(e).__name__}): run "
                         "`python minisd.py` again") from None
    return model


def digit(device="cpu", dtype=torch.float32, digit_classifier: str = "runs/minisd/classifier.safetensors") -> Reward:
    """log p(d | x) of the digit d named in the prompt, under the `DigitClassifier` that `minisd.py`
    trains on scikit-learn's digits: log-softmax of its logits (B, 10) at d, ≤ 0 (0 = certain). Weights:
    `digit_classifier` (.safetensors) with its config as the .json of the same name."""
    import os

    config = os.path.splitext(digit_classifier)[0] + ".json"
    if not (os.path.isfile(digit_classifier) and os.path.isfile(config)):
        raise FileNotFoundError(f"digit classifier {digit_classifier!r} (+ .json config) not found: run "
                                f"`python minisd.py` to train it, or pass digit_classifier=<path to .safetensors>")
    model = load_digit_classifier(digit_classifier, config)
    model = _frozen(model, device, dtype)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        target = torch.tensor([digit_in_prompt(p) for p in prompts], device=device)
        logp = torch.log_softmax(model(images.to(device, dtype)).float(), dim=-1)  # (B, classes)
        return logp.gather(1, target[:, None]).squeeze(1)

    reward.models = (model,)
    return reward


REWARDS["digit"] = digit
