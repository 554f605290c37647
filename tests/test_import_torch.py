"""PyTorch import (issue 12) against a real server: modules registered with `register_torch` answer `infer` as the
module's own forward does (eval mode); refusals are ConvErrors naming the submodule, raised before sending; the module
given is not changed (weights, buffers, train/eval mode)."""
import asyncio
import sys

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _server import client, server  # noqa: E402,F401  (fixtures)
from client import AsyncConvClient, ConvClient, ConvError, torch_layers  # noqa: E402

# torch's own note about its "same" with an even kernel (it pads a copy); the import maps it exactly all the same.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

nn = torch.nn
_COUNTER = iter(range(10**6))


def _randomize_bn(module):
    """Running statistics and affine parameters away from the identity, so that folding is exercised."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)
    return module


def _expected(module, x):
    """The module's own forward in eval mode, its modes restored afterwards (as register_torch promises)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    with torch.no_grad():
        y = module(torch.from_numpy(x)).numpy()
    for m, training in modes:
        m.training = training
    return y


def _roundtrip(client, module, x, rtol=1e-4, atol=1e-4, **kwargs):
    name = f"torch-{next(_COUNTER)}"
    info = client.register_torch(name, module, **kwargs)
    y = client.infer(name, x)
    expected = _expected(module, x)
    assert expected.std() > 1e-2, "a module whose output is (nearly) constant would test nothing"
    assert y.shape == expected.shape and y.dtype == expected.dtype
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)
    client.delete_model(name)
    return info


def test_every_supported_layer_2d(client):
    torch.manual_seed(1)
    m = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 4, padding="same", dilation=(2, 1)), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=(1, 2), groups=2), nn.ReLU6(), nn.Dropout(0.5),
        nn.Conv2d(8, 16, 3, groups=8, padding="valid", bias=False), nn.BatchNorm2d(16, affine=False), nn.SiLU(),
        nn.Conv2d(16, 8, 1), nn.GELU(), nn.Identity(), nn.Conv2d(8, 8, 1), nn.ELU(),
        nn.Conv2d(8, 8, 1), nn.Softplus(), nn.Conv2d(8, 8, 1), nn.Sigmoid(), nn.Conv2d(8, 4, 1), nn.Tanh(),
        nn.Conv2d(4, 4, 1), nn.Hardtanh(0.0, 6.0), nn.Dropout2d(0.2)))
    x = (np.random.default_rng(1).standard_normal((2, 3, 15, 14)) * 2).astype(np.float32)
    info = _roundtrip(client, m.eval(), x)
    assert [layer["activation"] for layer in info["layers"]] == \
        ["relu", "relu6", "silu", "gelu", "elu", "softplus", "sigmoid", "tanh", "relu6"]
    assert info["layers"][0]["padding"] == ((3, 3), (1, 2))  # torch's "same": d*(k-1) = 6 and 3, odd one at the end
    assert info["layers"][2]["groups"] == 8 and info["layers"][2]["bias"]  # BN folded into a bias


def test_1d_same_even_kernel_and_3d_float64(client):
    torch.manual_seed(2)
    m1 = _randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 4, padding="same"), nn.BatchNorm1d(4), nn.ReLU(),
                                     nn.Conv1d(4, 4, 3, stride=3, padding=2, dilation=2, groups=4), nn.Tanh()))
    info = _roundtrip(client, m1.eval(), np.random.default_rng(2).standard_normal((2, 3, 19)).astype(np.float32))
    assert info["layers"][0]["padding"] == ((1, 2),)  # torch's "same": the odd pad at the end
    m3 = _randomize_bn(nn.Sequential(nn.Conv3d(2, 4, 3, padding=(1, 0, 1), stride=(2, 1, 1)), nn.BatchNorm3d(4),
                                     nn.SiLU(), nn.Conv3d(4, 2, (1, 2, 3), padding="same"))).double()
    info = _roundtrip(client, m3.eval(), np.random.default_rng(3).standard_normal((1, 2, 7, 6, 5)),
                      rtol=1e-10, atol=1e-10)
    assert info["dtype"] == "float64" and info["spatial_dims"] == 3


def test_nested_custom_and_bare(client):
    """Nested Sequentials, a custom module whose forward chains submodules (torch.fx), a bare Conv2d."""
    torch.manual_seed(3)

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.GELU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    m = _randomize_bn(nn.Sequential(Block(3, 6), nn.Sequential(nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU())),
                                    Block(4, 2)))
    x = np.random.default_rng(4).standard_normal((1, 3, 9, 9)).astype(np.float32)
    info = _roundtrip(client, m.eval(), x, example_input=torch.from_numpy(x))
    assert [layer["activation"] for layer in info["layers"]] == ["gelu", "relu", "gelu"]
    _roundtrip(client, Block(3, 5).eval(), x)
    _roundtrip(client, nn.Conv2d(3, 2, 3, stride=2), x, example_input=x)  # numpy example too


def test_train_mode_module_registers_with_inference_semantics_and_is_unchanged(client):
    torch.manual_seed(4)
    m = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.9),
                                    nn.Conv2d(4, 2, 1)))
    m.train()
    m[4].eval()  # a mixed state: it must come back exactly so
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [sub.training for sub in m.modules()]
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _roundtrip(client, m, x, example_input=torch.from_numpy(x))  # BN uses running stats, Dropout is skipped
    assert [sub.training for sub in m.modules()] == modes
    after = m.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():  # weights and buffers (running stats, num_batches_tracked) untouched
        assert torch.equal(value, after[key]), key


def test_async_twin(server):
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid()).eval()
    x = np.random.default_rng(6).standard_normal((1, 3, 6, 6)).astype(np.float32)

    async def scenario():
        async with AsyncConvClient(server.target) as c:
            await c.register_torch("async-torch", m, example_input=torch.from_numpy(x))
            with pytest.raises(ConvError, match=r"module '1' \(MaxPool2d\): MaxPool2d is not supported"):
                await c.register_torch("async-bad", nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2)))
            return await c.infer("async-torch", x)

    np.testing.assert_allclose(asyncio.run(scenario()), _expected(m, x), rtol=1e-4, atol=1e-4)


def test_example_input_catches_a_forward_the_import_cannot_see():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    m.forward = lambda x: nn.Sequential.forward(m, x) * 2  # an instance attribute: not the class's forward
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConvError, match=r"the module's forward on example_input differs from its layers run in "
                                        r"order \(max abs difference"):
        torch_layers(m, example_input=x)
    with pytest.raises(ConvError, match=r"example_input of shape \(1, 5, 8, 8\) cannot be run through the module"):
        torch_layers(nn.Sequential(nn.Conv2d(3, 4, 3)), example_input=torch.randn(1, 5, 8, 8))
    with pytest.raises(ConvError, match=r"example_input has dtype torch.float64, the module's weights are "
                                        r"torch.float32"):
        torch_layers(nn.Sequential(nn.Conv2d(3, 4, 3)), example_input=torch.randn(1, 3, 8, 8).double())


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x).relu())


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def _hooked():
    m = nn.Sequential(nn.Conv2d(3, 3, 1))
    m[0].register_forward_hook(lambda mod, inp, out: out * 2)
    return m


_REFUSALS = {
    "reflect": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
                r"module '0' \(Conv2d\): padding_mode='reflect' is not supported; only 'zeros'"),
    "replicate": (lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="replicate"),
                  r"module \(Conv1d\): padding_mode='replicate' is not supported"),
    "circular": (lambda: nn.Sequential(nn.Conv3d(3, 4, 3, padding=1, padding_mode="circular")),
                 r"padding_mode='circular' is not supported"),
    "transposed": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3)),
                   r"module '0' \(ConvTranspose2d\): ConvTranspose2d is not supported; supported: Conv1d/2d/3d"),
    "pool": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)),
             r"module '1' \(MaxPool2d\): MaxPool2d is not supported"),
    "gelu tanh": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(approximate="tanh")),
                  r"module '1' \(GELU\): approximate='tanh' is not supported"),
    "elu alpha": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU(alpha=0.5)),
                  r"module '1' \(ELU\): alpha=0.5 is not supported"),
    "softplus beta": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(beta=2)),
                      r"module '1' \(Softplus\): beta=2, threshold=20(\.0)? is not supported"),
    "hardtanh": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardtanh(-1, 1)),
                 r"module '1' \(Hardtanh\): Hardtanh is not supported"),
    "leaky relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU()),
                   r"module '1' \(LeakyReLU\): LeakyReLU is not supported"),
    "bn without running stats": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3),
                                                       nn.BatchNorm2d(4, track_running_stats=False)),
                                 r"module '1' \(BatchNorm2d\): track_running_stats=False .* is not supported"),
    "bn first": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)),
                 r"module '0' \(BatchNorm2d\): a batch normalization at the start cannot be folded"),
    "bn after activation": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
                            r"module '2' \(BatchNorm2d\): a batch normalization after module '1' \(ReLU\) cannot"),
    "bn channels": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)),
                    r"module '1' \(BatchNorm2d\): scale has shape \(5,\), expected \(4,\)"),
    "two activations": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sigmoid()),
                        r"module '2' \(Sigmoid\): a second activation \(sigmoid\) right after module '1' \(ReLU\)"),
    "activation first": (lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3)),
                         r"module '0' \(ReLU\): an activation \(relu\) before the first convolution"),
    "no conv": (lambda: nn.Sequential(nn.Identity()), r"the module has no convolution"),
    "float16": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)).half(),
                r"module '0' \(Conv2d\): weights of dtype torch.float16 are not supported"),
    "bfloat16": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)).to(torch.bfloat16),
                 r"weights of dtype torch.bfloat16 are not supported"),
    "mixed dtypes": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1).double()),
                     r"module '1' \(Conv2d\): weights are float64, earlier layers are float32"),
    "residual": (lambda: _Residual(), r"module \(_Residual\): a branch: fx node 'x' feeds 2 nodes \(conv, add\)"),
    "submodule twice": (lambda: _Twice(), r"module \(_Twice\): forward has call_method relu"),
    "overridden forward": (lambda: nn.Sequential(_ScaledConv(3, 3, 1)),
                           r"module '0' \(_ScaledConv\): it subclasses Conv2d and overrides forward"),
    "hook": (_hooked, r"module '0' \(Conv2d\): it has forward hooks"),
    "lazy": (lambda: nn.Sequential(nn.LazyConv2d(4, 3)), r"module '0' \(LazyConv2d\): its parameters are not "
                                                         r"initialized yet"),
    "not a module": (lambda: [nn.Conv2d(3, 4, 3)], r"module must be a torch.nn.Module, got list"),
}


@pytest.mark.parametrize("case", sorted(_REFUSALS))
def test_refusals_name_the_module(case):
    """Refused before anything is sent: the client points at a port nobody listens on."""
    make, pattern = _REFUSALS[case]
    with ConvClient("127.0.0.1:1", timeout=5.0, retries=1) as dead:
        with pytest.raises(ConvError, match=pattern) as err:
            dead.register_torch("refused", make())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ConvError, match=r"register_torch needs the 'torch' package.*pip install "
                                        r"'convcore-service\[torch\]'"):
        torch_layers(object())
