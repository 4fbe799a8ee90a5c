"""Tiny random-init reward models for the reward tests (no downloads): a LAION-aesthetic-shaped head, an
open_clip CLIP in HPSv2's checkpoint layout and an ImageReward checkpoint in THUDM/ImageReward's layout.

Each is saved to disk in the published file layout and read back by the very factories in rewards.py
that take hub ids, so tests/test_rewards.py exercises the real loading path on CPU in seconds. Nothing in
the paper corresponds to this file. The builders that `train_sd.py --tiny` needs (tiny SD, CLIP, tokenizer,
shortcut LoRA) stay in tiny.py.

Run: python -m pytest -q tests/test_rewards.py   (the tests that build these)
"""

from __future__ import annotations

from pathlib import Path


def tiny_aesthetic_head(path: str | Path, in_dim: int = 16, hidden=(32, 16, 8, 4)):
    """A random LAION-aesthetic-shaped head in_dim→hidden…→1 (keys layers.{0,2,4,6,7}.*) saved to `path`:
    .safetensors, or a plain state dict for torch.load(weights_only=True) otherwise. Returns the head.
    Pairs with tiny_clip(projection_dim=in_dim)."""
    import torch

    from rewards import AestheticMLP

    head = AestheticMLP((in_dim, *hidden, 1))
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    else:
        torch.save(head.state_dict(), str(path))
    return head


def tiny_open_clip(path: str | Path, image_size: int = 32, embed_dim: int = 16):
    """A random tiny open_clip CLIP (ViT-H-14's layout at toy width) standing in for HPSv2: writes
    `path/open_clip_config.json` and `path/hps_tiny.pt` ({'state_dict': …}, as HPSv2 ships it).
    Returns (arch, checkpoint) for rewards.hpsv2(hpsv2_arch=arch, hpsv2_checkpoint=checkpoint).
    Needs open-clip-torch."""
    import json

    import open_clip
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(embed_dim=embed_dim,
               vision_cfg=dict(image_size=image_size, layers=2, width=32, head_width=16, patch_size=8),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    arch = f"local-dir:{path}"
    model = open_clip.create_model(arch)
    torch.save({"state_dict": model.state_dict()}, str(path / "hps_tiny.pt"))
    return arch, str(path / "hps_tiny.pt")


def tiny_imagereward(path: str | Path, width: int = 64, depth: int = 2, patch: int = 32, text_width: int = 32):
    """A random tiny ImageReward checkpoint in the layout of THUDM/ImageReward: `path/ImageReward.pt`
    (plain state dict: blip.visual_encoder.* in BLIP's timm-style ViT names, blip.text_encoder.* BLIP's
    BERT with cross-attention, blip.vision_proj.* unused, mlp.layers.{0,2,4,6,7}.*), `path/med_config.json`
    and a character-level BertTokenizer in `path/tokenizer`. Images are 224 px as in ImageReward.
    Returns `path` for rewards.imagereward(imagereward_checkpoint=path, imagereward_tokenizer=path/tokenizer)."""
    import json
    import string

    import torch
    from transformers import BertTokenizer, BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from rewards import AestheticMLP

    path = Path(path)
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *string.punctuation]
    (path / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "tokenizer" / "vocab.txt")).save_pretrained(str(path / "tokenizer"))

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.1, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=g)

    v = "blip.visual_encoder."
    sd = {v + "cls_token": rnd(1, 1, width), v + "pos_embed": rnd(1, 1 + (224 // patch) ** 2, width),
          v + "patch_embed.proj.weight": rnd(width, 3, patch, patch, scale=0.02), v + "patch_embed.proj.bias": rnd(width)}
    for n in range(depth):
        b = f"{v}blocks.{n}."
        for name, shape in [("norm1", None), ("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("norm2", None), ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))]:
            w = rnd(width, offset=1.0) if shape is None else rnd(*shape, scale=shape[1] ** -0.5)
            sd[b + name + ".weight"], sd[b + name + ".bias"] = w, rnd(len(w))
    sd[v + "norm.weight"], sd[v + "norm.bias"] = rnd(width, offset=1.0), rnd(width)
    med = dict(vocab_size=len(vocab), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12,
               pad_token_id=0, bos_token_id=2, sep_token_id=3, add_cross_attention=True, encoder_width=768)
    text = BlipTextModel(BlipTextConfig(**{k: x for k, x in med.items() if k not in ("add_cross_attention", "encoder_width")},
                                        encoder_hidden_size=width), add_pooling_layer=False)
    sd.update({"blip.text_encoder." + k: x for k, x in text.state_dict().items()})
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = rnd(16, width), rnd(16)
    sd.update({"mlp." + k: x for k, x in AestheticMLP((text_width, 16, 8, 8, 4, 1)).state_dict().items()})
    torch.save(sd, str(path / "ImageReward.pt"))
    (path / "med_config.json").write_text(json.dumps(med))
    return str(path)
