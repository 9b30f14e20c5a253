"""Data order and per-sample randomness that do not depend on the number of processes.

Every random choice about a sample (flips, caption dropout, noise, timestep) comes from a generator seeded by
``(run seed, epoch, sample index, stream)``, and the data order of an epoch is one global permutation that the
processes slice. So one process with batch 2B and two processes with batch B see the same samples with the
same noise, and their averaged gradients agree.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np
import torch

#: Streams of per-sample randomness: augmentation (dataset side) and diffusion noise (trainer side).
STREAM_AUGMENT = 0
STREAM_NOISE = 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (e.g. run seed, epoch, index, stream).

    SeedSequence mixes the parts, so neighbouring tuples give unrelated streams.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def sample_generator(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample's randomness of one stream."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index, stream))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The global data order of one epoch: a permutation of ``range(num_samples)``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 2**31 - 1))
    return torch.randperm(num_samples, generator=generator).tolist()


def epoch_draw(weights: torch.Tensor, seed: int, epoch: int) -> list[int]:
    """The global data order of one weighted epoch: ``len(weights)`` indices drawn with replacement, index ``i``
    with probability proportional to ``weights[i]``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 2**31 - 2))
    return torch.multinomial(weights, len(weights), replacement=True, generator=generator).tolist()


def balanced_weights(groups: list) -> torch.Tensor:
    """Sampling weights that give every distinct group the same total weight (1 / its size per member)."""
    if not groups:
        raise ValueError("balanced_weights: no samples")
    counts = collections.Counter(groups)
    return torch.tensor([1.0 / counts[g] for g in groups], dtype=torch.float64)


class ShardedBatchSampler:
    """Yields this process's share of each global batch as a list of ``(epoch, index)`` keys, forever.

    A global batch holds ``batch_size * num_processes`` samples; process ``p`` takes slice ``p`` of it. The last
    incomplete global batch of an epoch is dropped. ``start_batch`` skips that many global batches (resume).
    ``weights`` (one per sample): each epoch draws its order with replacement in proportion to them
    (``epoch_draw``) instead of permuting (the 'balanced pairs' variant); None = a permutation (the default).
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, start_batch: int = 0, weights: torch.Tensor | None = None):
        global_batch = batch_size * num_processes
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} pairs, fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {num_processes} processes)"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.start_batch = start_batch
        self.batches_per_epoch = num_samples // global_batch
        if weights is not None and (len(weights) != num_samples or not bool((weights >= 0).all())
                                    or not float(weights.sum()) > 0):
            raise ValueError(f"weights: need {num_samples} non-negative weights with a positive sum")
        self.weights = weights

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order = (epoch_permutation(self.num_samples, self.seed, epoch) if self.weights is None
                     else epoch_draw(self.weights, self.seed, epoch))
            for b in range(batch, self.batches_per_epoch):
                start = (b * self.num_processes + self.process_index) * self.batch_size
                yield [(epoch, i) for i in order[start:start + self.batch_size]]
            epoch, batch = epoch + 1, 0
