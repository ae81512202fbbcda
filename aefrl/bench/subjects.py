"""What ``scripts/bench.py`` times: sizes, one shared replay batch, and our agent as a subject.

Every subject (ours here, torchrl's in :mod:`aefrl.bench.torchrl_peer`) has the same methods, so
the script never special-cases either:

* ``prepare(batch)``: the subject's own view of the shared batch (key renames and views only;
  the uint8 -> float conversion of the pixels happens inside the timed updates, for both);
* ``wm_update(prepared)``: world-model forward + backward + clip + optimiser step;
* ``full_update(prepared)``: world model, then actor, then critic (each with its optimiser);
* ``imagination_start(prepared)`` / ``imagine(start)``: a horizon-H prior rollout with the actor
  from the B·T posterior states of a batch and the predicted rewards of the imagined states
  (autograd on, as inside the actor update);
* ``conv_inputs(batch)`` / ``conv_pass(inputs)``: encoder + decoder forward + backward alone on
  the batch's B·T frames (the convolution bound); ``parameter_count()``.

The shared batch uses our replay's arrival layout (``pixels`` uint8 ``[B, T, 3, H, W]``,
``prev_action``, ``reward``, ``is_first``, ``terminated``); random data, since speed does not
depend on the pixels.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass

import torch
from tensordict import TensorDict
from torch import nn

from aefrl import keys
from aefrl.actor_critic import imagine
from aefrl.cuda_graph import CudaGraphed
from aefrl.nn import frozen
from aefrl.world_model import RSSMState


@dataclass(frozen=True)
class Sizes:
    """Network and batch sizes, named once for both implementations.

    ``latent`` is z (torchrl's ``state_dim``), ``deter`` the GRU belief h (torchrl's
    ``rssm_hidden_dim``, which torchrl's ``make_dreamer`` also uses as the width of its RSSM
    MLPs; ours get it as ``world_model.rssm_hidden``), ``hidden`` the width of every other MLP,
    ``depth`` the channels of the first conv layer. ``reward_layers`` / ``ac_layers`` are the
    hidden layers of the reward head and of the actor and critic.
    """

    latent: int = 30
    deter: int = 200
    hidden: int = 400
    depth: int = 32
    reward_layers: int = 2
    ac_layers: int = 3
    batch: int = 16
    seq: int = 50
    image: int = 64
    action_dim: int = 6
    horizon: int = 15

    @property
    def rssm_hidden(self) -> int:
        """Width of the RSSM's MLPs: the belief's size, as torchrl's ``make_dreamer`` builds them
        (ours: ``world_model.rssm_hidden``)."""
        return self.deter

    def record(self) -> dict:
        """The sizes as a results file stores them, the RSSM's MLP width included."""
        return {**asdict(self), "rssm_hidden": self.rssm_hidden}

    def with_batch(self, batch: int, seq: int) -> Sizes:
        return Sizes(**{**asdict(self), "batch": batch, "seq": seq})

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}"


def random_batch(sizes: Sizes, seed: int = 0, device="cpu") -> TensorDict:
    """A ``[B, T]`` replay batch in the arrival layout with uniform random uint8 pixels; one
    episode start per sequence (row 0), no terminals."""
    g = torch.Generator().manual_seed(seed)
    b, t, s = sizes.batch, sizes.seq, sizes.image
    is_first = torch.zeros(b, t, 1, dtype=torch.bool)
    is_first[:, 0] = True
    batch = TensorDict(
        {
            keys.PIXELS: torch.randint(0, 256, (b, t, 3, s, s), dtype=torch.uint8, generator=g),
            keys.PREV_ACTION: torch.rand(b, t, sizes.action_dim, generator=g) * 2 - 1,
            keys.REWARD: torch.rand(b, t, 1, generator=g),
            keys.IS_FIRST: is_first,
            keys.TERMINATED: torch.zeros(b, t, 1, dtype=torch.bool),
        },
        [b, t],
    )
    return batch.to(device)


# Subjects that are our agent with other world-model options. ``aef_v1``: torchrl's conv trunk
# geometry (valid-padding encoder, k5/k5/k6/k6 decoder) without our channel norms, so that the
# comparison with torchrl runs the same convolutions and measures everything around them.
VARIANTS: dict[str, tuple[str, dict]] = {
    "aef_v1": ("aef", {"conv_style": "v1", "conv_norm": False}),
}


# Suffix of subjects whose updates replay a captured CUDA graph (aefrl/cuda_graph.py).
GRAPH = "+graph"


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s memory format (channels-last or contiguous)."""
    cl = ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def base_kind(subject: str) -> str:
    """The observation model a subject uses (``aef_v1`` -> ``aef``, ``vae+graph`` -> ``vae``)."""
    subject = subject.removesuffix(GRAPH)
    return VARIANTS[subject][0] if subject in VARIANTS else subject


def ours_agent_kwargs(sizes: Sizes, kind: str, agent: dict, obs_model: dict) -> tuple[dict, dict]:
    """Our ``agent`` / ``obs_model`` config dicts (configs/agent/dreamer.yaml,
    configs/obs_model/<kind>.yaml) with the sizes of ``sizes`` written in; ``kind`` may be a
    :data:`VARIANTS` name."""
    kind = kind.removesuffix(GRAPH)
    agent = {k: (dict(v) if isinstance(v, dict) else v) for k, v in agent.items()}
    agent["world_model"].update(
        deter=sizes.deter,
        rssm_hidden=sizes.rssm_hidden,  # as torchrl's RSSMPrior / RSSMPosterior (hidden_dim)
        hidden=sizes.hidden,
        layers=sizes.reward_layers,
        depth=sizes.depth,
    )
    if kind in VARIANTS:
        kind, options = VARIANTS[kind]
        agent["world_model"].update(options)
    agent["actor"].update(hidden=sizes.hidden, layers=sizes.ac_layers)
    agent["critic"].update(hidden=sizes.hidden, layers=sizes.ac_layers)
    agent["actor_loss"] = {**agent.get("actor_loss", {}), "horizon": sizes.horizon}
    obs_model = {**obs_model, "kind": kind, "latent_dim": sizes.latent}
    return agent, obs_model


def parameter_count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class OursSubject:
    """Our :class:`~agents.dreamer.DreamerAgent` behind the subject interface.

    ``wm_update`` mirrors the first half of ``DreamerAgent.train_step`` (loss, zero_grad,
    backward, clip, step) with the agent's own loss, optimiser and clip value; ``full_update``
    *is* ``train_step``. If ``train_step`` changes how it runs the world-model step, change
    ``wm_update`` with it.
    """

    def __init__(self, name: str, agent) -> None:
        self.name = name
        self.agent = agent
        self.graphed = name.endswith(GRAPH)

    def prepare(self, batch: TensorDict) -> TensorDict:
        return batch

    def capture(self, batch: TensorDict, context=contextlib.nullcontext) -> None:
        """Replace ``wm_update`` and ``full_update`` by replays of CUDA graphs captured on
        ``batch`` (inside ``context()``, e.g. an autocast); later batches need its shapes."""
        agent = self.agent

        def wm_update(b: TensorDict) -> dict:
            OursSubject.wm_update(self, b)
            return {}

        with context():
            wm = CudaGraphed(wm_update, batch, [agent], [agent.optimizers["model"]])
            full = CudaGraphed(agent.train_step, batch, [agent], agent.optimizers.values())
        self.wm_update, self.full_update = wm, full

    def wm_update(self, batch: TensorDict) -> None:
        agent = self.agent
        with agent.precision():
            out = agent.wm_loss(batch)
        opt = agent.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        agent.wm_loss.total(out).backward()
        nn.utils.clip_grad_norm_(agent.world_model.parameters(), agent.grad_clip["model"])
        opt.step()

    def full_update(self, batch: TensorDict) -> None:
        self.agent.train_step(batch)

    @torch.no_grad()
    def imagination_start(self, batch: TensorDict) -> RSSMState:
        return self.agent.world_model.filter(batch).observed.state.flatten()  # no_grad: detached

    def imagine(self, start: RSSMState) -> torch.Tensor:
        """The rollout and its rewards ``[N, H]`` (returned so that nothing is computed for
        nothing)."""
        agent = self.agent
        wm = agent.world_model
        with frozen(wm), agent.precision():
            states, _, _ = imagine(wm.rssm, agent.actor, start, agent.actor_loss.horizon)
            # torchrl's DreamerEnv predicts a reward inside every step of its rollout; ours
            # predicts them in the actor loss, for all steps at once. Timed here too, so both
            # sides produce the same thing: imagined states and their rewards.
            return wm.reward_head(states.feat[:, 1:].contiguous()).mean

    def parameter_count(self) -> dict[str, int]:
        a = self.agent
        return {
            "world_model": parameter_count(a.world_model),
            "actor": parameter_count(a.actor),
            "critic": parameter_count(a.critic),
        }

    # --- the convolution bound ------------------------------------------------------------------
    @torch.no_grad()
    def conv_inputs(
        self,
        batch: TensorDict,
        layers_only: bool = False,
        channels_last: bool = False,
        seed: int = 0,
    ) -> dict:
        """What the conv trunks see in a world-model update on ``batch``, for :meth:`conv_pass`:
        the B·T pre-processed frames, decoder inputs ``[h, z]`` (requiring grad, as in the update),
        random output gradients, and the modules to run.

        ``layers_only``: the convolution layers alone (no channel norms, activations or decoder
        Linear), as copies in NCHW or, with ``channels_last``, in the channels-last memory format
        (what the agent's own trunks use); the agent's modules are left as they are.
        """
        if channels_last and not layers_only:
            raise ValueError("channels_last is only measured with layers_only=True")
        wm = self.agent.world_model
        om = wm.obs_model
        g = torch.Generator(device=batch.device).manual_seed(seed)
        y, _ = wm.encode_pixels(batch[keys.PIXELS].flatten(0, 1))
        y = om.encoder_input(y)
        n, dev, dt = y.shape[0], y.device, y.dtype

        def randn(*shape):
            return torch.randn(n, *shape, generator=g, device=dev, dtype=dt)

        if layers_only:
            convs = (nn.Conv2d, nn.ConvTranspose2d)
            enc = nn.Sequential(*[m for m in om.encoder.net if isinstance(m, convs)])
            dec = nn.Sequential(*[m for m in om.decoder.net if isinstance(m, convs)])
            dec_in = randn(*om.decoder.start_shape)
        else:
            enc, dec = om.encoder, om.decoder
            dec_in = randn(wm.feat_dim)
        e, x = enc(y[:1]), dec(dec_in[:1])
        # Output gradients in the outputs' own layout, as autograd hands them over in the
        # update (an NCHW gradient for a channels-last decoder output cost the bound a copy).
        grad_e, grad_x = _like(randn(*e.shape[1:]), e), _like(randn(*x.shape[1:]), x)
        if layers_only:
            # The trunks keep their weights channels-last (aefrl/nn.py); copies in the format
            # asked for, so "NCHW" and "channels-last" measure what they say.
            cl = torch.channels_last if channels_last else torch.contiguous_format
            enc, dec = (
                copy.deepcopy(enc).to(memory_format=cl),
                copy.deepcopy(dec).to(memory_format=cl),
            )
            y, dec_in, grad_e, grad_x = (
                t.contiguous(memory_format=cl) for t in (y, dec_in, grad_e, grad_x)
            )
        return {
            "modules": (enc, dec),
            "enc_in": y,
            "dec_in": dec_in.requires_grad_(True),
            "grad_e": grad_e,
            "grad_x": grad_x,
        }

    def conv_pass(self, inputs: dict) -> None:
        """Encoder + decoder forward and backward (parameter gradients and the decoder input's
        gradient, as in the update) on the B·T frames; no RSSM, heads, loss or optimiser."""
        enc, dec = inputs["modules"]
        enc.zero_grad(set_to_none=True)
        dec.zero_grad(set_to_none=True)
        with self.agent.precision():  # the trunks in bf16 under agent.autocast, as in the update
            e = enc(inputs["enc_in"])
            x = dec(inputs["dec_in"])
        torch.autograd.backward([e, x], [inputs["grad_e"], inputs["grad_x"]])
        inputs["dec_in"].grad = None

    def conv_modules(self) -> tuple[nn.Module, nn.Module, int]:
        """(encoder, decoder, decoder input size) for FLOP counting."""
        wm = self.agent.world_model
        return wm.obs_model.encoder, wm.obs_model.decoder, wm.feat_dim
