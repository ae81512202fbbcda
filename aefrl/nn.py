"""Network trunks shared by every model: MLPs, and conv encoder / decoder for images.

House style (DreamerV3): LayerNorm + SiLU everywhere, convolutions with kernel 4 and stride 2, the
image halved until its shorter side is 4. Networks take and return plain tensors; TensorDict keys
are attached where modules are composed.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from aefrl.precision import run_trunk


def check_size(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError naming ``name`` when it is not an integer >= ``minimum``
    (configuration values reach the networks from the command line). Floats (``4.5``, also
    ``4.0``) and bools are refused rather than truncated: the model would not be the one the
    run's configuration records."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


#: Feature counts of products that :class:`Linear` pads up to a multiple of this.
ALIGN = 8
#: Rows from which :class:`Linear` pads (below, two small copies cost more than they save).
ALIGN_ROWS = 256


class Linear(nn.Linear):
    """``nn.Linear`` that runs feature counts that are not a multiple of :data:`ALIGN` zero-padded.

    On the CPU (and only there: other devices run it as ``nn.Linear``) a product whose result
    has a column count that is not a multiple of 8 runs at
    ~60 % of the rate of the next multiple (MKL: ``[12000, 400] @ [400, 255]`` 25 ms against
    15 ms for 256 columns; docs/benchmarks.md, finding 12). In the update that is the 255-bin
    two-hot output layers, and, in the actor's backward, the input gradient of every head that
    reads the 230-d features of the identical-sizes benchmark. For an input of at least
    :data:`ALIGN_ROWS` rows the weight (and the input, when its gradient is needed) is
    zero-padded and the result sliced back: the same values up to summation order, the same
    parameters and ``state_dict`` as ``nn.Linear``.

    Shapes: ``[..., in_features] -> [..., out_features]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_pad = -self.out_features % ALIGN
        grad_in = torch.is_grad_enabled() and x.requires_grad
        in_pad = -self.in_features % ALIGN if grad_in else 0
        small = x.numel() < ALIGN_ROWS * self.in_features
        # MKL's rates (measured on the CPU only); elsewhere the pads would be copies for nothing
        if not (out_pad or in_pad) or small or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        weight = F.pad(self.weight, (0, in_pad, 0, out_pad))
        bias = None if self.bias is None else F.pad(self.bias, (0, out_pad))
        y = F.linear(F.pad(x, (0, in_pad)) if in_pad else x, weight, bias)
        return y[..., : self.out_features] if out_pad else y


class MLP(nn.Sequential):
    """``Linear -> LayerNorm -> SiLU`` repeated ``layers`` times, then an output ``Linear``.

    Args:
        in_dim: input features.
        out_dim: output features; ``None`` drops the output layer (the trunk ends on SiLU).
        hidden: width of the hidden layers.
        layers: number of hidden layers (0 makes the whole MLP one ``Linear``).
        norm: use LayerNorm after each hidden ``Linear``.

    Shapes: ``[..., in_dim] -> [..., out_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None,
        hidden: int = 256,
        layers: int = 2,
        norm: bool = True,
    ) -> None:
        layers = check_size("MLP layers", layers, 0)
        if layers:
            hidden = check_size("MLP hidden width", hidden)
        if out_dim is None and layers == 0:
            raise ValueError("an MLP needs an output layer or at least one hidden layer")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            mods.append(Linear(dim, hidden, bias=not norm))
            if norm:
                mods.append(nn.LayerNorm(hidden, eps=1e-3))
            mods.append(nn.SiLU())
            dim = hidden
        if out_dim is not None:
            mods.append(Linear(dim, out_dim))
        super().__init__(*mods)
        self.in_dim = in_dim
        self.out_dim = out_dim if out_dim is not None else dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In bf16 under agent.autocast=bf16 (aefrl/precision.py), for enough rows.
        return run_trunk(super().forward, x, x.numel() // max(x.shape[-1], 1))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``[N, C, H, W]`` tensor (DreamerV3's image norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_stages(height: int, width: int) -> int:
    """Number of stride-2 stages that take an image down to a shorter side of 4 pixels.

    Raises ValueError when the image cannot be halved cleanly that many times.
    """
    short = min(height, width)
    if short < 4:
        raise ValueError(f"image sides must be at least 4 pixels, got {height}x{width}")
    stages = round(math.log2(short / 4))
    if 4 * 2**stages != short or height % 2**stages or width % 2**stages:
        raise ValueError(
            f"image size {height}x{width} is not supported: the shorter side must be 4 times a "
            "power of two (e.g. 8, 16, 32, 64) and both sides divisible by the same power of two"
        )
    return stages


CONV_STYLES = ("v3", "v1")


def _act_norm(channels: int, norm: bool) -> list[nn.Module]:
    return [ChannelNorm(channels, eps=1e-3), nn.SiLU()] if norm else [nn.SiLU()]


class ConvEncoder(nn.Module):
    """Image ``[N, C, H, W] -> [N, E]``.

    ``style="v3"`` (DreamerV3, the default): conv(k4, s2, padding 1) + ChannelNorm + SiLU blocks
    halving the image until its shorter side is 4; channels ``depth, 2·depth, ...``.
    ``style="v1"`` (DreamerV1 and torchrl's ``ObsEncoder``): four valid-padding conv(k4, s2)
    blocks, 64 -> 31 -> 14 -> 6 -> 2, about 30% fewer convolution FLOPs at the same depth.
    ``norm=False`` drops the ChannelNorms.

    Activations and conv weights are kept channels-last (NHWC in memory, the logical shape stays
    ``[N, C, H, W]``): oneDNN's convolutions are about 30% faster that way on the CPU, and the
    ChannelNorm's permute to ``[N, H, W, C]`` becomes a view instead of a copy.
    """

    def __init__(
        self, obs_shape: tuple[int, int, int], depth: int = 32, style: str = "v3", norm: bool = True
    ) -> None:
        super().__init__()
        if style not in CONV_STYLES:
            raise ValueError(f"conv_style must be one of {', '.join(CONV_STYLES)}, got {style!r}")
        depth = check_size("conv depth", depth)
        channels, height, width = obs_shape
        if style == "v3":
            stages, padding = max(conv_stages(height, width), 1), 1
        else:
            stages, padding = 4, 0
            if min(height, width) < 46:
                size = f"{height}x{width}"
                raise ValueError(f"conv_style 'v1' needs images of at least 46x46, got {size}")
        mods: list[nn.Module] = []
        c_in, h, w = channels, height, width
        for i in range(stages):
            c_out = depth * 2**i
            mods += [nn.Conv2d(c_in, c_out, 4, 2, padding, bias=not norm), *_act_norm(c_out, norm)]
            c_in = c_out
            h, w = (h + 2 * padding - 4) // 2 + 1, (w + 2 * padding - 4) // 2 + 1
        self.net = nn.Sequential(*mods).to(memory_format=torch.channels_last)
        self.out_shape = (c_in, h, w)
        self.out_dim = math.prod(self.out_shape)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return run_trunk(self._forward, y, y.shape[0])  # aefrl/precision.py

    def _forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y.contiguous(memory_format=torch.channels_last)).flatten(1)


class ConvDecoder(nn.Module):
    """Features ``[N, F] -> [N, out_channels, H, W]``.

    ``style="v3"``: a Linear to the encoder's last feature map, then transposed conv(k4, s2,
    padding 1) blocks mirroring :class:`ConvEncoder`; the last block has no norm.
    ``style="v1"`` (DreamerV1 / torchrl's ``ObsDecoder``, 64x64 only): a Linear to a
    ``32·depth x 1 x 1`` map, then transposed convs with kernels 5, 5, 6, 6 (1 -> 5 -> 13 -> 30
    -> 64). Channels-last like :class:`ConvEncoder`, the output included (a channels-last
    ``[N, C, H, W]`` tensor: the pre-processed pixels it is scored against are channels-last
    too, so converting it would cost a copy forward and another backward).
    """

    def __init__(
        self,
        in_dim: int,
        obs_shape: tuple[int, int, int],
        out_channels: int,
        depth: int = 32,
        style: str = "v3",
        norm: bool = True,
    ) -> None:
        super().__init__()
        if style not in CONV_STYLES:
            raise ValueError(f"conv_style must be one of {', '.join(CONV_STYLES)}, got {style!r}")
        depth = check_size("conv depth", depth)
        _, height, width = obs_shape
        if style == "v3":
            stages = max(conv_stages(height, width), 1)
            c0 = depth * 2 ** (stages - 1)
            self.start_shape = (c0, height // 2**stages, width // 2**stages)
            kernels, padding = [4] * stages, 1
            widths = [depth * 2 ** (i - 1) for i in reversed(range(1, stages))]
        else:
            if (height, width) != (64, 64):
                raise ValueError(f"conv_style 'v1' decodes 64x64 images only, got {height}x{width}")
            self.start_shape = (32 * depth, 1, 1)
            kernels, padding = [5, 5, 6, 6], 0
            widths = [4 * depth, 2 * depth, depth]
        self.linear = Linear(in_dim, math.prod(self.start_shape))
        mods: list[nn.Module] = []
        c_in = self.start_shape[0]
        for i, k in enumerate(kernels):
            last = i == len(kernels) - 1
            c_out = out_channels if last else widths[i]
            mods.append(nn.ConvTranspose2d(c_in, c_out, k, 2, padding, bias=last or not norm))
            if not last:
                mods += _act_norm(c_out, norm)
            c_in = c_out
        self.net = nn.Sequential(*mods).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_trunk(self._forward, x, x.numel() // x.shape[-1])  # aefrl/precision.py

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).unflatten(-1, self.start_shape)
        return self.net(x.contiguous(memory_format=torch.channels_last))


class frozen:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Context manager: turn off ``requires_grad`` of modules' parameters, then restore it.

    Gradients still flow *through* a frozen module to its inputs (dynamics backprop through the
    world model into the actor) without computing or accumulating its own parameter gradients.
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.flags: list[bool] = []

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
        return False
