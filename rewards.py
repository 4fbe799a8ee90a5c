"""Differentiable rewards r(x_0, c) for reward backpropagation, chosen by name.

Paper Sec. 3 / Sec. 4: the fine-tuning objective is max_θ E_c E_{x_0 ~ p_θ(·|c)} r(x_0, c), optimised
by backpropagating ∇r through the sampling chain. Every reward here has one signature:

    reward(x, cond) -> (B,) tensor, differentiable in x
        toy:  x (B, 2) points,            cond (B,) class labels
        SD:   x (B, 3, H, W) images in [0, 1], cond list[str] prompts

`make_reward("name")` builds one; `make_reward("pickscore:10,hpsv2:2,aesthetic:0.05")` a weighted sum
(the paper's combined reward). Heavy reward models import lazily and fail with one line naming the
missing package or the hub id / file to fetch.

Run: python -c "import rewards; print(sorted(rewards.REWARDS))"
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

Reward = Callable[[torch.Tensor, object], torch.Tensor]

# name -> factory(**kwargs) -> Reward ; filled in by the sections below
REWARDS: dict[str, Callable[..., Reward]] = {}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'a' → [('a', 1.0)];  'a:10,b:2' → [('a', 10.0), ('b', 2.0)]."""
    terms = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if not name:
            raise ValueError(f"empty reward name in {spec!r}: write e.g. 'pickscore:10,hpsv2:2'")
        try:
            terms.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward weight {weight!r} in {spec!r} is not a number") from None
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


REWARDS["region"] = region
REWARDS["class_agreement"] = class_agreement
REWARDS["quality"] = quality



# ----------------------------------------------------------------------------- image rewards (SD)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing: (B, 3, H, W) in [0, 1] → resize the short side to `size`
    (bicubic, antialiased), centre-crop to size×size, normalise. The PIL processor would cut the graph."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.nn.functional.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def load_pretrained(cls, name_or_path: str, what: str, **kwargs):
    """`cls.from_pretrained` with one clear line when the weights are not on disk or in the cache."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load {what} from {name_or_path!r}: fetch it with `hf download {name_or_path}` "
            f"(or pass a local folder) [{type(e).__name__}]"
        ) from None


def _features(out) -> torch.Tensor:
    """transformers 5.x returns an output object from get_*_features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clipscore(device="cpu", dtype=torch.float32, clip_model: str = "openai/clip-vit-large-patch14") -> Reward:
    """CLIP score (Hessel et al. 2021, without the 2.5·max(·, 0) rescaling): cosine between the
    L2-normalised CLIP image and prompt embeddings. Text embeddings are cached per prompt."""
    from transformers import CLIPModel, CLIPTokenizer

    model = load_pretrained(CLIPModel, clip_model, "CLIP model").to(device, dtype).eval().requires_grad_(False)
    tokenizer = load_pretrained(CLIPTokenizer, clip_model, "CLIP tokenizer")
    size = model.config.vision_config.image_size
    cache: dict[str, torch.Tensor] = {}

    def text_embeddings(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                emb = _features(model.get_text_features(input_ids=ids))
            cache.update(zip(missing, torch.nn.functional.normalize(emb.float(), dim=-1)))
        return torch.stack([cache[p] for p in prompts])

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device, torch.float32), size).to(dtype)
        img = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return (img * text_embeddings(list(prompts))).sum(-1)

    return reward


REWARDS["clipscore"] = clipscore
