"""Image rewards of rewards.py (Sec. 4, SD experiments: PickScore, HPSv2, aesthetic, ImageReward, CLIP score).

Tiny random reward models (tiny.py, tests/builders.py) are saved to disk and loaded through the very
same factories that take hub ids; every score is checked against an independent computation (transformers' CLIPModel
forward, open_clip's forward, the LAION head as explicit matrix products), gradients must reach the
images and never the frozen reward weights, and every bad input must fail with one clear line.

Run: python -m pytest -q tests/test_rewards.py
"""

import math
import sys

import numpy as np
import pytest
import torch

import builders
import rewards
import tiny

PROMPTS = ["a red cube on a table", "a watercolour fox", "a red cube on a table"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    tiny.tiny_clip(path, image_size=32, projection_dim=16)
    return str(path)


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("head")
    heads = {}
    for suffix in (".safetensors", ".pth"):
        heads[suffix] = (str(d / f"head{suffix}"), builders.tiny_aesthetic_head(d / f"head{suffix}", in_dim=16))
    return heads


def images(b=3, h=40, w=56, grad=True):
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1))
    return x.requires_grad_(grad)


def assert_grad_flows_to_images_only(reward, x, prompts):
    r = reward(x, prompts)
    assert r.shape == (x.shape[0],) and r.dtype == torch.float32
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for model in getattr(reward, "models", ()):
        assert not model.training
        for name, p in model.named_parameters():
            assert not p.requires_grad and p.grad is None, name


# ----------------------------------------------------------------------------- preprocessing


def test_clip_preprocess_matches_clip_image_processor_on_224_image():
    from PIL import Image
    from transformers import CLIPImageProcessor

    arr = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ref = CLIPImageProcessor()(Image.fromarray(arr), return_tensors="pt").pixel_values
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    ours = rewards.clip_preprocess(x)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (512, 512), (97, 131)])
def test_clip_preprocess_resize_and_crop_follow_clip_image_processor(hw):
    from PIL import Image
    from transformers import CLIPImageProcessor

    h, w = hw  # a smooth image, so PIL's and torch's bicubic resamplers nearly agree
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    arr = np.stack([xx, yy, 0.5 + 0.4 * np.sin(3 * xx + 2 * yy)], -1)
    arr = (arr * 255).round().astype(np.uint8)
    ref = CLIPImageProcessor()(Image.fromarray(arr), return_tensors="pt").pixel_values
    ours = rewards.clip_preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02  # a shifted crop would be off by ~0.1 or more
    assert (ours - ref).abs().max() < 0.1


def test_clip_preprocess_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rewards.clip_preprocess(torch.rand(3, 32, 32))


# ----------------------------------------------------------------------------- weight-free rewards


def test_brightness_and_saturation_closed_forms():
    white, grey = torch.ones(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.3)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    b, s = rewards.make_reward("brightness"), rewards.make_reward("saturation")
    torch.testing.assert_close(b(torch.cat([white, grey, red]), None), torch.tensor([1.0, 0.3, 0.2126]))
    torch.testing.assert_close(s(torch.cat([white, grey, red]), None), torch.tensor([0.0, 0.0, math.sqrt(2) / 3]))
    x = images()
    assert_grad_flows_to_images_only(b, x, PROMPTS)


# ----------------------------------------------------------------------------- CLIP score, PickScore


def clip_logits(clip_dir, x, prompts):
    """Peer computation: transformers' own CLIPModel forward (logits_per_image = s·cos)."""
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    ids = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                    pixel_values=rewards.clip_preprocess(x, 32))
    return out.logits_per_image.diagonal(), model.logit_scale.exp()


def test_clipscore_and_pickscore_equal_clipmodel_logits(clip_dir):
    x = images(grad=False)
    logits, scale = clip_logits(clip_dir, x, PROMPTS)
    cs = rewards.make_reward("clipscore", clip_model=clip_dir, local_files_only=True)
    ps = rewards.make_reward("pickscore", pickscore_model=clip_dir, pickscore_tokenizer=clip_dir, local_files_only=True)
    torch.testing.assert_close(cs(x, PROMPTS), logits / scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ps(x, PROMPTS), logits, atol=1e-4, rtol=1e-5)
    assert_grad_flows_to_images_only(ps, images(), PROMPTS)
    assert_grad_flows_to_images_only(cs, images(), PROMPTS)


def test_bfloat16_reward_model_keeps_float32_scores_and_gradients(clip_dir, head_files):
    kw = dict(clip_model=clip_dir, aesthetic_head_path=head_files[".safetensors"][0], pickscore_model=clip_dir,
              pickscore_tokenizer=clip_dir, local_files_only=True)
    x = images()
    for name in ("pickscore", "aesthetic"):
        full = rewards.make_reward(name, **kw)(x.detach(), PROMPTS)
        half = rewards.make_reward(name, dtype=torch.bfloat16, **kw)
        assert all(p.dtype == torch.bfloat16 for p in half.models[0].parameters())
        torch.testing.assert_close(half(x.detach(), PROMPTS), full, atol=0.05 * full.abs().max().item(), rtol=0)
        assert_grad_flows_to_images_only(half, x, PROMPTS)
        assert x.grad.dtype == torch.float32
        x.grad = None


def test_prompt_features_are_cached_per_prompt(clip_dir):
    ps = rewards.make_reward("pickscore", pickscore_model=clip_dir, pickscore_tokenizer=clip_dir, local_files_only=True)
    model, seen = ps.models[0], []
    encode = model.get_text_features
    model.get_text_features = lambda input_ids, **kw: (seen.append(len(input_ids)), encode(input_ids, **kw))[1]
    x = images(grad=False)
    first = ps(x, PROMPTS)
    flipped = ps(x.flip(0), PROMPTS[::-1])
    assert seen == [2]  # two distinct prompts, each encoded once
    torch.testing.assert_close(flipped, first.flip(0))


# ----------------------------------------------------------------------------- aesthetic


def manual_aesthetic(clip_dir, head, x):
    """The LAION predictor written out: e = image_embeds/‖·‖, then five affine maps (dropout off)."""
    from transformers import CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection.from_pretrained(clip_dir)
    with torch.no_grad():
        e = clip(pixel_values=rewards.clip_preprocess(x, 32)).image_embeds
        e = e / e.norm(dim=-1, keepdim=True)
        sd = head.state_dict()
        for i in (0, 2, 4, 6, 7):
            e = e @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return e.squeeze(-1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_equals_manual_computation(clip_dir, head_files, suffix):
    path, head = head_files[suffix]
    assert sorted(head.state_dict()) == sorted(rewards.AESTHETIC_KEYS)
    assert [k for k in head.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    reward = rewards.make_reward("aesthetic", clip_model=clip_dir, aesthetic_head_path=path, local_files_only=True)
    x = images(grad=False)
    torch.testing.assert_close(reward(x, PROMPTS), manual_aesthetic(clip_dir, head, x), atol=1e-5, rtol=1e-5)
    assert_grad_flows_to_images_only(reward, images(), PROMPTS)


def test_aesthetic_head_from_folder_and_shape_of_real_head(clip_dir, head_files):
    import os

    path, _ = head_files[".pth"]
    folder_reward = rewards.aesthetic(clip_model=clip_dir, aesthetic_head_path=os.path.dirname(path),
                                      aesthetic_head_file="head.pth", local_files_only=True)
    file_reward = rewards.aesthetic(clip_model=clip_dir, aesthetic_head_path=path, local_files_only=True)
    x = images(grad=False)
    torch.testing.assert_close(folder_reward(x, None), file_reward(x, None))
    real = rewards.AestheticMLP()  # the LAION layout: 768→1024→128→64→16→1
    assert [tuple(real.state_dict()[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


def test_aesthetic_rejects_wrong_head(clip_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(1, 16)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        rewards.aesthetic(clip_model=clip_dir, aesthetic_head_path=str(tmp_path / "bad.safetensors"))
    builders.tiny_aesthetic_head(tmp_path / "wide.safetensors", in_dim=24)
    with pytest.raises(ValueError, match="24-d embeddings"):
        rewards.aesthetic(clip_model=clip_dir, aesthetic_head_path=str(tmp_path / "wide.safetensors"))


class NotWeights:
    pass


def test_pickled_objects_are_not_loaded(clip_dir, tmp_path):
    torch.save({"layers.0.weight": NotWeights()}, str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="weights_only=True"):
        rewards.aesthetic(clip_model=clip_dir, aesthetic_head_path=str(tmp_path / "evil.pth"))


# ----------------------------------------------------------------------------- weighted sums


def test_weighted_sum_equals_manual_sum(clip_dir, head_files):
    kw = dict(clip_model=clip_dir, aesthetic_head_path=head_files[".safetensors"][0], pickscore_model=clip_dir,
              pickscore_tokenizer=clip_dir, local_files_only=True, device="cpu", dtype=torch.float32)
    combined = rewards.make_reward("pickscore:10,aesthetic:0.05,brightness:-2", **kw)
    parts = [rewards.make_reward(n, **kw) for n in ("pickscore", "aesthetic", "brightness")]
    x = images()
    manual = 10 * parts[0](x, PROMPTS) + 0.05 * parts[1](x, PROMPTS) - 2 * parts[2](x, PROMPTS)
    torch.testing.assert_close(combined(x, PROMPTS), manual)
    assert_grad_flows_to_images_only(combined, x, PROMPTS)


# ----------------------------------------------------------------------------- one-line errors


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_name_and_bad_weight():
    with pytest.raises(ValueError, match="unknown reward 'pickscor'.*pickscore") as e:
        rewards.make_reward("pickscor:10")
    one_line(e)
    with pytest.raises(ValueError, match="not a number") as e:
        rewards.make_reward("pickscore:ten")
    one_line(e)


def test_missing_local_paths(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no folder/file at") as e:
        rewards.clipscore(clip_model=missing)
    assert missing in one_line(e)
    with pytest.raises(FileNotFoundError, match="no folder/file at") as e:
        rewards.resolve_file(str(tmp_path / "head.pth"), "x", "aesthetic head")
    one_line(e)
    with pytest.raises(FileNotFoundError, match="no folder/file at") as e:  # folder without the file
        rewards.resolve_file(str(tmp_path), "aesthetic-model.pth", "aesthetic head")
    one_line(e)


def test_hub_ids_not_in_cache_name_the_download_command(clip_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        rewards.aesthetic(clip_model=clip_dir, local_files_only=True)
    assert "`hf download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth`" in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        rewards.make_reward("pickscore", local_files_only=True)
    assert "`hf download yuvalkirstain/PickScore_v1`" in one_line(e)


@pytest.mark.parametrize("name, module, package", [("hpsv2", "open_clip", "open-clip-torch")])
def test_missing_optional_package(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(ModuleNotFoundError) as e:
        rewards.make_reward(name, local_files_only=True)
    assert f"pip install {package}" in one_line(e)


# ----------------------------------------------------------------------------- HPSv2 (optional package)


def test_hpsv2_equals_open_clip_forward(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    arch, ckpt = builders.tiny_open_clip(tmp_path / "hps")
    reward = rewards.make_reward("hpsv2", hpsv2_arch=arch, hpsv2_checkpoint=ckpt, local_files_only=True)
    model = open_clip.create_model(arch, output_dict=True)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    x = images(grad=False)
    with torch.no_grad():  # HPSv2's scorer: diag(image_features @ text_features.T) of the normalised features
        out = model(rewards.clip_preprocess(x, 32), open_clip.get_tokenizer(arch)(PROMPTS))
        ref = (out["image_features"] @ out["text_features"].T).diagonal()
    torch.testing.assert_close(reward(x, PROMPTS), ref, atol=1e-5, rtol=1e-5)
    assert_grad_flows_to_images_only(reward, images(), PROMPTS)


# ----------------------------------------------------------------------------- ImageReward (native BLIP)


def blip_vit(sd, pixels, prefix="blip.visual_encoder.", eps=1e-6):
    """BLIP's ViT (ImageReward's vit.py) written out: patchify, prepend [CLS], add positions, pre-norm
    blocks x + Attn(LN1 x), x + MLP(LN2 x) with exact GELU, final LN on every token. One head per 64 dims."""
    F = torch.nn.functional
    w = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
    patch, width = w["patch_embed.proj.weight"].shape[-1], w["cls_token"].shape[-1]
    heads = max(1, width // 64)
    x = F.conv2d(pixels, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x], 1) + w["pos_embed"]
    B, N, D = x.shape
    for n in range(sum(k.endswith("norm1.weight") for k in w)):
        b = lambda name: (w[f"blocks.{n}.{name}.weight"], w[f"blocks.{n}.{name}.bias"])  # noqa: E731
        h = F.layer_norm(x, (D,), *b("norm1"), eps=eps)
        q, k, v = F.linear(h, *b("attn.qkv")).view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (D // heads) ** -0.5, -1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, N, D), *b("attn.proj"))
        x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (D,), *b("norm2"), eps=eps), *b("mlp.fc1"))), *b("mlp.fc2"))
    return F.layer_norm(x, (D,), w["norm.weight"], w["norm.bias"], eps=eps)


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    return builders.tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


def test_imagereward_vision_encoder_is_blips_vit(imagereward_dir):
    reward = rewards.make_reward("imagereward", imagereward_checkpoint=imagereward_dir,
                                 imagereward_tokenizer=imagereward_dir + "/tokenizer", local_files_only=True)
    sd = torch.load(imagereward_dir + "/ImageReward.pt", weights_only=True)
    pixels = rewards.clip_preprocess(images(grad=False), 224)
    with torch.no_grad():
        ours = reward.models[0](pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, blip_vit(sd, pixels), atol=1e-5, rtol=1e-5)


def test_imagereward_scores_as_its_score_gard(imagereward_dir):
    reward = rewards.make_reward("imagereward", imagereward_checkpoint=imagereward_dir,
                                 imagereward_tokenizer=imagereward_dir + "/tokenizer", local_files_only=True)
    vision, text, head = reward.models
    sd = torch.load(imagereward_dir + "/ImageReward.pt", weights_only=True)
    for k, t in text.state_dict().items():  # BLIP's BERT weights land under the same names
        if not k.endswith("position_ids"):
            torch.testing.assert_close(t, sd["blip.text_encoder." + k], rtol=0, atol=0)
    torch.testing.assert_close(head.state_dict()["layers.7.weight"], sd["mlp.layers.7.weight"], rtol=0, atol=0)
    x = images(grad=False)
    # score_gard: 35 BERT tokens → text encoder cross-attending to the image tokens → MLP([CLS]) → (r − μ)/σ
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(imagereward_dir + "/tokenizer")(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        feats = blip_vit(sd, rewards.clip_preprocess(x, 224))
        out = text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=feats,
                   encoder_attention_mask=torch.ones(feats.shape[:-1], dtype=torch.long))
        expected = (head(out.last_hidden_state[:, 0, :]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    assert_grad_flows_to_images_only(reward, images(), PROMPTS)
