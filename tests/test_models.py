"""Built-in models: shapes, gradients, normalisation inside the model, CAM, Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
from cfbench.errors import UsageError
from cfbench.models import (
    GAPCNN,
    ModelBase,
    PreActResNet18,
    SmallCNN8,
    SmallCNN28,
    WideResNet,
    build_model,
    count_parameters,
)
from opacus.validators import ModuleValidator

# (class, in_channels, image_size, small params) -- small widths keep the test fast.
CASES = [
    (SmallCNN8, 1, 8, SmallCNN8.Params(width=8)),
    (SmallCNN28, 1, 28, SmallCNN28.Params(width=8, hidden=32)),
    (GAPCNN, 1, 8, GAPCNN.Params(width=8)),
    (GAPCNN, 1, 28, GAPCNN.Params(width=8)),
    (GAPCNN, 3, 32, GAPCNN.Params(width=8)),
    (GAPCNN, 3, 32, GAPCNN.Params(width=8, groups=4)),
    (PreActResNet18, 3, 32, PreActResNet18.Params(width=8)),
    (WideResNet, 3, 32, WideResNet.Params(depth=10, widen=1)),
]
IDS = [f"{c.__name__}-{s}" + ("-gn" if getattr(p, "groups", 0) else "") for c, _, s, p in CASES]
CLASSES = 7


def _make(cls, c, size, params, mean=None, std=None):
    mean = mean if mean is not None else (0.0,) * c
    std = std if std is not None else (1.0,) * c
    return cls(c, CLASSES, size, mean, std, params)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("cls,c,size,params", CASES, ids=IDS)
def test_logits_shape_and_input_gradients(cls, c, size, params):
    model = _make(cls, c, size, params, mean=(0.5,) * c, std=(0.25,) * c)
    assert isinstance(model, ModelBase)
    x = torch.rand(3, c, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (3, CLASSES)
    assert torch.isfinite(out).all()
    out[torch.arange(3), torch.tensor([0, 1, 2])].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("cls,c,size,params", CASES, ids=IDS)
def test_normalisation_is_inside_the_model(cls, c, size, params):
    mean = tuple(0.3 + 0.1 * i for i in range(c))
    std = tuple(0.2 + 0.05 * i for i in range(c))
    a = _make(cls, c, size, params, mean=mean, std=std).eval()
    b = _make(cls, c, size, params).eval()
    sd = {k: v for k, v in a.state_dict().items() if not k.startswith("normalize.")}
    missing, unexpected = b.load_state_dict(sd, strict=False)
    assert set(missing) == {"normalize.mean", "normalize.std"} and not unexpected
    assert a.normalize.mean.shape == (1, c, 1, 1) and a.normalize.std.shape == (1, c, 1, 1)
    x = torch.rand(2, c, size, size)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.equal(a(x), b((x - m) / s))


@pytest.mark.parametrize("cls,c,bad", [(SmallCNN8, 1, 28), (SmallCNN28, 1, 8),
                                       (PreActResNet18, 3, 28), (WideResNet, 3, 8)])
def test_unsupported_size_names_the_supported_sizes(cls, c, bad):
    with pytest.raises(UsageError) as e:
        cls(c, 10, bad, (0.5,) * c, (0.25,) * c)
    msg = str(e.value)
    assert cls.name in msg and f"{bad}x{bad}" in msg
    for s in cls.input_sizes:
        assert f"{s}x{s}" in msg


def test_gapcnn_minimum_size():
    with pytest.raises(UsageError, match=r"gap-cnn.*4x4.*>= 8"):
        GAPCNN(1, 10, 4, (0.5,), (0.25,))


@pytest.mark.parametrize("depth", [11, 12, 4])
def test_wrn_bad_depth_names_valid_depths(depth):
    with pytest.raises(UsageError, match=r"depth.*10, 16, 22, 28, 34"):
        WideResNet(3, 10, 32, (0.5,) * 3, (0.25,) * 3, WideResNet.Params(depth=depth))
    with pytest.raises(UsageError, match=r"depth.*10, 16, 22, 28, 34"):
        build_model("wrn", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, {"depth": str(depth)})


@pytest.mark.parametrize("c,size", [(1, 8), (1, 28), (3, 32)])
def test_gapcnn_cam(c, size):
    model = GAPCNN(c, CLASSES, size, (0.4,) * c, (0.3,) * c, GAPCNN.Params(width=8)).eval()
    x = torch.rand(4, c, size, size, requires_grad=True)
    target = torch.tensor([0, 3, 6, 3])
    cam = model.cam(x, target)
    feats = model.features(x)
    n, k, h, w = feats.shape
    assert k == 32 and h == w == model.feature_size and h >= 4
    assert cam.shape == (n, h, w)
    # direct computation: sum_k W[target, k] * A_k
    direct = torch.stack([(model.fc.weight[t].view(k, 1, 1) * feats[i]).sum(0)
                          for i, t in enumerate(target.tolist())])
    torch.testing.assert_close(cam, direct)
    # CAM identity of GAP nets: the spatial *mean* of the CAM plus the bias is the logit
    logits = model(x)
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + model.fc.bias[target],
                               logits[torch.arange(n), target])
    # differentiable with respect to the input and the weights
    cam.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.fc.weight.grad is not None


@pytest.mark.parametrize("model", [
    SmallCNN8(1, 10, 8, (0.5,), (0.25,)),
    SmallCNN28(1, 10, 28, (0.5,), (0.25,), SmallCNN28.Params(width=8, hidden=16)),
    GAPCNN(3, 10, 32, (0.5,) * 3, (0.25,) * 3, GAPCNN.Params(width=8)),
    GAPCNN(3, 10, 32, (0.5,) * 3, (0.25,) * 3, GAPCNN.Params(width=8, groups=4)),
], ids=["cnn8", "cnn28", "gap-cnn", "gap-cnn-gn"])
def test_opacus_compatible(model):
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("model", [
    PreActResNet18(3, 10, 32, (0.5,) * 3, (0.25,) * 3, PreActResNet18.Params(width=8)),
    WideResNet(3, 10, 32, (0.5,) * 3, (0.25,) * 3, WideResNet.Params(depth=10, widen=1)),
], ids=["preact-resnet18", "wrn"])
def test_resnets_need_modulevalidator_fix_for_dp(model):
    # BatchNorm mixes samples, so DP-SGD runs must convert it (BatchNorm -> GroupNorm) first.
    assert ModuleValidator.validate(model, strict=False)
    fixed = ModuleValidator.fix(model)
    assert ModuleValidator.validate(fixed, strict=False) == []
    assert fixed(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_default_sizes_match_the_references():
    # PreActResNet18 (11.17M) and WRN-28-10 (36.5M) for CIFAR-10, as usually quoted.
    assert round(count_parameters(PreActResNet18(3, 10, 32, (0.5,) * 3, (0.25,) * 3)) / 1e6, 2) == 11.17
    wrn = WideResNet(3, 10, 32, (0.5,) * 3, (0.25,) * 3, WideResNet.Params(depth=28, widen=10))
    assert round(count_parameters(wrn) / 1e6, 1) == 36.5
    assert SmallCNN8(1, 10, 8, (0.5,), (0.25,)).classifier[1].in_features == 1024


def test_build_model():
    model = build_model("cnn8", (1, 8, 8), 10, (0.5,), (0.25,), {"width": 16})
    assert isinstance(model, SmallCNN8)
    assert model.params == SmallCNN8.Params(width=16)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor([0.5]))
    # strings (as --set gives them) are cast to the declared types
    m2 = build_model("cnn28", (1, 28, 28), 10, (0.5,), (0.25,), {"width": "4", "hidden": "8"})
    assert m2.params == SmallCNN28.Params(width=4, hidden=8)
    assert isinstance(build_model("gap-cnn", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, None), GAPCNN)


def test_build_model_errors():
    with pytest.raises(UsageError) as e:
        build_model("cnn9", (1, 8, 8), 10, (0.5,), (0.25,), None)
    msg = str(e.value)
    assert "cnn9" in msg and "Valid choices" in msg
    for name in ("cnn8", "cnn28", "gap-cnn", "preact-resnet18", "wrn"):
        assert name in msg
    with pytest.raises(UsageError, match=r"unknown setting 'model\.widht'.*Did you mean 'width'"):
        build_model("cnn8", (1, 8, 8), 10, (0.5,), (0.25,), {"widht": 16})
    with pytest.raises(UsageError, match="model.width"):
        build_model("cnn8", (1, 8, 8), 10, (0.5,), (0.25,), {"width": 0})
    with pytest.raises(UsageError, match="one value per channel"):
        build_model("cnn8", (1, 8, 8), 10, (0.5, 0.5), (0.25, 0.25), None)


def test_song_vgg_is_the_papers_network():
    """Song, Shokri & Mittal (2019)'s F-MNIST VGG (inspire-group/privacy-vs-robustness, width_num 16):
    six 3x3 convs 256, 256, 256/2, 512, 512, 512/2, FC-200, FC-10; last layer zero-initialised."""
    from cfbench.models.song_vgg import SongVGG

    m = build_model("song-vgg", (1, 28, 28), 10, (0.5,), (0.25,), None)
    assert isinstance(m, SongVGG)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 256, 256, 512, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (512 * 7 * 7, 200, 10)
    chans = [1, 256, 256, 256, 512, 512, 512]
    expected = sum(a * b * 9 + b for a, b in zip(chans, chans[1:])) + 512 * 49 * 200 + 200 + 200 * 10 + 10
    assert count_parameters(m) == expected
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(m(x), torch.zeros(2, 10))  # zero-initialised output layer, as the reference
    m32 = build_model("song-vgg", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, {"width": 1})
    assert m32.fc1.in_features == 32 * 8 * 8 and m32(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UsageError, match="song-vgg.*8"):
        build_model("song-vgg", (1, 8, 8), 10, (0.5,), (0.25,), None)


def test_song_vgg_trains_and_passes_opacus():
    m = build_model("song-vgg", (1, 28, 28), 4, (0.5,), (0.25,), {"width": 1})
    assert ModuleValidator.is_valid(m)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 4
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    xg = x[:2].clone().requires_grad_(True)
    m(xg)[:, 0].sum().backward()
    assert xg.grad.abs().sum() > 0
