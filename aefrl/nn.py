"""Network trunks shared by every model: MLPs, and conv encoder / decoder for images.

House style (DreamerV3): LayerNorm + SiLU everywhere, convolutions with kernel 4 and stride 2, the
image halved until its shorter side is 4. Networks take and return plain tensors; TensorDict keys
are attached where modules are composed.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
        if out_dim is None and layers == 0:
            raise ValueError("an MLP needs an output layer or at least one hidden layer")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            mods.append(nn.Linear(dim, hidden, bias=not norm))
            if norm:
                mods.append(nn.LayerNorm(hidden, eps=1e-3))
            mods.append(nn.SiLU())
            dim = hidden
        if out_dim is not None:
            mods.append(nn.Linear(dim, out_dim))
        super().__init__(*mods)
        self.in_dim = in_dim
        self.out_dim = out_dim if out_dim is not None else dim


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


class ConvEncoder(nn.Module):
    """Image ``[N, C, H, W] -> [N, E]`` with ``stages`` conv(k4, s2) + ChannelNorm + SiLU blocks.

    Channels grow ``depth, 2*depth, 4*depth, ...``;
    ``E = depth * 2**(stages-1) * (H*W) / 4**stages``.
    """

    def __init__(self, obs_shape: tuple[int, int, int], depth: int = 32) -> None:
        super().__init__()
        channels, height, width = obs_shape
        stages = max(conv_stages(height, width), 1)
        mods: list[nn.Module] = []
        c_in = channels
        for i in range(stages):
            c_out = depth * 2**i
            mods += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                ChannelNorm(c_out, eps=1e-3),
                nn.SiLU(),
            ]
            c_in = c_out
        self.net = nn.Sequential(*mods)
        self.out_shape = (c_in, height // 2**stages, width // 2**stages)
        self.out_dim = math.prod(self.out_shape)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y).flatten(1)


class ConvDecoder(nn.Module):
    """Features ``[N, F] -> [N, out_channels, H, W]``: a Linear to the encoder's last feature map,
    then transposed conv(k4, s2) blocks mirroring :class:`ConvEncoder`; the last block has no norm.
    """

    def __init__(
        self, in_dim: int, obs_shape: tuple[int, int, int], out_channels: int, depth: int = 32
    ) -> None:
        super().__init__()
        _, height, width = obs_shape
        stages = max(conv_stages(height, width), 1)
        c0 = depth * 2 ** (stages - 1)
        self.start_shape = (c0, height // 2**stages, width // 2**stages)
        self.linear = nn.Linear(in_dim, math.prod(self.start_shape))
        mods: list[nn.Module] = []
        c_in = c0
        for i in reversed(range(stages)):
            last = i == 0
            c_out = out_channels if last else depth * 2 ** (i - 1)
            mods.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=last))
            if not last:
                mods += [ChannelNorm(c_out, eps=1e-3), nn.SiLU()]
            c_in = c_out
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).unflatten(-1, self.start_shape)
        return self.net(x)


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
