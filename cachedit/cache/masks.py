"""Step computation masks: which denoising steps must compute (1) and which may cache (0).

The named policies are fractions of the step count, so they fit any number of steps: a
computed warm start, then computed steps at growing gaps, and always the last step.
"""

from __future__ import annotations

import math

# Step-mask preset name -> (fraction of steps computed at the start, fraction computed in all).
# Not to be confused with the cache policies (cachedit.cache.policies.POLICIES): these are only masks.
MASK_FRACTIONS = {"slow": (8 / 28, 18 / 28), "medium": (6 / 28, 15 / 28), "fast": (6 / 28, 11 / 28),
            "ultra": (4 / 28, 8 / 28)}


def steps_mask(policy: str, num_steps: int) -> tuple[int, ...]:
    """The mask of `policy` ("slow", "medium", "fast", "ultra") for `num_steps` steps."""
    if policy not in MASK_FRACTIONS:
        raise ValueError(f"steps mask policy {policy!r} is unknown; allowed values: {', '.join(MASK_FRACTIONS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} is invalid; allowed values: an integer >= 1")
    warm_frac, total_frac = MASK_FRACTIONS[policy]
    warm = min(num_steps, max(1, math.ceil(warm_frac * num_steps)))
    total = min(num_steps, max(warm + 1, round(total_frac * num_steps)))
    mask = [1] * warm + [0] * (num_steps - warm)
    mask[-1] = 1
    inner = total - warm - 1  # computes left for the middle, at growing gaps (denser early)
    span = num_steps - 1 - warm
    for j in range(1, inner + 1):
        mask[warm + min(span - 1, int(span * (j / (inner + 1)) ** 1.5))] = 1
    return tuple(mask)


def resolve_mask(mask, num_steps: int | None) -> tuple[int, ...] | None:
    """An explicit mask as given (steps past its end compute); a policy name needs the step count."""
    if mask is None or not isinstance(mask, str):
        return mask
    if num_steps is None:
        raise ValueError(f"steps_mask={mask!r} needs the number of steps: run it through a pipeline, or pass "
                         "it to cachedit.refresh(pipe, num_inference_steps=N) before calling the transformer")
    return steps_mask(mask, num_steps)
