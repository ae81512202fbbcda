"""The independent random streams of a run, all derived from its one ``seed``.

Adding an offset to the seed (``seed + i``) makes the streams of nearby seeds overlap: worker 1
of the run with seed 0 and worker 0 of the run with seed 1 would see the same episodes, and two
generators seeded with the same number (the prefill actions and the replay's window draws) draw
the same numbers (torch's global generator, seeded with the run's seed, and a prefill generator
seeded with it too, would hand out one sequence twice). numpy's ``SeedSequence`` hashes ``(seed,
stream, *index)`` into unrelated seeds instead.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

#: The purposes a run draws random numbers for, each with its own tag in the hash.
STREAMS = {
    "env": 7,  # the training env (batched: the seed its workers' seeds derive from)
    "env_worker": 1,
    "eval_env": 2,
    "replay": 3,
    "eval": 4,
    "report": 5,
    "report_batch": 8,  # a report's replay windows (its torch draws are "report")
    "prefill": 6,
}


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """A seed in ``[0, 2**32)`` for ``stream`` (one of :data:`STREAMS`) of the run seeded
    ``seed``; ``index`` numbers its members (a worker, an evaluation)."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    # The index count is hashed too: SeedSequence pads with zeros, so (stream) and (stream, 0)
    # would otherwise give one seed.
    entropy = [int(seed), STREAMS[stream], len(index), *(int(i) for i in index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


@contextlib.contextmanager
def forked_torch_rng(seed: int, devices=()):
    """Run the body on torch's CPU generator and the ``devices``' (CUDA indices) generators,
    seeded with ``seed``, and give them their states back after. Other CUDA devices are left
    alone: ``torch.manual_seed`` would reseed every one of them, and only the forked ones get
    their states back."""
    devices = list(devices)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield
