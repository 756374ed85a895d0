"""Merge methods as pure functions over tensors.

Every function takes float tensors (one tensor of each model, or its task vector = model - base),
returns a new float32 tensor, and touches nothing else: no files, no global random state. The
streaming engine in `run.py` calls them once per tensor name.

Conventions (docs/merge.md explains them with examples):

- `linear`: sum(w_i * x_i), divided by sum(w_i) when `normalize`.
- `slerp`: the tensors are treated as single flattened vectors; t=0 gives `a`, t=1 gives `b`; when the
  vectors are nearly parallel or anti-parallel (|cos| > 0.9995) or one is zero, linear interpolation.
- `task_arithmetic`: base + lambda * sum(w_i * delta_i) (divided by sum(w_i) when `normalize`).
- `ties`: trim each delta to its top `density` share by magnitude, elect a sign per entry from the
  sum of the weighted trimmed deltas, average the entries that agree with it (weighted by |w_i|),
  add lambda times that to base. A sign tie (the weighted sum is exactly 0) elects no sign: that
  entry keeps the base value.
- DARE: drop each delta entry with probability 1 - density and rescale the kept ones by 1 / density
  (`rescale="inverse_density"`, the paper's rule: the expectation equals the undropped delta), or so
  that the tensor keeps its L2 norm (`rescale="norm"`), or not at all (`rescale="none"`).
  `dare_linear` is DARE then task arithmetic; `dare_ties` is DARE then TIES' sign election and mean.

Functions that consume one tensor at a time (`linear`, `task_arithmetic`, `dare_linear`) accept any
iterable, so the engine can feed them tensors loaded lazily and hold only the running sum.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

Tensor = torch.Tensor

SLERP_DOT_THRESHOLD = 0.9995
RESCALE_RULES = ("inverse_density", "norm", "none")


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise ValueError(f"got {n} tensors but {len(weights)} weights")


# ---- linear / task arithmetic -----------------------------------------------------------------------
def linear(tensors: Iterable[Tensor], weights: Sequence[float], normalize: bool = True, consume: bool = False) -> Tensor:
    """Weighted sum of the tensors; with `normalize`, divided by the sum of the weights.

    With `consume`, the tensors are the caller's to discard and the first may be overwritten.
    """
    weights = list(weights)
    total = sum(weights)
    if normalize and abs(total) < 1e-12:
        raise ValueError(f"the weights {weights} sum to zero, so normalize cannot divide by their sum")
    acc: Tensor | None = None
    for w, x in zip(weights, tensors, strict=True):
        acc = _own(x, consume).mul_(w) if acc is None else acc.add_(x, alpha=w)
        del x
    if acc is None:
        raise ValueError("linear needs at least one tensor")
    if normalize:
        acc.div_(total)
    return acc


def task_arithmetic(
    base: Tensor,
    deltas: Iterable[Tensor | None],
    weights: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    consume: bool = False,
) -> Tensor:
    """base + lambda * sum(w_i * delta_i); a None delta is a zero task vector (an untouched tensor).

    Negative weights subtract a task vector (e.g. remove a skill). With `consume`, the deltas are the
    caller's to discard and the first may be overwritten.
    """
    weights = list(weights)
    total = sum(weights)
    if normalize and abs(total) < 1e-12:
        raise ValueError(f"the weights {weights} sum to zero, so normalize cannot divide by their sum")
    acc: Tensor | None = None
    for w, d in zip(weights, deltas, strict=True):
        if d is None or w == 0:
            continue
        acc = _own(d, consume).mul_(w) if acc is None else acc.add_(d, alpha=w)
        del d
    if acc is None:
        return _f32(base).clone()
    scale = lambda_ / total if normalize else lambda_
    return acc.mul_(scale).add_(base)


# ---- slerp ------------------------------------------------------------------------------------------
def slerp(a: Tensor, b: Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between two tensors seen as flattened vectors; t=0 gives a, t=1 gives b.

    The angle comes from the normalised vectors; the result combines the original (unnormalised)
    tensors, sin((1-t)θ)/sin θ * a + sin(tθ)/sin θ * b. Falls back to (1-t)a + tb when |cos θ| >
    `dot_threshold` (nearly parallel or anti-parallel: the formula divides by ~0) or a vector is ~0.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a32, b32 = _f32(a), _f32(b)
    va, vb = a32.reshape(-1), b32.reshape(-1)
    na, nb = float(torch.linalg.vector_norm(va)), float(torch.linalg.vector_norm(vb))
    if na < eps or nb < eps:
        return torch.lerp(a32, b32, float(t))
    cos = max(-1.0, min(1.0, float(torch.dot(va, vb)) / (na * nb)))
    if abs(cos) > dot_threshold:
        return torch.lerp(a32, b32, float(t))
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    s_a = math.sin((1.0 - t) * theta) / sin_theta
    s_b = math.sin(t * theta) / sin_theta
    return (a32 * s_a).add_(b32, alpha=s_b)


def interpolate_gradient(values: Sequence[float] | float, position: float) -> float:
    """A value from a gradient: `values` are anchors spread evenly over [0, 1], linearly interpolated.

    position 0 is the first layer, 1 the last; a single number is a constant gradient.
    """
    if isinstance(values, (int, float)):
        return float(values)
    values = [float(v) for v in values]
    if len(values) == 1:
        return values[0]
    position = min(1.0, max(0.0, position))
    x = position * (len(values) - 1)
    i = min(int(math.floor(x)), len(values) - 2)
    frac = x - i
    return values[i] * (1.0 - frac) + values[i + 1] * frac


# ---- sparsification ----------------------------------------------------------------------------------
def keep_count(numel: int, density: float) -> int:
    """How many entries a `density` share keeps: int(density * numel), rounded down as mergekit's
    `sparsify.magnitude` does, so a TIES merge keeps the same entries as mergekit's on the same inputs."""
    return min(numel, int(density * numel))


def _own(x: Tensor, consume: bool) -> Tensor:
    """A float32 tensor this function may overwrite: x itself when the caller gave it away."""
    if consume and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.to(torch.float32, copy=True).contiguous()


def magnitude_trim(delta: Tensor, density: float, consume: bool = False) -> Tensor:
    """Keep the int(density * n) entries of largest magnitude, zero the rest (TIES' trim step).

    Entries tied in magnitude with the last one kept are all kept, so the result does not depend on
    the order of equal values. With `consume`, `delta` may be overwritten (the engine's saves memory).
    """
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return _own(delta, consume)
    if k <= 0:
        return torch.zeros(delta.shape, dtype=torch.float32)
    mag = delta.abs().to(torch.float32).reshape(-1)
    mag.numpy().partition(n - k)  # in place, O(n): mag[n - k] is the k-th largest magnitude
    threshold = float(mag[n - k])
    del mag
    out = _own(delta, consume)
    return out.masked_fill_(out.abs() < threshold, 0.0)


def dare_drop(delta: Tensor, density: float, seed: int | torch.Generator, rescale: str = "inverse_density",
              consume: bool = False) -> Tensor:
    """Drop each entry with probability 1 - density (DARE) and rescale the kept ones.

    rescale: `inverse_density` multiplies by 1/density, so the expectation over seeds is the
    undropped delta (the paper's rule); `norm` scales the kept entries so the tensor keeps its L2
    norm; `none` leaves them as they are. The same seed gives the same mask. With `consume`, `delta`
    may be overwritten.
    """
    if rescale not in RESCALE_RULES:
        raise ValueError(f"rescale must be one of {RESCALE_RULES}, got {rescale!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density >= 1.0:
        return _own(delta, consume)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    drop = torch.empty(delta.shape, dtype=torch.bool).bernoulli_(1.0 - density, generator=gen)
    before = float(torch.linalg.vector_norm(delta.to(torch.float32))) if rescale == "norm" else 0.0
    out = _own(delta, consume).masked_fill_(drop, 0.0)
    del drop
    if rescale == "inverse_density":
        out.div_(density)
    elif rescale == "norm":
        after = float(torch.linalg.vector_norm(out))
        if after > 0:
            out.mul_(before / after)
    return out


# ---- ties -------------------------------------------------------------------------------------------
def elect_sign(weighted_deltas: Sequence[Tensor]) -> Tensor:
    """The sign per entry of the sum of the weighted deltas: +1, -1, or 0 for a tie (sum exactly 0)."""
    total = None
    for wd in weighted_deltas:
        total = wd.to(torch.float32, copy=True) if total is None else total.add_(wd)
    if total is None:
        raise ValueError("elect_sign needs at least one tensor")
    return total.sign_()


def disjoint_merge(
    weighted_deltas: Sequence[Tensor], weights: Sequence[float], sign: Tensor, normalize: bool = True,
    consume: bool = False,
) -> Tensor:
    """Sum of the weighted deltas whose sign agrees with `sign` (zeros never agree).

    With `normalize`, each entry is divided by the sum of |w_i| over the models that agree there, so it
    is the weighted mean of the agreeing (signed) deltas; an entry where none agree is 0. With
    `consume`, the weighted deltas may be overwritten.
    """
    _check_weights(weights, len(weighted_deltas))
    numerator: Tensor | None = None
    divisor = torch.zeros(sign.shape, dtype=torch.float32) if normalize else None
    for i, w in enumerate(weights):
        wd = _own(weighted_deltas[i], consume)
        agree = torch.mul(wd, sign).gt_(0)  # 1.0 where the signs agree and neither is 0
        wd.mul_(agree)
        if divisor is not None:
            divisor.add_(agree, alpha=abs(w))
        del agree
        numerator = wd if numerator is None else numerator.add_(wd)
        del wd
    if divisor is not None:
        numerator.div_(divisor.clamp_(min=1e-12))  # where the divisor is 0 the numerator is 0 too
    return numerator


def ties_delta(
    deltas: Iterable[Tensor | None],
    weights: Sequence[float],
    densities: Sequence[float] | float,
    normalize: bool = True,
    sparsify=None,
    consume: bool = False,
) -> Tensor | None:
    """TIES' merged task vector: trim (or `sparsify(i, delta)`), elect sign, disjoint mean.

    With `consume`, the deltas are the caller's to discard and may be overwritten.
    """
    weights = list(weights)
    n = len(weights)
    dens = [float(densities)] * n if isinstance(densities, (int, float)) else list(densities)
    weighted, used_weights = [], []
    # Consumed one delta at a time, so a lazily loaded delta is released once it is sparsified.
    for i, (w, d) in enumerate(zip(weights, deltas, strict=True)):
        if d is None or w == 0:
            continue
        sparse = sparsify(i, d) if sparsify is not None else magnitude_trim(d, dens[i], consume)
        del d
        weighted.append(sparse.mul_(w))
        used_weights.append(w)
    if not weighted:
        return None
    sign = elect_sign(weighted)
    return disjoint_merge(weighted, used_weights, sign, normalize, consume=True)


def ties(
    base: Tensor,
    deltas: Iterable[Tensor | None],
    weights: Sequence[float],
    densities: Sequence[float] | float,
    lambda_: float = 1.0,
    normalize: bool = True,
    consume: bool = False,
) -> Tensor:
    """base + lambda * ties_delta(...) (see the module docstring)."""
    merged = ties_delta(deltas, weights, densities, normalize, consume=consume)
    if merged is None:
        return _f32(base).clone()
    return merged.mul_(lambda_).add_(base)


def _per_model(densities: Sequence[float] | float, n: int) -> list[float]:
    return [float(densities)] * n if isinstance(densities, (int, float)) else list(densities)


def dare_linear(
    base: Tensor,
    deltas: Iterable[Tensor | None],
    weights: Sequence[float],
    densities: Sequence[float] | float,
    seeds: Sequence[int],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "inverse_density",
    consume: bool = False,
) -> Tensor:
    """DARE each delta (seeded per model), then task arithmetic."""
    weights = list(weights)
    dens = _per_model(densities, len(weights))

    def dropped():
        for i, d in enumerate(deltas):
            yield None if d is None else dare_drop(d, dens[i], seeds[i], rescale, consume)

    return task_arithmetic(base, dropped(), weights, lambda_, normalize, consume=True)


def dare_ties(
    base: Tensor,
    deltas: Iterable[Tensor | None],
    weights: Sequence[float],
    densities: Sequence[float] | float,
    seeds: Sequence[int],
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: str = "inverse_density",
    consume: bool = False,
) -> Tensor:
    """DARE each delta (seeded per model), then TIES' sign election and disjoint mean."""
    dens = _per_model(densities, len(weights))
    merged = ties_delta(
        deltas, weights, dens, normalize, consume=consume,
        sparsify=lambda i, d: dare_drop(d, dens[i], seeds[i], rescale, consume),
    )
    if merged is None:
        return _f32(base).clone()
    return merged.mul_(lambda_).add_(base)
