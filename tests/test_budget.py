"""Tests of budget.py, the machine-independent compute unit of the benchmarks (FLOPs of an update).

Not part of the paper's method (Table 1's "equal compute" made exact): the count of a layer equals its closed form
(a multiply-add is 2 FLOPs; backward counts the input gradient and, where the weight is trained, the weight gradient;
a checkpointed forward is counted again as far as backward recomputes it), CPU attention is counted as torch counts CUDA attention, `FlopCount` equals
torch's own FlopCounterMode on a diffusers UNet update, and `FlopMeter`'s dry run leaves no trace on the update
that follows it (gradients, RNG).

Notation: B batch, I/O in/out features, C/K channels in/out, k kernel size, H heads, L/S query/key length, D head
width.

Run: python -m pytest -q tests/test_budget.py
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from hypothesis import given, settings, strategies as st

import budget

SMALL = st.integers(1, 6)


def count(fn) -> int:
    with budget.FlopCount() as c:
        fn()
    return c.total


@settings(max_examples=25, deadline=None)
@given(B=SMALL, I=SMALL, M=SMALL, O=SMALL, train_weights=st.booleans(), checkpointed=st.booleans())
def test_two_linear_layers_forward_backward_are_their_closed_form(B, I, M, O, train_weights, checkpointed):
    """x → x W1^T → (x W1^T) W2^T: forward 2BIM + 2BMO; backward the input gradient of each layer (2BMO, 2BIM) plus,
    where weights are trained, their gradients (2BMO, 2BIM). Checkpointed, the forward is recomputed in backward only
    as far as backward needs (torch stops early): the first layer's output, 2BIM, not the second's."""
    mlp = torch.nn.Sequential(torch.nn.Linear(I, M), torch.nn.Linear(M, O)).requires_grad_(train_weights)
    x = torch.randn(B, I, requires_grad=True)
    forward = (lambda: torch.utils.checkpoint.checkpoint(mlp, x, use_reentrant=False)) if checkpointed else \
        (lambda: mlp(x))
    first, second = 2 * B * I * M, 2 * B * M * O
    expected = (first + second) * (2 + train_weights) + checkpointed * first
    assert count(lambda: forward().sum().backward()) == expected


@settings(max_examples=20, deadline=None)
@given(B=SMALL, C=SMALL, K=SMALL, k=st.sampled_from([1, 3]), size=st.integers(3, 7))
def test_convolution_forward_is_its_closed_form(B, C, K, k, size):
    """A k×k convolution with padding k//2: 2·B·K·size²·C·k² (one multiply-add per output element per input tap)."""
    conv = torch.nn.Conv2d(C, K, k, padding=k // 2)
    assert count(lambda: conv(torch.randn(B, C, size, size))) == 2 * B * K * size * size * C * k * k


@settings(max_examples=15, deadline=None)
@given(B=SMALL, H=st.integers(1, 3), L=SMALL, S=SMALL, D=st.sampled_from([4, 8]))
def test_cpu_attention_is_counted_like_cuda_attention(B, H, L, S, D):
    """Scaled dot-product attention on the CPU (a kernel torch's counter does not register): Q K^T and P V, 4BHLSD
    forward; backward five products of 2BHLSD (Q K^T again, as flash attention recomputes it, then dV, dP, dQ, dK),
    torch's formula for the CUDA kernels."""
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (L, S, S))
    assert count(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * B * H * L * S * D
    assert count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 4 * B * H * L * S * D + 10 * B * H * L * S * D


def test_flop_count_equals_torch_flop_counter_on_a_unet_update():
    """A diffusers UNet (convolutions, cross-attention, time embedding), two denoiser calls, the second
    checkpointed, backward into a few trained weights: the same total as torch's FlopCounterMode, the peer."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).requires_grad_(False)
    unet.conv_out.requires_grad_(True)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)

    def update():
        y = unet(x, 500, text).sample
        y = torch.utils.checkpoint.checkpoint(lambda z: unet(z, 300, text).sample, y, use_reentrant=False)
        y.square().mean().backward()

    peer = budget._flop_mode()
    with peer:
        update()
    assert count(update) == peer.get_total_flops() > 0


def test_flop_meter_dry_run_leaves_no_trace():
    """The first update of a kind is counted by a dry run: afterwards the parameters' gradients and the RNG are
    those before it (so the real update is the unmeasured one), and a known kind is looked up, not run again."""
    layer = torch.nn.Linear(3, 2)
    runs = []

    def forward_backward():
        runs.append(1)
        layer(torch.randn(4, 3)).sum().backward()

    layer.weight.grad = kept = torch.ones(2, 3)
    meter = budget.FlopMeter()
    torch.manual_seed(1)
    gflop = meter.gflop("kind", forward_backward, layer.parameters())
    after = torch.randn(5)
    torch.manual_seed(1)
    assert torch.equal(after, torch.randn(5))
    assert layer.weight.grad is kept and layer.bias.grad is None
    assert gflop == 2 * 4 * 3 * 2 * 2 / 1e9  # forward + dL/dW (x needs no gradient)
    assert meter.gflop("kind", forward_backward, layer.parameters()) == gflop and len(runs) == 1
