"""Balanced Feature Pyramid: shapes and keys, the integrate-and-add rule against independent
references, the non-local block (identity at init, its formula, gradients), the wrapper."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectors.bfp import BackboneWithBFP, BalancedFeaturePyramid, NonLocalBlock2d, _add_upsampled, _BlockMax, _resize

CHANNELS = 4
ODD_SIZES = [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]
NAMES = ["0", "1", "2", "3", "pool"]  # torchvision's FPN keys


def _levels(sizes=ODD_SIZES, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, CHANNELS, h, w, generator=gen) for h, w in sizes]


def _as_dict(levels):
    return OrderedDict(zip(NAMES, levels))


def _reference_integrate_and_add(levels, refine_level):
    """refine_type "none", written out level by level: gather, mean, scatter, add."""
    target_h, target_w = levels[refine_level].shape[-2:]
    total = torch.zeros_like(levels[refine_level])
    for index, level in enumerate(levels):
        if index < refine_level:
            total += F.adaptive_max_pool2d(level, (target_h, target_w))
        elif index > refine_level:
            total += F.interpolate(level, size=(target_h, target_w), mode="nearest")
        else:
            total += level
    mean = total / len(levels)
    expected = []
    for index, level in enumerate(levels):
        h, w = level.shape[-2:]
        if index < refine_level:
            back = F.interpolate(mean, size=(h, w), mode="nearest")
        elif index > refine_level:
            back = F.adaptive_max_pool2d(mean, (h, w))
        else:
            back = mean
        expected.append(level + back)
    return expected


def _block_max(x, factor):
    """Max over non-overlapping factor x factor blocks, via reshape (integer ratios only)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).amax(dim=(3, 5))


def _block_repeat(x, factor):
    """Nearest upsampling by an integer factor: each pixel repeated factor x factor times."""
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


# ---------------------------------------------------------------------------------------------
# Shapes, keys and the integrate-and-add rule.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refine_type", ["non_local", "conv", "none"])
def test_keys_types_and_shapes_are_kept(refine_type):
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type=refine_type)
    levels = _levels()
    out_dict = bfp(_as_dict(levels))
    assert isinstance(out_dict, OrderedDict) and list(out_dict) == NAMES
    out_list = bfp(levels)
    out_tuple = bfp(tuple(levels))
    assert isinstance(out_list, list) and isinstance(out_tuple, tuple)
    for level, from_dict, from_list in zip(levels, out_dict.values(), out_list):
        assert from_dict.shape == level.shape and from_list.shape == level.shape
        torch.testing.assert_close(from_dict, from_list)


@pytest.mark.parametrize("refine_level", [0, 1, 2, 3, 4])
def test_integration_matches_a_level_by_level_reference(refine_level):
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_level=refine_level, refine_type="none")
    levels = _levels(seed=refine_level)
    outputs = bfp(_as_dict(levels))
    for got, want in zip(outputs.values(), _reference_integrate_and_add(levels, refine_level)):
        torch.testing.assert_close(got, want)


def test_integration_with_integer_ratios_matches_block_max_and_repeat():
    # Sizes 16, 8, 4, 2, 1 with refine level 2 (4x4): block max by 4 and 2 on the way in,
    # repeat by 2 and 4 for the smaller levels; the reverse on the way out.
    levels = _levels(sizes=[(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])
    gathered = [_block_max(levels[0], 4), _block_max(levels[1], 2), levels[2],
                _block_repeat(levels[3], 2), _block_repeat(levels[4], 4)]
    mean = sum(gathered) / 5
    expected = [levels[0] + _block_repeat(mean, 4), levels[1] + _block_repeat(mean, 2),
                levels[2] + mean, levels[3] + _block_max(mean, 2), levels[4] + _block_max(mean, 4)]
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_level=2, refine_type="none")
    for got, want in zip(bfp(levels), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fh, fw", [(1, 1), (2, 2), (3, 1), (2, 5), (7, 3), (4, 6)])
def test_broadcast_upsample_add_equals_interpolate_exactly(fh, fw):
    # The broadcast fast path against F.interpolate's nearest, for whole-number ratios that
    # differ between height and width; and a non-whole ratio takes the interpolate path.
    gen = torch.Generator().manual_seed(fh * 10 + fw)
    small = torch.randn(2, 3, 5, 4, generator=gen)
    base = torch.randn(2, 3, 5 * fh, 4 * fw, generator=gen)
    want = base + F.interpolate(small, size=base.shape[-2:], mode="nearest")
    assert torch.equal(_add_upsampled(base, small), want)
    odd = torch.randn(2, 3, 5 * fh + 1, 4 * fw, generator=gen)
    assert torch.equal(_add_upsampled(odd, small),
                       odd + F.interpolate(small, size=odd.shape[-2:], mode="nearest"))


@pytest.mark.parametrize("fh, fw", [(1, 1), (2, 2), (3, 1), (2, 5), (4, 6)])
def test_upsample_add_gradient_is_the_block_sum_in_first_and_second_order(fh, fw):
    # The hand-written backward against autograd's numerical gradient (float64), and its own
    # backward (double backward, e.g. a gradient penalty) through gradgradcheck.
    gen = torch.Generator().manual_seed(fh * 10 + fw)
    small = torch.randn(1, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(1, 2, 3 * fh, 2 * fw, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_add_upsampled, (base, small))
    assert torch.autograd.gradgradcheck(_add_upsampled, (base, small))
    upstream = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    grad_base, grad_small = torch.autograd.grad((_add_upsampled(base, small) * upstream).sum(),
                                                (base, small))
    assert torch.equal(grad_base, upstream)
    block_sums = upstream.reshape(1, 2, 3, fh, 2, fw).sum(dim=(3, 5))
    torch.testing.assert_close(grad_small, block_sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(4, 4), (2, 8), (5, 7)])  # whole factors (two), not whole
def test_shrinking_equals_adaptive_max_pooling_with_and_without_gradients(size):
    # Both fast paths (_BlockMax with gradients, block reductions without) give
    # adaptive_max_pool2d's values; the gradient goes where its gradient goes, ties included:
    # a constant block (a padded border's features) sends its gradient to one entry, the first.
    gen = torch.Generator().manual_seed(size[0] * 10 + size[1])
    x = torch.randn(2, 3, 12, 40, generator=gen)
    x[:, :, :6, :10] = 0.25  # ties inside whole blocks
    want = F.adaptive_max_pool2d(x, size)
    with torch.no_grad():
        assert torch.equal(_resize(x, size, shrink=True), want)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(want.shape, generator=gen)
    got = _resize(leaf, size, shrink=True)
    assert torch.equal(got, want)
    got.backward(upstream)
    F.adaptive_max_pool2d(ref_leaf, size).backward(upstream)
    assert torch.equal(leaf.grad, ref_leaf.grad)
    assert torch.count_nonzero(leaf.grad[0, 0, :6, :10]) <= 4  # one entry per tied block


@pytest.mark.parametrize("fh, fw", [(2, 2), (4, 4), (3, 1), (2, 5)])
def test_block_max_equals_max_pool_in_value_gradient_ties_and_nan(fh, fw):
    # _BlockMax pools a channels-last copy and back-propagates through the contiguous kernel with
    # those indices: every value and every gradient entry must be max_pool2d's, where ties (a
    # constant padded border), a NaN (it wins its window) and a non-contiguous input occur.
    gen = torch.Generator().manual_seed(fh * 10 + fw)
    x = torch.randn(2, 5, 6 * fh, 4 * fw, generator=gen)
    x[0, :, :2 * fh, :2 * fw] = 0.5
    x[1, 2, 0, 0] = float("nan")
    for source in (x, x.transpose(2, 3).contiguous().transpose(2, 3)):  # contiguous, then strided
        leaf, ref_leaf = source.clone().requires_grad_(), source.clone().requires_grad_()
        got = _BlockMax.apply(leaf, fh, fw)
        want = F.max_pool2d(ref_leaf, (fh, fw), (fh, fw))
        assert got.is_contiguous() and torch.equal(got.nan_to_num(9.0), want.nan_to_num(9.0))
        upstream = torch.randn(want.shape, generator=gen)
        got.backward(upstream)
        want.backward(upstream)
        assert torch.equal(leaf.grad, ref_leaf.grad)
    small = torch.randn(1, 2, 2 * fh, 3 * fw, generator=gen, dtype=torch.float64, requires_grad=True)
    pool = lambda t: _BlockMax.apply(t, fh, fw)  # noqa: E731
    assert torch.autograd.gradcheck(pool, (small,))
    assert torch.autograd.gradgradcheck(pool, (small,))


def _reference_bfp(bfp, levels):
    """The neck as written before the fast paths: every level resized, stacked and averaged,
    refined, then resized back with F.interpolate / adaptive max-pooling and added."""
    r = bfp.refine_level
    target = levels[r].shape[-2:]
    gathered = [F.adaptive_max_pool2d(lv, target) if i < r else
                F.interpolate(lv, size=target, mode="nearest") if i > r else lv
                for i, lv in enumerate(levels)]
    balanced = bfp.refine(torch.stack(gathered).mean(dim=0))
    return [lv + (F.interpolate(balanced, size=lv.shape[-2:], mode="nearest") if i < r else
                  F.adaptive_max_pool2d(balanced, lv.shape[-2:]) if i > r else balanced)
            for i, lv in enumerate(levels)]


@pytest.mark.parametrize("sizes", [
    [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)],  # configs/cpu_small.yaml at 256 px
    [(36, 40), (12, 20), (6, 10), (3, 5), (1, 1)],  # whole ratios, different per axis
    [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)],  # 800x1333: some not whole
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neck_equals_the_resize_stack_and_mean_form_in_value_and_gradient(sizes, dtype):
    # float32 (what trains) to 1e-6 in the outputs, the levels' gradients too; the parameters'
    # gradients sum over every position, so they are held to 1e-6 in float64, where the
    # comparison sees the algebra and not float32's summation order.
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_level=2, refine_type="non_local")
    _randomise(bfp)
    bfp = bfp.to(dtype)
    levels = [lv.to(dtype).requires_grad_() for lv in _levels(sizes=sizes)]
    copies = [lv.detach().clone().requires_grad_() for lv in levels]
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(lv.shape, generator=gen).to(dtype) for lv in levels]
    got, want = bfp(levels), _reference_bfp(bfp, copies)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    got_grads = torch.autograd.grad(sum((g * u).sum() for g, u in zip(got, upstream)),
                                    levels + list(bfp.parameters()))
    want_grads = torch.autograd.grad(sum((w * u).sum() for w, u in zip(want, upstream)),
                                     copies + list(bfp.parameters()))
    checked = len(got_grads) if dtype == torch.float64 else len(levels)
    # A coarse level's gradient sums a whole block of the balanced map's gradient (60 entries
    # into the 1x1 level), so in float32 it agrees to summation order: 1e-5 relative.
    grad_rtol = 1e-6 if dtype == torch.float64 else 1e-5
    for g, w in list(zip(got_grads, want_grads))[:checked]:
        torch.testing.assert_close(g, w, rtol=grad_rtol, atol=1e-6)


def test_a_single_level_is_doubled():
    # One level: the mean is the level itself, added back to itself.
    level = _levels(sizes=[(5, 7)])[0]
    (out,) = BalancedFeaturePyramid(CHANNELS, num_levels=1, refine_level=0, refine_type="none")([level])
    torch.testing.assert_close(out, 2 * level)


# ---------------------------------------------------------------------------------------------
# Refiners.
# ---------------------------------------------------------------------------------------------
def test_non_local_block_is_identity_at_init():
    block = NonLocalBlock2d(CHANNELS)
    x = _levels(sizes=[(7, 10)])[0]
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_non_local_bfp_equals_integration_only_at_init():
    levels = _levels()
    with_non_local = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type="non_local")
    without = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type="none")
    for got, want in zip(with_non_local(levels), without(levels)):
        torch.testing.assert_close(got, want)


def _randomise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def test_non_local_block_computes_the_embedded_gaussian_formula():
    # y_i = x_i + W_out sum_j softmax_j(theta_i . phi_j) g_j, without a 1/sqrt(d) scale.
    block = NonLocalBlock2d(CHANNELS)
    _randomise(block)
    x = _levels(sizes=[(3, 4)], batch=1)[0].double()
    block = block.double()

    def conv1x1(conv, feature):  # [C, HW] -> [C', HW]
        return conv.weight[:, :, 0, 0] @ feature + conv.bias[:, None]

    flat = x[0].reshape(CHANNELS, -1)
    theta, phi, g = conv1x1(block.theta, flat), conv1x1(block.phi, flat), conv1x1(block.g, flat)
    expected = torch.empty_like(flat)
    for i in range(flat.shape[1]):
        weights = torch.softmax(theta[:, i] @ phi, dim=0)  # [HW] over positions j
        expected[:, i] = flat[:, i] + conv1x1(block.out, (g * weights).sum(dim=1, keepdim=True))[:, 0]
    torch.testing.assert_close(block(x)[0].reshape(CHANNELS, -1), expected)


def _explicit_non_local(block, x):
    """The block written as the paper's matrices: x + W_out(g softmax(theta^T phi)^T), no scale."""
    n, _, h, w = x.shape
    theta, phi, g = (conv(x).flatten(2) for conv in (block.theta, block.phi, block.g))  # [N, C', HW]
    attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # [N, HW (query), HW (key)]
    return x + block.out((g @ attention.transpose(1, 2)).reshape(n, -1, h, w))


def _assert_close_scaled(got, want, name, scale):
    # float64: 1e-9 (the fused kernel and the explicit form agree to rounding). float32 against
    # the float64 reference: 1e-5 relative to the test's largest value (`scale`), since a
    # parameter's gradient sums over every position and batch element, and phi's bias has an
    # exact-zero gradient (softmax ignores a per-query shift) that float32 meets only to rounding.
    atol = 1e-9 if got.dtype == torch.float64 else 1e-5 * max(1.0, scale)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, size", [(1, (3, 4)), (2, (7, 10)), (3, (16, 16)), (2, (5, 1)),
                                         (1, (25, 38))])
def test_fused_non_local_block_equals_the_explicit_formula_in_value_and_gradient(batch, size, dtype):
    # The module (the fused kernel runs in both dtypes on the CPU) against the explicit
    # softmax(theta^T phi) g in float64: the output, the input's gradient and every
    # parameter's gradient under a random upstream gradient.
    block = NonLocalBlock2d(8, inner_channels=6)
    _randomise(block, seed=batch)
    reference = copy.deepcopy(block).double()
    block = block.to(dtype)
    gen = torch.Generator().manual_seed(sum(size))
    x = torch.randn(batch, 8, *size, generator=gen, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x_fused, x_ref = x.to(dtype, copy=True).requires_grad_(), x.clone().requires_grad_()

    fused, explicit = block(x_fused), _explicit_non_local(reference, x_ref)
    (fused * upstream.to(dtype)).sum().backward()
    (explicit * upstream).sum().backward()
    pairs = [("output", fused.detach(), explicit.detach()), ("input grad", x_fused.grad, x_ref.grad)]
    pairs += [(name, param.grad, ref.grad) for (name, param), ref
              in zip(block.named_parameters(), reference.parameters())]
    scale = max(want.abs().max().item() for _, _, want in pairs)
    for name, got, want in pairs:
        assert got is not None, name
        _assert_close_scaled(got, want, name, scale)


def test_fused_non_local_block_runs_a_fused_kernel_on_the_cpu():
    # The point of SDPA: in float32 on the CPU the flash kernel runs, not the math fallback
    # that builds the HW x HW matrix with a separate softmax.
    block = NonLocalBlock2d(CHANNELS)
    x = _levels(sizes=[(7, 10)])[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(x)
    names = {event.key for event in prof.key_averages()}
    assert any("flash_attention" in name for name in names), sorted(names)
    assert "aten::softmax" not in names and "aten::_softmax" not in names


def test_gradients_reach_every_non_local_parameter():
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type="non_local")
    nn.init.normal_(bfp.refine.out.weight, std=0.1)  # at zero init only `out` gets a gradient
    levels = _levels()
    sum(out.square().sum() for out in bfp(levels)).backward()
    for name, param in bfp.refine.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_conv_refine_changes_the_output():
    levels = _levels()
    conv = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type="conv")
    none = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type="none")
    differences = [(a - b).abs().max() for a, b in zip(conv(levels), none(levels))]
    assert all(d > 1e-3 for d in differences)


def test_conv_refine_is_conv_then_relu():
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_level=2, refine_type="conv")
    x = _levels(sizes=[(7, 10)])[0]
    conv = bfp.refine[0]
    torch.testing.assert_close(bfp.refine(x), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)))


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"refine_type": "attention"},
        {"refine_level": -1},
        {"refine_level": 5},
        {"num_levels": 0, "refine_level": 0},
        {"in_channels": 0},
    ],
)
def test_bad_arguments_raise(kwargs):
    args = {"in_channels": CHANNELS, "num_levels": 5, **kwargs}
    with pytest.raises(ValueError):
        BalancedFeaturePyramid(**args)


def test_wrong_inputs_raise():
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels=5, refine_type="none")
    with pytest.raises(ValueError, match="5 levels"):
        bfp(_levels()[:4])
    with pytest.raises(TypeError):
        bfp(torch.zeros(1, CHANNELS, 4, 4))


# ---------------------------------------------------------------------------------------------
# The backbone wrapper.
# ---------------------------------------------------------------------------------------------
class _TinyPyramidBackbone(nn.Module):
    """Five levels at strides 4..64, like torchvision's BackboneWithFPN, from one conv."""

    def __init__(self, out_channels=CHANNELS):
        super().__init__()
        self.stem = nn.Conv2d(3, out_channels, kernel_size=3, stride=4, padding=1)
        self.out_channels = out_channels

    def forward(self, images):
        level = self.stem(images)
        features = OrderedDict()
        for name in NAMES:
            features[name] = level
            level = F.max_pool2d(level, kernel_size=1, stride=2)
        return features


def test_backbone_wrapper_keeps_out_channels_and_keys():
    backbone = _TinyPyramidBackbone()
    wrapped = BackboneWithBFP(backbone, BalancedFeaturePyramid(CHANNELS, num_levels=5))
    assert wrapped.out_channels == CHANNELS
    images = torch.randn(1, 3, 100, 150)
    plain, balanced = backbone(images), wrapped(images)
    assert isinstance(balanced, OrderedDict) and list(balanced) == NAMES
    assert [v.shape for v in balanced.values()] == [v.shape for v in plain.values()]


def test_backbone_wrapper_rejects_mismatches():
    with pytest.raises(ValueError, match="in_channels"):
        BackboneWithBFP(_TinyPyramidBackbone(), BalancedFeaturePyramid(CHANNELS + 1, num_levels=5))
    with pytest.raises(ValueError, match="out_channels"):
        BackboneWithBFP(nn.Identity(), BalancedFeaturePyramid(CHANNELS, num_levels=5))


def test_torchvision_faster_rcnn_accepts_the_wrapper():
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    backbone = BackboneWithBFP(_TinyPyramidBackbone(), BalancedFeaturePyramid(CHANNELS, num_levels=5))
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64,
                       rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------------------
# Edges found by mutation testing (docs/testing.md).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    ((0, 5), "in_channels must be >= 1, got 0"),
    ((8, 0), "num_levels must be >= 1, got 0"),
    ((8, 5, 5), r"refine_level must be in \[0, 4\], got 5"),
    ((8, 5, 2, "deformable"), "refine_type must be one of .*, got 'deformable'"),
])
def test_bad_settings_name_the_setting_and_the_value(args, message):
    with pytest.raises(ValueError, match="BalancedFeaturePyramid: " + message):
        BalancedFeaturePyramid(*args)


def test_defaults_and_smallest_valid_settings():
    bfp = BalancedFeaturePyramid(1, 5, refine_type="conv")  # one channel is valid
    assert bfp.refine_level == 2 and BalancedFeaturePyramid(8, 5).refine_level == 2  # the paper's C4
    assert bfp.refine_type == "conv" and "refine_type='conv'" in repr(bfp)
    # The conv refinement is one 3x3 conv (padding 1): it keeps the refine level's size.
    conv = bfp.refine[0]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    x = torch.randn(1, 1, 8, 8)
    assert conv(x).shape == x.shape


def test_wrong_inputs_name_what_was_given():
    with pytest.raises(TypeError, match="expected an OrderedDict or a list of tensors, got dict_values"):
        BalancedFeaturePyramid(4, 2, refine_level=0)({"a": torch.zeros(1, 4, 4, 4)}.values())
    with pytest.raises(ValueError, match="BackboneWithBFP: the backbone has no `out_channels` attribute"):
        BackboneWithBFP(nn.Identity(), BalancedFeaturePyramid(4, 2, refine_level=0))


def test_xavier_init_resets_every_conv_weight_and_zeroes_biases():
    from detectors.bfp import xavier_init_

    bfp = BalancedFeaturePyramid(8, 3, refine_type="non_local")
    convs = [m for m in bfp.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        nn.init.constant_(conv.weight, 7.0)
        if conv.bias is not None:
            nn.init.constant_(conv.bias, 3.0)
    assert xavier_init_(bfp) is bfp
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier-uniform's U(-bound, bound)
        assert conv.weight.abs().max() <= bound and conv.weight.std() > 0
        if conv.bias is not None:
            assert torch.all(conv.bias == 0)
    no_bias = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False))
    nn.init.constant_(no_bias[0].weight, 7.0)
    assert xavier_init_(no_bias)[0].weight.abs().max() <= (6.0 / 4) ** 0.5  # fan_in = fan_out = 2


def test_non_local_block_settings_and_init():
    assert NonLocalBlock2d(1).theta.out_channels == 1  # one channel is valid
    assert NonLocalBlock2d(8, inner_channels=1).theta.out_channels == 1
    assert NonLocalBlock2d(8, inner_channels=4).g.out_channels == 4  # given inner width is kept
    for args in ((0,), (8, 0)):
        with pytest.raises(ValueError, match=r"NonLocalBlock2d: channels and inner_channels must "
                                             r"be >= 1, got \d+ and \d+"):
            NonLocalBlock2d(*args)
    # Embedding weights ~ N(0, 0.01): over 64 x 64 weights the sample std is within 10% of 0.01.
    block = NonLocalBlock2d(64)
    for conv in (block.theta, block.phi, block.g):
        assert 0.009 < conv.weight.std().item() < 0.011
