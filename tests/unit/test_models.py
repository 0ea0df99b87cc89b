"""Tests for the model registry and the book's and our own CNNs (transfer models: see
test_transfer_models.py)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from cnnkit.config import Preprocessing
from cnnkit.models.registry import (
    check_options,
    create_model,
    create_model_outline,
    list_models,
    model_input,
    model_options,
    register_model,
)

# name -> (in_channels, image_size, batch_size, options)
CASES = {
    "symbol_cnn": (1, 32, 2, {"width": 8}),
    "symbol_cnn-3ch": (3, 32, 2, {"width": 8}),
    "symbol_cnn-1stage": (1, 32, 2, {"width": 8, "stages": 1}),
    "symbol_cnn-5stages": (1, 32, 2, {"width": 4, "stages": 5, "layers_per_stage": 1}),
    "book_cnn": (3, 32, 2, {}),
    "book_cnn-1conv": (3, 32, 2, {"convs": 1}),
    "book_cnn-1ch-relu": (1, 32, 2, {"activation": "relu", "dense": 64}),
    "book_bird_cnn": (3, 256, 1, {}),
}


def _build(case: str, num_classes: int = 7) -> tuple[nn.Module, torch.Tensor]:
    channels, size, batch_size, options = CASES[case]
    torch.manual_seed(0)
    model = create_model(case.split("-")[0], num_classes, channels, **options)
    inputs = torch.rand(batch_size, channels, size, size)
    return model, inputs


def _count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_builtin_models_are_registered() -> None:
    assert {"book_cnn", "book_bird_cnn", "symbol_cnn"} <= set(list_models())


def test_unknown_model_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*symbol_cnn"):
        create_model("resnet50", num_classes=7)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) depth.*width"):
        create_model("symbol_cnn", num_classes=7, depth=3)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("symbol_cnn", num_classes=0)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("book_cnn", {"convs": 3}),
        ("book_cnn", {"activation": "sigmoid"}),
        ("symbol_cnn", {"stages": 6}),
        ("symbol_cnn", {"stages": 0}),
        ("symbol_cnn", {"width": 0}),
    ],
)
def test_invalid_option_values(name: str, options: dict) -> None:
    with pytest.raises(ValueError):
        create_model(name, num_classes=7, **options)


def test_duplicate_registration_fails() -> None:
    def symbol_cnn(num_classes: int, in_channels: int = 1) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    list_models()  # Make sure the built-in symbol_cnn is registered first.
    with pytest.raises(ValueError, match="already registered"):
        register_model(symbol_cnn)


def test_model_options_report_defaults() -> None:
    assert model_options("book_cnn") == {
        "convs": 2,
        "dense": 128,
        "dropout": 0.5,
        "activation": "tanh",
        "image_size": 32,
    }
    assert "in_channels" not in model_options("symbol_cnn")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("book_cnn", {"dense": 64.5}, "model option dense must be a whole number; got 64.5"),
        ("book_cnn", {"convs": 1.5}, "model option convs must be a whole number; got 1.5"),
        ("book_cnn", {"dense": float("inf")}, "dense must be a whole number; got inf"),
        ("efficientnet_lite0", {"hidden": 1.5}, "hidden must be a whole number; got 1.5"),
        ("symbol_cnn", {"width": True}, "width must be a whole number; got True"),
        ("book_cnn", {"dropout": float("nan")}, "dropout must be a finite number; got nan"),
        ("book_cnn", {"dense": 0}, "book_cnn dense must be a whole number >= 1; got 0"),
        ("book_cnn", {"dense": -1}, "book_cnn dense must be a whole number >= 1; got -1"),
        ("book_cnn", {"convs": 0}, "book_cnn convs must be 1 or 2; got 0"),
        ("book_cnn", {"dropout": 1.0}, "book_cnn dropout must be in [0, 1); got 1.0"),
        ("symbol_cnn", {"dropout": 1.0}, "symbol_cnn dropout must be in [0, 1); got 1.0"),
        ("efficientnet_lite_trio", {"image_size": 4090}, "trio image_size must be 32-4064; got"),
        ("efficientnet_lite_trio", {"image_size": 16}, "trio image_size must be 32-4064; got 16"),
        ("efficientnet_lite0", {"image_size": 31}, "lite0 image_size must be 32-4064; got 31"),
        ("symbol_cnn", {"dropout": -0.5}, "symbol_cnn dropout must be in [0, 1); got -0.5"),
        ("efficientnet_lite0", {"dropout": 1}, "transfer head dropout must be in [0, 1); got 1"),
        ("book_cnn", {"image_size": 9}, "book_cnn with 2 conv(s) needs image_size >= 10"),
        ("book_cnn", {"convs": 1, "image_size": 3}, "needs image_size >= 4 px; got 3"),
        ("book_bird_cnn", {"dense": 0}, "book_bird_cnn dense must be a whole number >= 1"),
        ("book_bird_cnn", {"image_size": 35}, "book_bird_cnn needs image_size >= 36 px"),
        ("book_bird_cnn", {"dropout": 1.0}, "book_bird_cnn dropout must be in [0, 1); got 1.0"),
    ],
)
def test_option_values_no_layer_can_take_are_one_line(name, options, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        create_model(name, 7, 3, **options)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_each_model_takes_its_own_channels_unless_told() -> None:
    """create_model(name, num_classes), timm-style: the book's network is its 3-channel one
    (its weight count: test_book_cnn_parameter_counts), and an ImageNet backbone builds."""
    book = create_model("book_cnn", 369, dense=1024)
    assert _first_conv(book).in_channels == 3
    assert book.default_preprocessing.channels == 3
    lite = create_model("efficientnet_lite0", 7)
    assert _first_conv(lite).in_channels == 3 and lite.default_preprocessing.channels == 3
    symbol = create_model("symbol_cnn", 7)
    assert _first_conv(symbol).in_channels == 1 and symbol.default_preprocessing.channels == 1
    # Told otherwise, the book's network takes one channel.
    gray_book = create_model("book_cnn", 7, 1)
    assert _first_conv(gray_book).in_channels == 1
    assert gray_book.default_preprocessing.channels == 1


def test_whole_numbers_written_as_fractions_are_whole_numbers() -> None:
    # YAML and --option read 2.0 and 1e2 as fractions.
    model = create_model("book_cnn", 7, 3, convs=1.0, dense=1e2)
    assert isinstance(model.dense[0].out_features, int) and model.dense[0].out_features == 100
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 1
    assert check_options("book_cnn", {"dense": 64.0, "dropout": 0}) == {"dense": 64, "dropout": 0}


@pytest.mark.parametrize(("convs", "size"), [(2, 48), (1, 20), (2, 10)])
def test_book_cnn_is_sized_for_its_input(convs: int, size: int) -> None:
    model = create_model("book_cnn", 7, 3, convs=convs, image_size=size).eval()
    assert model.default_preprocessing.image_size == size
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 7)


def test_a_lite_backbone_takes_another_input_size_with_its_weights_preprocessing() -> None:
    """The backbone pools its features, so ``image_size`` sets only the input (and the stored
    photo, 32 px larger for the centre crop): 224 px stays Lite0's default."""
    native = create_model("efficientnet_lite0", 5, 3).default_preprocessing
    model = create_model("efficientnet_lite0", 5, 3, image_size=96).eval()
    assert model.default_preprocessing == replace(native, image_size=96, stored_size=128)
    assert native.image_size == 224
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5)


def test_book_bird_cnn_is_sized_for_its_input() -> None:
    model = create_model("book_bird_cnn", 2, 3, dense=8, image_size=64).eval()
    assert model.default_preprocessing.image_size == 64
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2)
    # The book's two dropouts are 0.5; --dropout (as for every model) sets both.
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    lighter = create_model("book_bird_cnn", 2, 3, dense=8, image_size=64, dropout=0.2)
    assert [m.p for m in lighter.modules() if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2]


def test_an_outline_has_the_shapes_and_input_without_memory() -> None:
    outline = create_model_outline("book_cnn", 7, 3, dense=10**6, image_size=48)
    assert all(tensor.is_meta for tensor in outline.state_dict().values())
    assert outline.dense[0].weight.shape == (10**6, 32 * 10 * 10)
    assert model_input("book_cnn", 3, {"image_size": 48}).image_size == 48


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_shape_follows_num_classes(case: str) -> None:
    model, inputs = _build(case)
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    assert logits.shape == (len(inputs), 7)
    assert model.registry_name == case.split("-")[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_trainable_parameter_gets_a_gradient(case: str) -> None:
    model, inputs = _build(case)
    model.train()
    model(inputs).logsumexp(dim=1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", ["symbol_cnn", "book_cnn", "book_cnn-1conv"])
def test_head_api_composes_and_resets(case: str) -> None:
    model, inputs = _build(case)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(inputs)), model(inputs))
        model.reset_classifier(5)
        assert model(inputs).shape == (len(inputs), 5)


def test_book_cnn_parameter_counts() -> None:
    # The book's 1,024-unit model on 3-channel 32x32 inputs with 369 classes.
    assert _count(create_model("book_cnn", 369, 3, dense=1024)) == 1_569_041
    # Two valid 3x3 convs and two pools leave 6x6x32; one conv and one pool leave 15x15x32.
    assert create_model("book_cnn", 369, 3).dense[0].in_features == 6 * 6 * 32
    assert create_model("book_cnn", 369, 3, convs=1).dense[0].in_features == 15 * 15 * 32


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
def test_symbol_cnn_stages_double_the_width(stages: int) -> None:
    model = create_model("symbol_cnn", 7, 1, width=4, stages=stages, layers_per_stage=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [4 * 2**stage for stage in range(stages)]
    assert model.classifier.in_features == model.num_features
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == stages - 1


def test_default_preprocessing() -> None:
    symbol = create_model("symbol_cnn", 7, 3).default_preprocessing
    assert symbol == Preprocessing("symbol", 3, 32, 32, (0.5,) * 3, (0.5,) * 3)
    book = create_model("book_cnn", 7, 3).default_preprocessing
    assert (book.mode, book.channels, book.mean, book.std) == ("symbol", 3, (0.0,) * 3, (1.0,) * 3)
    bird = create_model("book_bird_cnn", 7, 3, dense=8).default_preprocessing
    assert (bird.mode, bird.image_size, bird.stored_size) == ("photo", 256, 256)


def test_a_run_at_a_size_the_network_cannot_take_is_refused_before_any_data_loads() -> None:
    """From Python (the CLI passes the size on): book_cnn's dense layer is sized for 32 px."""
    from cnnkit.config import build_run_config
    from cnnkit.presets import preset_for
    from cnnkit.training.preprocessing import resolve_preprocessing

    base = preset_for("digits")
    wide = build_run_config(base, {"model": {"name": "book_cnn"}, "data": {"image_size": 64}})
    with pytest.raises(ValueError, match=r"book_cnn cannot take 64 px inputs .*image_size: 64"):
        resolve_preprocessing(wide)
    sized = {
        "model": {"name": "book_cnn", "options": {"image_size": 64}},
        "data": {"image_size": 64},
    }
    assert resolve_preprocessing(build_run_config(base, sized)).image_size == 64
