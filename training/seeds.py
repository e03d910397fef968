"""Seeds derived from a run's seed, so every random draw can be reproduced on its own."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for a tuple of integer keys, e.g. (run seed, step, rank) or
    (run seed, image index); numpy's SeedSequence mixes them so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
