"""Seeds: the API reads seed 0 as "random", so every request carries an explicit, reproducible
seed; the same inputs always make the same request.

The one rule, everywhere (CLI, tasks, flows, prompt files):

- A seed the user gives (`seed=`, `--seed`, a row's `seed`) is the seed the API gets for variant
  0; variant v gets seed + v, wrapping within 1..2^32-1 (`step_seed`).
- Without one, the seed is derived from (prompt, variant), or from (`base_seed`, prompt,
  variant) when the user asks for a base (`base_seed=`, `--base-seed`): `derive_seed`.
- A row's own seed wins over a batch's `seed` and `base_seed`.
"""

from __future__ import annotations

import hashlib
import json
import math

MAX_SEED = 2**32 - 1
_DERIVED_SEED_SPAN = 2**31 - 1


def step_seed(seed: int, variant: int = 0) -> int:
    """The seed of variant `variant` of a given seed: seed, seed + 1, ..., wrapping from
    2^32 - 1 back to 1 (never 0, which the API reads as "pick one at random").

    The seed itself must be in 1..2^32-1 (the contract's range; the request validates it).
    """
    return (int(seed) - 1 + variant) % MAX_SEED + 1


def derive_seed(base_seed: int | None, prompt: str, variant: int = 0) -> int:
    """A seed that depends only on its inputs, so a re-run sends exactly the same requests.
    Used only when no seed is given (see the module's rule); `base_seed` is that of
    `base_seed=` / `--base-seed`, None without one.

    Guaranteed: the variants of one (base_seed, prompt) never share a seed, whatever their
    number (up to 2^32 - 1), and every seed is in 1..2^32-1 (never 0, which the API reads as
    "pick one at random"). Across prompts there is no guarantee, only the odds of the range:
    about n^2 / 2^33 shared seeds among n images (harmless for caching, since the prompt is
    part of the cache key, but images that share a seed look alike).

    Variant 0 is a hash of (base_seed, prompt, 0) folded into 1..2^31-1, exactly as it always
    was, so the cache keys of images already stored stay found. Variant v steps from it by v
    times a stride drawn from the same hash and coprime with 2^32 - 1: a step through the whole
    32-bit range that cannot come back to a seed already used before 2^32 - 1 steps. Hashing
    each variant independently (as variants >= 1 once were) made 6 of 200,000 seeds collide.
    A per-prompt stride, rather than one shared stride, keeps two prompts whose series
    happen to meet from overlapping for all their later variants too.
    """
    payload = json.dumps([base_seed, prompt, 0], ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("ascii")).digest()
    first = int.from_bytes(digest[:8], "big") % _DERIVED_SEED_SPAN + 1
    if variant == 0:
        return first
    stride = _coprime_stride(int.from_bytes(digest[8:16], "big") % MAX_SEED)
    return (first - 1 + variant * stride) % MAX_SEED + 1


def _coprime_stride(start: int) -> int:
    """The first stride from `start` coprime with 2^32 - 1 (= 3*5*17*257*65537): about one
    number in two is, so this loops a couple of times."""
    stride = max(start, 1)
    while math.gcd(stride, MAX_SEED) != 1:
        stride = stride % (MAX_SEED - 1) + 1
    return stride
