"""Tiny random-init stand-ins for the pretrained components `train_sd.py --tiny` and `bench_sd.py --tiny`
need (SD1.5 pipeline, CLIP reward backbone, tokenizer, shortcut LoRA), built in code (no downloads).

They have the real architectures (diffusers UNet2DConditionModel / AutoencoderKL, transformers
CLIP) at toy width, are saved with `save_pretrained` and loaded back through the very same loading
functions that take a hub id, so tests, notebooks and `train_sd.py --tiny` exercise the real path
on CPU in seconds. Nothing in the paper corresponds to this file. Tiny reward-model checkpoints that
only the tests use (aesthetic head, HPSv2's open_clip, ImageReward) are built in tests/builders.py.

Run: python -c "import tiny, tempfile; print(tiny.tiny_tokenizer(tempfile.mkdtemp()))"
"""

from __future__ import annotations

from pathlib import Path


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary with no merges: 2 specials, then the 256 byte symbols with and
    without the end-of-word marker `</w>` (what CLIPTokenizer needs to encode any text)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # GPT-2/CLIP byte → unicode map: printable bytes are themselves, the rest shift past 255
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    return vocab, []


def tiny_tokenizer(path: str | Path):
    """A CLIPTokenizer (77 tokens, byte-level) saved to `path`; returns the tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, bos_token="<|startoftext|>",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(path))
    return tok


def tiny_clip(path: str | Path, image_size: int = 32, projection_dim: int = 16):
    """A CLIPModel (text + vision towers, random init) with its tokenizer, saved to `path`.
    Stands in for CLIP ViT-L/14 / ViT-H/14 reward backbones."""
    from transformers import CLIPConfig, CLIPModel

    vocab, _ = _byte_vocab()
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=projection_dim),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    model.save_pretrained(str(path))
    tiny_tokenizer(path)
    return model


# ----------------------------------------------------------------------------- Stable Diffusion (tiny and full size)


def sd_components(full_size: bool = False, seed: int = 0) -> dict:
    """Random-init Stable Diffusion 1.5 components built in code: UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, CLIPTokenizer (byte-level, 77 tokens) and SD1.5's DDIMScheduler.

    full_size=False: diffusers' own test sizes (UNet (4, 8) channels, cross-attention 8; VAE ×2
    downsampling, so 32 px images ↔ 16×16 latents). full_size=True: the SD1.5 architecture (859.5M-
    parameter UNet, VAE ×8, 12-layer 768-wide text encoder) for speed and memory benchmarks."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab, _ = _byte_vocab()
    if full_size:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512, scaling_factor=0.18215)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, projection_dim=768)
    else:
        unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=2)
        vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=2, sample_size=32, scaling_factor=0.18215)
        text = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                              vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    with tempfile.TemporaryDirectory() as d:
        tokenizer = tiny_tokenizer(d)
    return dict(unet=unet, vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, scheduler=scheduler)


def tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """A tiny random-init StableDiffusionPipeline saved to `path` in the standard diffusers folder
    layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), so
    `StableDiffusionPipeline.from_pretrained(path)` and `sd.load_components(path)` both read it."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    pipe = StableDiffusionPipeline(**sd_components(seed=seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def tiny_shortcut_lora(path: str | Path, unet_dir: str | Path, rank: int = 2, scale: float = 0.02, seed: int = 0) -> Path:
    """A stand-in distillation LoRA for the UNet in `unet_dir`: small random A and B matrices on the
    attention projections, written as `<path>` in the diffusers LoRA format (keys
    `unet.<module>.lora_A.weight` / `lora_B.weight`), like Hyper-SD's files after conversion. It is
    loaded through `shortcut.load_shortcut_lora`, the same function that loads the real ones."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            tensors[f"unet.{name}.lora_A.weight"] = scale * torch.randn(rank, module.in_features, generator=g)
            tensors[f"unet.{name}.lora_B.weight"] = scale * torch.randn(module.out_features, rank, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
