"""torchrl's own DreamerV1, assembled from torchrl's blocks the way its sota-implementation does.

pytorch/rl ``sota-implementations/dreamer/dreamer_utils.py`` (``make_dreamer``,
``_dreamer_make_world_model``, ``_dreamer_make_mbenv``, ``_dreamer_make_actors``,
``_dreamer_make_value_model``) and ``dreamer.py`` (losses, optimisers, the update) are followed
step by step; only what the update touches is built (no collector, no real env, no exploration
wrapper). The blocks, all from the installed torchrl:

* world model: ``ObsEncoder`` (4 valid-padding k4 s2 convs + ReLU, 64->31->14->6->2, 1024-d
  embedding) -> ``RSSMRollout(RSSMPrior, RSSMPosterior)`` (GRUCell, ELU MLPs of width ``deter``)
  -> ``ObsDecoder`` (Linear -> 1x1 -> transposed convs k5, k5, k6, k6) and an ELU reward MLP, in
  a ``WorldModelWrapper``; loss ``DreamerModelLoss`` (KL with free nats 3, summed MSE
  reconstruction, MSE reward);
* imagination: ``DreamerEnv`` (a ``ModelBasedEnvBase``) over ``RSSMPrior`` and the reward MLP,
  rolled out by ``EnvBase.rollout`` with the ``DreamerActor`` policy (TanhNormal);
* ``DreamerActorLoss`` (TD(λ) targets, γ 0.99, λ 0.95, horizon 15) and ``DreamerValueLoss``
  (MSE to the targets) with a ``DreamerActor`` and an ELU value MLP;
* Adam (lr 6e-4 / 8e-5 / 8e-5), gradient clipping at 100, three separate steps.

Pixels: torchrl's Dreamer stores float pixels in [0, 1] (``ToTensorImage`` at extend time); here
the uint8 batch is converted with ``float().div(255)`` *inside* the timed update, as our model
de-quantises its uint8 pixels inside its own update.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.model_based.dreamer import DreamerEnv
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type
from torchrl.modules import (
    MLP,
    DreamerActor,
    IndependentNormal,
    ObsDecoder,
    ObsEncoder,
    RSSMPosterior,
    RSSMPrior,
    RSSMRollout,
    SafeModule,
    SafeProbabilisticModule,
    SafeProbabilisticTensorDictSequential,
    SafeSequential,
    TanhNormal,
    WorldModelWrapper,
)
from torchrl.objectives import DreamerActorLoss, DreamerModelLoss, DreamerValueLoss
from torchrl.objectives.utils import hold_out_net

from aefrl import keys
from aefrl.bench.subjects import Sizes, parameter_count

GRAD_CLIP = 100.0
LR = {"world_model": 6e-4, "actor": 8e-5, "value": 8e-5}
GAMMA, LMBDA = 0.99, 0.95


def encoder_embed_dim(image: int, channels: int, num_layers: int = 4) -> int:
    """Flattened ObsEncoder output (valid-padding k4 s2 convs), as dreamer_utils computes it."""
    size = image
    for _ in range(num_layers):
        size = (size - 4) // 2 + 1
    return channels * 2 ** (num_layers - 1) * size * size


class _SpecEnv(EnvBase):
    """Specs only: what ``DreamerEnv.set_specs_from_env`` copies from the real env (actions in
    [-1, 1], the ``state`` / ``belief`` primers, a reward). Never stepped."""

    def __init__(self, sizes: Sizes, device) -> None:
        super().__init__(device=device)
        self.action_spec = Bounded(-1.0, 1.0, (sizes.action_dim,), device=device)
        self.observation_spec = Composite(
            state=Unbounded((sizes.latent,), device=device),
            belief=Unbounded((sizes.deter,), device=device),
            device=device,
        )
        self.reward_spec = Unbounded((1,), device=device)

    def _step(self, tensordict):
        raise NotImplementedError

    def _reset(self, tensordict=None, **kwargs):
        raise NotImplementedError

    def _set_seed(self, seed):
        return seed


def _elu_mlp(sizes: Sizes, depth: int, device) -> MLP:
    """An ELU MLP on ``[state, belief]`` with one output (reward, value)."""
    return MLP(
        in_features=sizes.latent + sizes.deter,
        out_features=1,
        depth=depth,
        num_cells=sizes.hidden,
        activation_class=nn.ELU,
        device=device,
    )


def actor_head(actor_module: DreamerActor, action_spec, interaction: InteractionType):
    """``(state, belief) -> action``: the ``DreamerActor``'s TanhNormal, as dreamer_utils
    builds it for imagination (``InteractionType.RANDOM``) and for acting (``DETERMINISTIC``,
    before the exploration noise)."""
    shape, device = action_spec.shape, action_spec.device
    return SafeProbabilisticTensorDictSequential(
        SafeModule(
            actor_module,
            in_keys=["state", "belief"],
            out_keys=["loc", "scale"],
            spec=Composite(
                loc=Unbounded(shape, device=device), scale=Unbounded(shape, device=device)
            ),
        ),
        SafeProbabilisticModule(
            in_keys=["loc", "scale"],
            out_keys=["action"],
            default_interaction_type=interaction,
            distribution_class=TanhNormal,
            distribution_kwargs={"tanh_loc": True},
            spec=Composite(action=action_spec),
        ),
    )


class TorchrlDreamer:
    """torchrl's DreamerV1 update at ``sizes`` (see the module docstring)."""

    name = "torchrl"

    def __init__(self, sizes: Sizes, device="cpu") -> None:
        device = torch.device(device)
        self.sizes, self.device = sizes, device
        s = sizes
        embed = encoder_embed_dim(s.image, s.depth)
        self.encoder = ObsEncoder(channels=s.depth, in_channels=3, device=device)
        self.decoder = ObsDecoder(
            channels=s.depth, latent_dim=s.latent + s.deter, out_channels=3, device=device
        )
        self.rssm_prior = RSSMPrior(
            action_spec=Bounded(-1.0, 1.0, (s.action_dim,)),
            hidden_dim=s.deter,
            rnn_hidden_dim=s.deter,
            state_dim=s.latent,
            action_dim=s.action_dim,
            device=device,
        )
        self.rssm_posterior = RSSMPosterior(
            hidden_dim=s.deter,
            state_dim=s.latent,
            rnn_hidden_dim=s.deter,
            obs_embed_dim=embed,
            device=device,
        )
        self.reward_module = _elu_mlp(s, s.reward_layers, device)
        self.world_model = self._world_model()
        self.model_based_env = self._model_based_env()
        check_env_specs(self.model_based_env)
        actor_module = DreamerActor(
            out_features=s.action_dim,
            depth=s.ac_layers,
            num_cells=s.hidden,
            activation_class=nn.ELU,
            device=device,
        )
        self.actor_module = actor_module  # also the acting policy's (torchrl_end_to_end)
        self.actor = self._actor_sim(actor_module)
        self.value_model = ProbabilisticTensorDictSequential(
            TensorDictModule(
                _elu_mlp(s, s.ac_layers, device),
                in_keys=["state", "belief"],
                out_keys=["loc"],
            ),
            ProbabilisticTensorDictModule(
                in_keys=["loc"],
                out_keys=["state_value"],
                distribution_class=IndependentNormal,
                distribution_kwargs={"scale": 1.0, "event_dim": 1},
            ),
        )
        # DreamerActor has lazy layers: initialise them the way make_dreamer does.
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            fake = self.model_based_env.fake_tensordict().unsqueeze(-1)
            self.value_model(self.actor(fake))
        self.wm_loss = DreamerModelLoss(self.world_model)
        self.actor_loss = DreamerActorLoss(
            self.actor,
            self.value_model,
            self.model_based_env,
            imagination_horizon=s.horizon,
            discount_loss=True,
        )
        self.actor_loss.make_value_estimator(gamma=GAMMA, lmbda=LMBDA)
        self.value_loss = DreamerValueLoss(self.value_model, discount_loss=True, gamma=GAMMA)
        self.groups = {
            "world_model": self.world_model,
            "actor": self.actor,
            "value": self.value_model,
        }
        fused = device.type == "cuda"
        self.optimizers = {
            name: torch.optim.Adam(m.parameters(), lr=LR[name], fused=fused)
            for name, m in self.groups.items()
        }

    # --- assembly (dreamer_utils) ---------------------------------------------------------------
    def _world_model(self) -> WorldModelWrapper:
        rollout = RSSMRollout(
            TensorDictModule(
                self.rssm_prior,
                in_keys={
                    "state": "state",
                    "belief": "belief",
                    "action": "action",
                    "noise": "prior_noise",
                },
                out_keys=[("next", "prior_mean"), ("next", "prior_std"), "_", ("next", "belief")],
                out_to_in_map=True,
            ),
            TensorDictModule(
                self.rssm_posterior,
                in_keys={
                    "belief": ("next", "belief"),
                    "obs_embedding": ("next", "encoded_latents"),
                    "noise": "posterior_noise",
                },
                out_keys=[("next", "posterior_mean"), ("next", "posterior_std"), ("next", "state")],
                out_to_in_map=True,
            ),
        )
        decoder = ProbabilisticTensorDictSequential(
            TensorDictModule(
                self.decoder, in_keys=[("next", "state"), ("next", "belief")], out_keys=["loc"]
            ),
            ProbabilisticTensorDictModule(
                in_keys=["loc"],
                out_keys=[("next", "reco_pixels")],
                distribution_class=IndependentNormal,
                distribution_kwargs={"scale": 1.0, "event_dim": 3},
            ),
        )
        transition = TensorDictSequential(
            TensorDictModule(
                self.encoder, in_keys=[("next", "pixels")], out_keys=[("next", "encoded_latents")]
            ),
            rollout,
            decoder,
        )
        reward = ProbabilisticTensorDictSequential(
            TensorDictModule(
                self.reward_module,
                in_keys=[("next", "state"), ("next", "belief")],
                out_keys=[("next", "loc")],
            ),
            ProbabilisticTensorDictModule(
                in_keys=[("next", "loc")],
                out_keys=[("next", "reward")],
                distribution_class=IndependentNormal,
                distribution_kwargs={"scale": 1.0, "event_dim": 1},
            ),
        )
        return WorldModelWrapper(transition, reward)

    def _model_based_env(self) -> DreamerEnv:
        transition = SafeSequential(
            SafeModule(
                self.rssm_prior,
                in_keys=["state", "belief", "action"],
                out_keys=["_", "_", "state", "belief"],
            )
        )
        reward = SafeProbabilisticTensorDictSequential(
            SafeModule(self.reward_module, in_keys=["state", "belief"], out_keys=["loc"]),
            SafeProbabilisticModule(
                in_keys=["loc"],
                out_keys=["reward"],
                distribution_class=IndependentNormal,
                distribution_kwargs={"scale": 1.0, "event_dim": 1},
            ),
        )
        env = DreamerEnv(
            world_model=WorldModelWrapper(transition, reward),
            prior_shape=torch.Size([self.sizes.latent]),
            belief_shape=torch.Size([self.sizes.deter]),
        )
        env.set_specs_from_env(_SpecEnv(self.sizes, self.device))
        return env.to(self.device)

    def _actor_sim(self, actor_module: DreamerActor):
        spec = self.model_based_env.action_spec_unbatched
        return actor_head(actor_module, spec, InteractionType.RANDOM)

    # --- the subject interface --------------------------------------------------------------------
    def prepare(self, batch: TensorDict) -> TensorDict:
        """The shared batch in torchrl's transition layout: ``action``, ``("next", "pixels")``
        (still uint8 here), ``("next", "reward")``, zero ``state`` / ``belief`` primers."""
        b, t = batch.shape
        s, dev = self.sizes, batch.device
        return TensorDict(
            {
                "state": torch.zeros(b, t, s.latent, device=dev),
                "belief": torch.zeros(b, t, s.deter, device=dev),
                "action": batch[keys.PREV_ACTION],
                ("next", "pixels"): batch[keys.PIXELS],
                ("next", "reward"): batch[keys.REWARD],
                ("next", "done"): batch[keys.TERMINATED],
                ("next", "terminated"): batch[keys.TERMINATED],
            },
            [b, t],
            device=dev,
        )

    def _step(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.groups[name].parameters(), GRAD_CLIP)
        opt.step()

    def _wm(self, td: TensorDict, uint8_pixels: bool = True) -> TensorDict:
        if uint8_pixels:
            td = td.copy()
            td.set(("next", "pixels"), td.get(("next", "pixels")).float().div(255))
        loss_td, sampled = self.wm_loss(td)
        loss = loss_td["loss_model_kl"] + loss_td["loss_model_reco"] + loss_td["loss_model_reward"]
        self._step("world_model", loss.squeeze())
        return sampled

    def wm_update(self, td: TensorDict) -> None:
        self._wm(td)

    def full_update(self, td: TensorDict, uint8_pixels: bool = True) -> None:
        sampled = self._wm(td, uint8_pixels)
        actor_td, fake = self.actor_loss(sampled.reshape(-1))
        self._step("actor", actor_td["loss_actor"])
        value_td, _ = self.value_loss(fake)
        self._step("value", value_td["loss_value"])

    def full_update_sampled(self, td: TensorDict) -> None:
        """:meth:`full_update` on a ``[B, T]`` sample of torchrl's replay buffer, whose pixels
        are floats in [0, 1] already (its ``ToTensorImage`` at sample time)."""
        self.full_update(td, uint8_pixels=False)

    @torch.no_grad()
    def imagination_start(self, td: TensorDict) -> TensorDict:
        td = td.copy()
        td.set(("next", "pixels"), td.get(("next", "pixels")).float().div(255))
        _, sampled = self.wm_loss(td)
        return sampled.reshape(-1).select("state", "belief")

    def imagine(self, start: TensorDict) -> None:
        # As in DreamerActorLoss.forward.
        env = self.model_based_env
        with hold_out_net(env), set_exploration_type(ExplorationType.RANDOM):
            td = env.reset(start.copy())
            env.rollout(
                max_steps=self.sizes.horizon, policy=self.actor, auto_reset=False, tensordict=td
            )

    def parameter_count(self) -> dict[str, int]:
        return {
            "world_model": parameter_count(self.world_model),
            "actor": parameter_count(self.actor),
            "critic": parameter_count(self.value_model),
        }

    @torch.no_grad()
    def conv_inputs(self, batch: TensorDict, seed: int = 0) -> dict:
        """The B·T frames as floats, random decoder inputs ``(state, belief)`` requiring grad,
        random output gradients."""
        g = torch.Generator(device=batch.device).manual_seed(seed)
        pixels = batch[keys.PIXELS].flatten(0, 1).float().div(255)
        n, s, dev = pixels.shape[0], self.sizes, pixels.device

        def randn(*shape):
            return torch.randn(n, *shape, generator=g, device=dev)

        return {
            "pixels": pixels,
            "state": randn(s.latent).requires_grad_(True),
            "belief": randn(s.deter).requires_grad_(True),
            "grad_e": randn(encoder_embed_dim(s.image, s.depth)),
            "grad_x": randn(3, s.image, s.image),
        }

    def conv_pass(self, inputs: dict) -> None:
        """ObsEncoder + ObsDecoder forward and backward alone on the B·T frames."""
        self.encoder.zero_grad(set_to_none=True)
        self.decoder.zero_grad(set_to_none=True)
        e = self.encoder(inputs["pixels"])
        x = self.decoder(inputs["state"], inputs["belief"])
        torch.autograd.backward([e, x], [inputs["grad_e"], inputs["grad_x"]])
        inputs["state"].grad = inputs["belief"].grad = None

    def conv_modules(self) -> tuple[nn.Module, nn.Module, int]:
        """(encoder, decoder, decoder input size) for FLOP counting; the decoder takes
        ``(state, belief)``."""
        return self.encoder, self.decoder, self.sizes.latent + self.sizes.deter
