"""Conv trunks: geometry of both styles, and the shapes they promise; MLP sizes; the aligned
Linear."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from aefrl.nn import ALIGN_ROWS, MLP, ConvDecoder, ConvEncoder, Linear, check_size


@pytest.mark.parametrize(("style", "out_shape"), [("v3", (64, 4, 4)), ("v1", (64, 2, 2))])
@pytest.mark.parametrize("norm", [True, False])
def test_trunk_geometry(style, out_shape, norm):
    enc = ConvEncoder((3, 64, 64), depth=8, style=style, norm=norm)
    dec = ConvDecoder(10, (3, 64, 64), 6, depth=8, style=style, norm=norm)
    assert enc.out_shape == out_shape and enc(torch.rand(2, 3, 64, 64)).shape == (2, enc.out_dim)
    assert dec(torch.randn(2, 10)).shape == (2, 6, 64, 64)
    has_norm = any(type(m).__name__ == "ChannelNorm" for m in enc.modules())
    assert has_norm == norm


def test_bad_trunk_arguments():
    with pytest.raises(ValueError, match="conv_style must be one of v3, v1, got 'v2'"):
        ConvEncoder((3, 64, 64), style="v2")
    with pytest.raises(ValueError, match="64x64 images only"):
        ConvDecoder(4, (3, 32, 32), 3, style="v1")
    with pytest.raises(ValueError, match="power of two"):
        ConvEncoder((3, 48, 48))
    with pytest.raises(ValueError, match="conv depth must be an integer >= 1, got 0"):
        ConvDecoder(4, (3, 64, 64), 3, depth=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 0}, "MLP hidden width must be an integer >= 1, got 0"),
        ({"hidden": 2.5}, "MLP hidden width must be an integer >= 1, got 2.5"),
        ({"layers": -1}, "MLP layers must be an integer >= 0, got -1"),
        ({"layers": True}, "MLP layers must be an integer >= 0, got True"),
    ],
)
def test_bad_mlp_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(4, 2, **kwargs)


@pytest.mark.parametrize("value", [4.5, 4.0, True, "4", None])
def test_sizes_are_whole_numbers_not_truncated(value):
    """A size of 4.5 used to reach int() somewhere and build 4 units while the run's
    configuration recorded 4.5: floats and bools are refused, naming the setting."""
    with pytest.raises(ValueError, match=f"latent_dim must be an integer >= 1, got {value!r}"):
        check_size("latent_dim", value)


def test_sizes_accept_integers_of_any_kind():
    import numpy as np

    assert check_size("x", 3) == 3 and check_size("x", 0, 0) == 0
    size = check_size("x", np.int64(5))
    assert size == 5 and type(size) is int


def test_mlp_without_hidden_layers_ignores_the_width():
    assert isinstance(MLP(4, 2, hidden=0, layers=0)[0], torch.nn.Linear)


@pytest.mark.parametrize(("in_dim", "out_dim"), [(230, 255), (230, 400), (400, 255), (256, 64)])
@pytest.mark.parametrize("rows", [3, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_aligned_linear_is_nn_linear(in_dim, out_dim, rows, bias):
    """Padded or not (odd feature counts, at least ALIGN_ROWS rows), the values and every
    gradient are nn.Linear's, in float64, and the parameters are the same tensors."""
    torch.manual_seed(0)
    ours = Linear(in_dim, out_dim, bias=bias).double()
    ref = torch.nn.Linear(in_dim, out_dim, bias=bias).double()
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, rows, in_dim, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(2, rows, out_dim, dtype=torch.float64)
    y, y_ref = ours(x), ref(x_ref)
    assert y.shape == y_ref.shape == (2, rows, out_dim)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for p, p_ref in zip(ours.parameters(), ref.parameters()):
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-12)


class _LinearWeights(TorchFunctionMode):
    """Records the weight shape of every ``F.linear`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def test_aligned_linear_pads_only_what_pays():
    """The padded product runs only for odd feature counts on at least ALIGN_ROWS rows, and the
    input is padded only when its gradient is needed (the weight pad alone fixes the output)."""
    lin = Linear(230, 255)
    with _LinearWeights() as mode:
        lin(torch.randn(ALIGN_ROWS - 1, 230))
        lin(torch.randn(ALIGN_ROWS, 230))
        lin(torch.randn(ALIGN_ROWS, 230, requires_grad=True))
        with torch.no_grad():
            lin(torch.randn(ALIGN_ROWS, 230, requires_grad=True))
        Linear(256, 64)(torch.randn(ALIGN_ROWS, 256, requires_grad=True))
        Linear(230, 255, device="meta")(torch.randn(ALIGN_ROWS, 230, device="meta"))  # not CPU
    assert mode.shapes == [(255, 230), (256, 230), (256, 232), (256, 230), (64, 256), (255, 230)]
