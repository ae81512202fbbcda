"""Conv trunks: geometry of both styles, and the shapes they promise."""

import pytest
import torch

from aefrl.nn import MLP, ConvDecoder, ConvEncoder, check_size


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
