"""Benchmark harness of ``scripts/bench.py``: our agent and torchrl's Dreamer at the same sizes.

* :mod:`aefrl.bench.timing`: interleaved timers, peak memory, torch.profiler summaries.
* :mod:`aefrl.bench.subjects`: the things timed: :class:`~aefrl.bench.subjects.Sizes`, the
  shared random replay batch, and our agent behind one small interface.
* :mod:`aefrl.bench.torchrl_peer`: torchrl's DreamerV1 (``RSSMPrior``, ``RSSMPosterior``,
  ``RSSMRollout``, ``ObsEncoder``, ``ObsDecoder``, ``DreamerEnv``, ``DreamerModelLoss``,
  ``DreamerActorLoss``, ``DreamerValueLoss``) assembled as its sota-implementation does, behind
  the same interface.
"""
