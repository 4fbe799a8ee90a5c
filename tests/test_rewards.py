"""Image rewards of rewards.py (the SD experiments: PickScore, HPSv2, aesthetic, ImageReward, CLIP score;
the weight-free Symmetry and Compressibility).

Tiny random reward models (tiny.py, tests/builders.py) are saved to disk and loaded through the very
same factories that take hub ids; every score is checked against an independent computation
(transformers' CLIPModel forward, open_clip's forward, the LAION head as explicit matrix products,
closed forms, scipy's DCT and PIL's JPEG encoder), gradients must reach the images and never the frozen
reward weights, and every bad input must fail with one clear line.

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


# ----------------------------------------------------------------------------- symmetry (lower distance is better)


def test_symmetry_closed_forms():
    half = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(2))
    mirrored = torch.cat([half, half.flip(-1)], -1)  # (2, 3, 6, 10): exactly symmetric
    odd = torch.cat([half, torch.rand(2, 3, 6, 1), half.flip(-1)], -1)  # odd width: the middle column is its own mirror
    for p in (1, 2):
        reward = rewards.make_reward("symmetry", symmetry_p=p)
        for sym in (mirrored, odd):
            assert rewards.symmetry_distance(sym, p).tolist() == [0.0, 0.0]
            assert reward(sym, None).tolist() == [0.0, 0.0]  # the reward's maximum: −d ≤ 0 for every image
        x = images(grad=False)
        assert (reward(x, None) < 0).all()
        torch.testing.assert_close(rewards.symmetry_distance(x.flip(-1), p), rewards.symmetry_distance(x, p))
        black_white = torch.zeros(1, 3, 4, 8)
        black_white[..., 4:] = 1
        assert rewards.symmetry_distance(black_white, p).tolist() == [1.0]  # the largest distance
    # by hand, one row of two pixels: |Δ| per channel (1, 0, 0.4), each counted at both pixels, over 3·1·2 values
    x = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.2, 0.6]]).view(1, 3, 1, 2)
    torch.testing.assert_close(rewards.symmetry_distance(x), torch.tensor([(1 + 1 + 0 + 0 + 0.4 + 0.4) / 6]))
    torch.testing.assert_close(rewards.symmetry_distance(x, 2), torch.tensor([(1 + 1 + 0.16 + 0.16) / 6]))
    u = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # i.i.d. uniform: E|U − V| = 1/3
    assert abs(rewards.symmetry_distance(u).mean().item() - 1 / 3) < 0.01


def test_symmetry_gradient_is_the_mirror_difference_and_ascent_symmetrises():
    reward = rewards.make_reward("symmetry")
    x = images()
    assert_grad_flows_to_images_only(reward, x, PROMPTS)
    # ∂d/∂x[c,i,j] = 2 sign(x[c,i,j] − x[c,i,W−1−j]) / (3HW): each mirrored pair appears twice in the mean
    expected = -2 * (x - x.flip(-1)).sign() / x[0].numel()
    torch.testing.assert_close(x.grad, expected.detach())
    y = images().detach().requires_grad_(True)
    before = rewards.symmetry_distance(y).detach()
    opt = torch.optim.Adam([y], lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        (-reward(y, PROMPTS).sum()).backward()
        opt.step()
    assert (rewards.symmetry_distance(y) < 0.2 * before).all()


# ----------------------------------------------------------------------------- compressibility (JPEG size, estimate)


def pil_jpeg(x, quality):
    """x (1, 3, H, W) in [0, 1] → the PIL image read back from an in-memory JPEG at `quality`, 4:2:0."""
    import io

    from PIL import Image

    arr = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("quality", [95, 75, 50, 30, 10])
def test_jpeg_quant_tables_are_the_ones_pil_writes(quality):
    im = pil_jpeg(images(1, 16, 16, grad=False), quality)
    ours = rewards.jpeg_quant_tables(quality)
    assert ours.shape == (2, 8, 8)
    assert [list(im.quantization[k]) for k in (0, 1)] == ours.flatten(1).int().tolist()  # natural order
    assert [c[1:3] for c in im.layer] == [(2, 2), (1, 1), (1, 1)]  # 4:2:0: luma sampled 2×2 per chroma sample


def test_block_dct_is_the_orthonormal_dct_and_ycbcr_is_pils():
    scipy_fft = pytest.importorskip("scipy.fft")
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    ours = rewards.block_dct(x.float())  # (2, 2, 3, 8, 8)
    blocks = x.numpy().reshape(2, 2, 8, 3, 8).transpose(0, 1, 3, 2, 4)
    ref = torch.from_numpy(scipy_fft.dctn(blocks, type=2, norm="ortho", axes=(-2, -1))).float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    d = rewards.dct_matrix()
    torch.testing.assert_close(d @ d.T, torch.eye(8), atol=1e-6, rtol=0)
    # colour transform: PIL's own RGB → YCbCr (8-bit, rounded), level-shifted as JPEG does
    import numpy as np
    from PIL import Image

    rgb = images(1, 8, 8, grad=False)
    arr = (rgb[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    pil = torch.from_numpy(np.asarray(Image.fromarray(arr).convert("YCbCr"), dtype=np.float32)).permute(2, 0, 1)
    ours = rewards.rgb_to_ycbcr(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)[0]
    torch.testing.assert_close(ours + torch.tensor([128.0, 128, 128]).view(3, 1, 1), pil, atol=1.0, rtol=0)


@pytest.mark.parametrize("quality, dc_steps, ac_step", [(95, (2, 2), 2), (50, (16, 17), 16)])
def test_jpeg_bits_estimate_closed_forms(quality, dc_steps, ac_step):
    # quantisation steps by hand: Q = ⌊(T·s + 50)/100⌋, s = 10 at quality 95 and 100 at 50; T(0,0) = 16 luma,
    # 17 chroma; T(0,3) = 16 luma
    q = rewards.jpeg_quant_tables(quality)
    assert (q[0, 0, 0].item(), q[1, 0, 0].item(), q[0, 0, 3].item()) == (*dc_steps, ac_step)
    # a constant image: every AC coefficient is 0 and every DC difference but the first block's is 0, so
    # bits = Σ_{Y,Cb,Cr} log2(1 + |8 c_k / Q_k(0,0)|) / (HW), c = (Y − 128, Cb − 128, Cr − 128) of the colour
    colours = torch.tensor([[0.5, 0.5, 0.5], [128 / 255] * 3, [1.0, 0.0, 0.0], [0.2, 0.7, 0.4]])
    x = colours.view(4, 3, 1, 1).expand(4, 3, 32, 32)
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    c = 255 * colours @ m.T - torch.tensor([128.0, 0, 0])
    expected = torch.log2(1 + (8 * c / torch.tensor([dc_steps[0], *dc_steps[1:] * 2])).abs()).sum(1) / (32 * 32)
    torch.testing.assert_close(rewards.jpeg_bits_estimate(x, quality), expected, atol=2e-5, rtol=1e-4)
    if quality == 95:  # mid-grey: Y − 128 = −0.5, DC = −4, z = −2
        assert abs(expected[0].item() - math.log2(3) / 1024) < 1e-6
    assert rewards.jpeg_bits_estimate(x[1:2], quality).item() < 2e-5  # grey 128/255: nothing to code
    # one luma AC basis function in one block, amplitude A on the DCT scale: log2(1 + A/Q(u, v)) more bits
    basis = torch.outer(rewards.dct_matrix()[0], rewards.dct_matrix()[3])  # F = A at (u, v) = (0, 3) only
    grey = torch.full((1, 3, 16, 16), 128 / 255)
    a = 40.0
    bumped = grey.clone()
    bumped[..., :8, :8] += a * basis / 255  # the same in R, G, B: luma only, chroma unchanged
    extra = rewards.jpeg_bits_estimate(bumped, quality) - rewards.jpeg_bits_estimate(grey, quality)
    torch.testing.assert_close(extra, torch.tensor([math.log2(1 + a / ac_step) / 256]), atol=2e-5, rtol=1e-4)


def test_jpeg_bits_estimate_codes_dc_in_mcu_order_and_subsamples_chroma():
    # grey blocks with luma offsets k (Y = 128 + k): DC = 8k, z = 4k at quality 95; DC is coded as the difference
    # to the previous block in scan order, and with 4:2:0 the scan visits each 16×16 MCU's four luma blocks
    k = torch.tensor([[0.0, 3, 1, 5], [2, 7, 4, 6]])  # (2, 4) blocks → a 16×32 image, two MCUs
    x = ((128 + k.repeat_interleave(8, 0).repeat_interleave(8, 1)) / 255).expand(1, 3, 16, 32)
    mcu_order = torch.tensor([0, 3, 2, 7, 1, 5, 4, 6.0])  # MCU 0: (0,0) (0,1) (1,0) (1,1); then MCU 1
    expected = torch.log2(1 + 4 * mcu_order.diff(prepend=torch.zeros(1)).abs()).sum() / (16 * 32)
    raster = torch.log2(1 + 4 * k.flatten().diff(prepend=torch.zeros(1)).abs()).sum() / (16 * 32)
    assert abs(expected - raster) > 1e-3  # the order matters for this image
    # the block edges make AC coefficients too: those are the same whatever the DC order, so compare with
    # the AC-only cost computed from the luma block DCTs directly
    blocks = rewards.block_dct(255 * x[:, 0] - 128) / 2  # (1, 2, 4, 8, 8) quantised-domain luma
    ac = torch.log2(1 + blocks.flatten(3)[..., 1:].abs()).sum() / (16 * 32)
    torch.testing.assert_close(rewards.jpeg_bits_estimate(x)[0], expected + ac, atol=2e-5, rtol=1e-4)
    # 4:2:0: colours of equal luma and opposite chroma in a one-pixel checkerboard average to grey in every
    # 2×2 cell, so there is nothing to code, although no single pixel is grey
    d = torch.tensor([0.0, 0.114, -0.587]) * 30 / 255  # 0.299·d_R + 0.587·d_G + 0.114·d_B = 0
    sign = 1 - 2 * ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float()  # (16, 16) ±1
    checker = 128 / 255 + d.view(3, 1, 1) * sign
    assert rewards.rgb_to_ycbcr(checker[None])[0, 1].abs().min() > 5  # |Cb| of every pixel
    assert rewards.jpeg_bits_estimate(checker[None]).item() < 2e-5


def smoothness_ladder(h=64, w=64):
    """20 images from flat to noisy: constant, gradients, a low sine, stripes, a checkerboard, Gaussian noise of
    four amplitudes in colour and in grey, uniform noise blurred over 3, 5 and 9 pixels, raw uniform noise."""
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    grey = lambda m: m.expand(3, h, w)  # noqa: E731
    col, row = torch.arange(w).float().expand(h, w), torch.arange(h).float()[:, None]
    ims = [torch.full((3, h, w), 0.4), grey(xx), torch.stack([xx, yy, (xx + yy) / 2]),
           grey(0.5 + 0.4 * torch.sin(4 * math.pi * xx)), grey(col // 4 % 2), grey(col % 2),
           grey((col // 2 + row // 2) % 2 * 0.8 + 0.1)]
    for a in (0.02, 0.05, 0.1, 0.2):
        ims.append((0.5 + a * torch.randn(3, h, w, generator=g)).clamp(0, 1))
        ims.append(grey((0.5 + a * torch.randn(h, w, generator=g)).clamp(0, 1)))
    for k in (3, 5, 9):
        noise = torch.rand(1, 3, h, w, generator=g)
        ims.append(torch.nn.functional.avg_pool2d(noise, k, 1, k // 2, count_include_pad=False)[0])
    return torch.stack(ims + [grey(torch.rand(h, w, generator=g)), torch.rand(3, h, w, generator=g)])


def spearman(a, b):
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731  (no ties among these values)
    return torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()


@pytest.mark.parametrize("quality", [95, 75])
def test_jpeg_bits_estimate_ranks_images_as_pil_jpeg_size_does(quality):
    x = smoothness_ladder()
    estimate, measured = rewards.jpeg_bits_estimate(x, quality).double(), rewards.jpeg_bits_per_pixel(x, quality)
    assert len(set(measured.tolist())) == len(x) and len(set(estimate.tolist())) == len(x)  # ranks are strict
    rho = spearman(estimate, measured)
    # chance level: the 99.9th percentile of the rank correlation with a random ordering of the same images
    g = torch.Generator().manual_seed(0)
    null = torch.tensor([spearman(estimate, measured[torch.randperm(len(x), generator=g)]) for _ in range(2000)])
    threshold = max(0.9, null.quantile(0.999).item())
    assert rho > threshold, (rho, threshold, estimate.tolist(), measured.tolist())
    assert estimate.argmin() == measured.argmin() == 0  # the flat image is the cheapest in both


def test_compressibility_ascent_shrinks_the_measured_jpeg():
    reward = rewards.make_reward("compressibility")
    x = images(2, 32, 32)
    assert_grad_flows_to_images_only(reward, x, PROMPTS[:2])
    y = (0.5 + 0.2 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    y.requires_grad_(True)
    before = (rewards.jpeg_bits_per_pixel(y), rewards.jpeg_bits_estimate(y).detach())
    opt = torch.optim.Adam([y], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        (-reward(y, PROMPTS[:2]).sum()).backward()
        opt.step()
        with torch.no_grad():
            y.clamp_(0, 1)
    after = (rewards.jpeg_bits_per_pixel(y), rewards.jpeg_bits_estimate(y).detach())
    assert (after[1] < 0.5 * before[1]).all(), (before, after)
    assert (after[0] < 0.7 * before[0]).all(), (before, after)  # the real file, headers included, shrinks too


def test_weight_free_rewards_reject_bad_settings():
    for make, match in [(lambda: rewards.make_reward("symmetry", symmetry_p=0.5), "symmetry_p must be ≥ 1"),
                        (lambda: rewards.make_reward("compressibility", jpeg_quality=0), "integer in 1…100"),
                        (lambda: rewards.make_reward("compressibility", jpeg_quality=95.0), "integer in 1…100"),
                        (lambda: rewards.jpeg_bits_per_pixel(images(grad=False), 101), "integer in 1…100"),
                        (lambda: rewards.jpeg_bits_estimate(torch.rand(2, 32, 32)), r"\(B, 3, H, W\)"),
                        (lambda: rewards.symmetry_distance(torch.rand(3, 8, 8)), r"\(B, C, H, W\)")]:
        with pytest.raises(ValueError, match=match) as e:
            make()
        one_line(e)


def test_paper_regulariser_spec_for_hackable_rewards(clip_dir, tmp_path, monkeypatch):
    # the paper's regulariser HPSv2 : PickScore = 1 : 10 next to a hackable reward, as documented in rewards.py
    spec = "symmetry:1,hpsv2:0.001,pickscore:0.01"
    terms = rewards.parse_reward_spec(spec)
    assert [n for n, _ in terms] == ["symmetry", "hpsv2", "pickscore"]
    assert terms[2][1] / terms[1][1] == pytest.approx(10)
    kw = dict(pickscore_model=clip_dir, pickscore_tokenizer=clip_dir, local_files_only=True)
    try:
        import open_clip  # noqa: F401

        arch, ckpt = builders.tiny_open_clip(tmp_path / "hps")
        kw.update(hpsv2_arch=arch, hpsv2_checkpoint=ckpt)
    except ModuleNotFoundError:  # no open-clip-torch here: a cosine score on the tiny CLIP stands in for HPSv2
        stand_in = rewards.clipscore(clip_model=clip_dir, local_files_only=True)
        monkeypatch.setitem(rewards.REWARDS, "hpsv2", lambda **k: stand_in)
    x = images()
    parts = [rewards.make_reward(n, **kw)(x, PROMPTS) for n in ("symmetry", "hpsv2", "pickscore")]
    for hackable in ("symmetry", "compressibility"):
        combined = rewards.make_reward(spec.replace("symmetry", hackable), **kw)
        first = parts[0] if hackable == "symmetry" else rewards.make_reward(hackable)(x, PROMPTS)
        torch.testing.assert_close(combined(x, PROMPTS), first + 0.001 * parts[1] + 0.01 * parts[2])
    assert_grad_flows_to_images_only(rewards.make_reward(spec, **kw), images(), PROMPTS)


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


def test_reward_spec_parsing_is_lenient_on_spacing_and_weights():
    parse = rewards.parse_reward_spec
    assert parse("symmetry") == [("symmetry", 1.0)]
    assert parse(" symmetry : 1 , hpsv2:1e-3,\tpickscore : .01 ") == [("symmetry", 1.0), ("hpsv2", 0.001), ("pickscore", 0.01)]
    assert parse("brightness:-2,saturation:+0.5,region:0") == [("brightness", -2.0), ("saturation", 0.5), ("region", 0.0)]
    x = images()
    torch.testing.assert_close(rewards.make_reward(" symmetry : -2 ")(x, None), -2 * rewards.make_reward("symmetry")(x, None))
    with pytest.raises(TypeError, match="must be a string") as e:
        rewards.parse_reward_spec(None)
    one_line(e)


@pytest.mark.parametrize("spec, match", [
    ("", "empty reward name"), ("symmetry,", "empty reward name"), (":1", "empty reward name"),
    ("symmetry:1,,hpsv2:1", "empty reward name"), ("symmetry:", "has ':' but no weight"),
    ("symmetry:one", "not a number"), ("symmetry:1:2", "not a number"), ("symmetry:nan", "not finite"),
    ("symmetry:inf", "not finite"), ("symmetry:-Infinity", "not finite"),
    ("symmetry:1,hpsv2:0.1,symmetry:2", "'symmetry' appears twice"), ("symmetry, symmetry ", "appears twice"),
])
def test_malformed_reward_specs_fail_in_one_line(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        rewards.make_reward(spec)
    assert repr(spec) in one_line(e)

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
