"""Tiny random-init stand-ins for the pretrained components `train_sd.py --tiny` / `--tiny-sd3` and `bench_sd.py
--tiny` need (SD1.5 and SD3 pipelines, CLIP reward backbone, tokenizers, shortcut LoRAs), built in code (no downloads).

They have the real architectures (diffusers UNet2DConditionModel / SD3Transformer2DModel / AutoencoderKL,
transformers CLIP and T5) at toy width, are saved with `save_pretrained` and loaded back through the very same loading
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


def tiny_clip(path: str | Path, image_size: int = 32, projection_dim: int = 16, seed: int = 0):
    """A CLIPModel (text + vision towers, random init from `seed`, the global RNG untouched) with its tokenizer, saved
    to `path`. Stands in for CLIP ViT-L/14 / ViT-H/14 reward backbones."""
    import torch
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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
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


# ----------------------------------------------------------------------------- Stable Diffusion 3 (tiny and SD3.5-medium size)


def t5_tokenizer(path: str | Path):
    """A T5TokenizerFast (character-level unigram, </s> appended, pad 0, eos 1, unk 2) saved to `path`; returns it."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(ch, -2.0) for ch in string.printable if not ch.isspace()]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer, model.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    tok.save_pretrained(str(path))
    return tok


def sd3_components(full_size: bool = False, seed: int = 0, t5: bool = False) -> dict:
    """Random-init Stable Diffusion 3.5 components built in code: SD3Transformer2DModel, AutoencoderKL (16 latent
    channels, SD3's scaling and shift), two CLIPTextModelWithProjection with byte-level tokenizers (77 tokens), T5
    (T5EncoderModel + tokenizer) only with `t5` (else None, as a pipeline without T5), and SD3's
    FlowMatchEulerDiscreteScheduler (shift 3).

    full_size=False: toy width, SD3.5's features kept (QK RMS-norm, a dual-attention block, a last block whose text
    stream ends early): 2 blocks, 2 heads of 8, VAE ×2 downsampling, patch 2, so 32 px images ↔ 16×16 latents ↔ 8×8
    patches. full_size=True: SD3.5-medium's transformer (24 blocks, 24 heads of 64, dual attention in blocks 0–12,
    ≈ 2.5 B parameters), SD3's VAE (×8) and CLIP-L / CLIP-G text towers, for speed and memory benchmarks; T5-XXL is
    never built at full size (4.7 B parameters that training without T5 does not load)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab, _ = _byte_vocab()
    clip = dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if full_size:  # stabilityai/stable-diffusion-3.5-medium: transformer/, vae/, text_encoder(_2)/ configs
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False)
        texts = [CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                projection_dim=768, hidden_act="quick_gelu", **clip),
                 CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                num_hidden_layers=32, projection_dim=1280, hidden_act="gelu", **clip)]
        t5 = False
    else:
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
        vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=2, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                            use_quant_conv=False, use_post_quant_conv=False)
        texts = [CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                projection_dim=8, **clip) for _ in range(2)]
    with tempfile.TemporaryDirectory() as d:
        tokenizer = tiny_tokenizer(d)
        tokenizer_3 = t5_tokenizer(d) if t5 else None
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_ff=37, d_kv=8, num_layers=1,
                                             num_heads=2, pad_token_id=0, eos_token_id=1)) if t5 else None
    return dict(transformer=transformer, vae=vae, text_encoder=CLIPTextModelWithProjection(texts[0]),
                tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(texts[1]), tokenizer_2=tokenizer,
                text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
                scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))


def tiny_sd3(path: str | Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny random-init StableDiffusion3Pipeline saved to `path` in the standard diffusers folder layout
    (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/,
    tokenizer_3/, scheduler/; t5=False leaves out the T5 pair), so `StableDiffusion3Pipeline.from_pretrained(path)`
    (with text_encoder_3=None, tokenizer_3=None to go without T5, as diffusers documents) and
    `sd3.load_components(path)` (T5 only with t5=True) both read it."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    StableDiffusion3Pipeline(**sd3_components(seed=seed, t5=t5)).save_pretrained(str(path))
    return path


def tiny_shortcut_lora(path: str | Path, unet_dir: str | Path, rank: int = 2, scale: float = 0.02, seed: int = 0) -> Path:
    """A stand-in distillation LoRA for the denoiser in `unet_dir` (an SD1.5 UNet, or an SD3 transformer: a
    pipeline's transformer/ folder): small random A and B matrices on the attention projections, written as `<path>`
    in the diffusers LoRA format (keys `unet.<module>.lora_A.weight` / `lora_B.weight`, like Hyper-SD's files after
    conversion; `transformer.<module>…` for SD3, like Hyper-SD3's). It is loaded through
    `shortcut.load_shortcut_lora`, the same function that loads the real ones, and by `pipe.load_lora_weights`."""
    import json

    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from safetensors.torch import save_file

    path = Path(path)
    sd3 = json.loads((Path(unet_dir) / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    model = (SD3Transformer2DModel if sd3 else UNet2DConditionModel).from_pretrained(str(unet_dir))
    prefix, targets = ("transformer", ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                       "to_add_out")) if sd3 else ("unet", ("to_q", "to_k", "to_v", "to_out.0"))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            tensors[f"{prefix}.{name}.lora_A.weight"] = scale * torch.randn(rank, module.in_features, generator=g)
            tensors[f"{prefix}.{name}.lora_B.weight"] = scale * torch.randn(module.out_features, rank, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
