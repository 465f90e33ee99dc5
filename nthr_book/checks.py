"""One rounding bound for every "by hand = library" check in the notebooks (notebook 01 explains).

A computer adds n numbers t_1..t_n one rounding at a time; each rounding is off by at most the unit
roundoff u = eps/2 of the running sum (eps: the dtype's machine epsilon, ``torch.finfo(dtype).eps``,
2.2e-16 for float64 and 1.2e-7 for float32). The computed sum therefore lies within
(n − 1)·u·Σ|t_i| of the exact one, whatever the order of the additions, and two computations of the
same sum (a derivation by hand and the library, or two kernels that add in different orders) differ
by at most 2·(n − 1)·u·Σ|t_i| < n·eps·Σ|t_i|. A term that is itself computed (an ``exp``, a
product) adds a few roundings of its own: count them in n. So

    |got − ref| ≤ n_terms · eps · scale,

with ``n_terms`` the terms added plus the roundings of each, ``scale`` = Σ|t_i| (the sum of the
absolute values of what was added: not the result, which can be small when the terms cancel) and
``eps`` the machine epsilon of the *less* precise side. The bound is a derivation, not a guess, so
it holds on any CPU or GPU that rounds to nearest; it is loose by design (real errors are closer to
√n·u·Σ|t|), which is why a check that fails it has found a bug, not noise.

``assert_close_by_terms(got, ref, n_terms=..., scale=...)`` checks it elementwise and returns what
it found, so that a notebook's check is one readable line::

    print(checks.assert_close_by_terms(library, by_hand, n_terms=2 * G, dtype=torch.float64))

The exhaustive checks (every shape, every option) live in ``tests/``; a notebook checks its one
example. Notebooks 01, 04, 06 and 07 use it; the others adopt it as they are rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CloseCheck", "assert_close_by_terms", "machine_eps", "rounding_bound"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def machine_eps(dtype: torch.dtype) -> float:
    """The machine epsilon of a floating dtype: 2.2e-16 (float64), 1.2e-7 (float32), 7.8e-3
    (bfloat16)."""
    if dtype not in _FLOATS:
        raise TypeError(f"machine_eps: {dtype} is not a floating dtype")
    return float(torch.finfo(dtype).eps)


def rounding_bound(n_terms: int, scale: float, dtype: torch.dtype = torch.float32) -> float:
    """``n_terms · eps(dtype) · scale``: how far two computations of a sum of ``n_terms`` terms
    whose absolute values add up to ``scale`` may differ (see the module docstring)."""
    if isinstance(n_terms, bool) or int(n_terms) != n_terms or n_terms < 1:
        raise ValueError(f"rounding_bound: n_terms must be an integer >= 1, got {n_terms!r}")
    if not scale >= 0:  # also refuses NaN
        raise ValueError(f"rounding_bound: scale must be >= 0, got {scale!r}")
    return int(n_terms) * machine_eps(dtype) * float(scale)


@dataclass(frozen=True)
class CloseCheck:
    """What ``assert_close_by_terms`` found: the largest difference and the bound it kept to."""

    max_diff: float  # max |got − ref| over the elements
    bound: float  # the (largest) bound n_terms · eps · scale
    n_terms: int
    dtype: str  # the dtype whose eps was used
    scale: float  # the (largest) scale
    n: int  # elements compared

    @property
    def exact(self) -> bool:
        """True when the two sides agree to the last bit."""
        return self.max_diff == 0.0

    def __str__(self) -> str:
        what = f"{self.n} value{'s' if self.n != 1 else ''}"
        if self.exact:
            return f"{what}: equal to the last bit"
        return (
            f"{what}: largest difference {self.max_diff:.1e}, within the rounding bound "
            f"{self.bound:.1e} = {self.n_terms} terms × eps({self.dtype}) × scale {self.scale:.3g}"
        )


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(x, dtype=torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_close_by_terms(
    got: Any,
    ref: Any,
    *,
    n_terms: int,
    scale: Any = None,
    dtype: torch.dtype | None = None,
) -> CloseCheck:
    """Assert ``|got − ref| ≤ n_terms · eps · scale`` elementwise; return a ``CloseCheck``.

    ``got`` and ``ref``: tensors, numbers or nested lists of one shape. ``n_terms``: the terms the
    computation adds plus the roundings of each term (module docstring). ``scale``: Σ|terms| of the
    sum, a number or a tensor that broadcasts to the values (a bound per element); default the
    largest |ref|, right when the result is as large as its terms (a product, a sum of terms of one
    sign). ``dtype``: whose eps; default the less precise floating dtype of the two sides (a
    Python number counts as float64). NaN must sit at the same places on both sides, infinities must
    be equal. Raises AssertionError naming the worst element otherwise.
    """
    a, b = _as_tensor(got), _as_tensor(ref)
    if a.shape != b.shape:
        raise AssertionError(
            f"assert_close_by_terms: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if dtype is None:
        floats = [t.dtype for t in (a, b) if t.dtype in _FLOATS]
        dtype = max(floats, key=machine_eps) if floats else torch.float64
    rounding_bound(n_terms, 0.0, dtype)  # validates n_terms and dtype
    a64, b64 = a.to(torch.float64).cpu(), b.to(torch.float64).cpu()
    if scale is None:  # the largest finite |ref|
        finite_ref = b64[b64.isfinite()].abs()
        s = finite_ref.max() if finite_ref.numel() else torch.tensor(0.0, dtype=torch.float64)
    else:
        s = _as_tensor(scale).to(torch.float64).cpu()
    if s.isnan().any() or (s < 0).any():
        raise ValueError("assert_close_by_terms: scale must be >= 0 (and not NaN)")
    bound = s * (int(n_terms) * machine_eps(dtype))  # () or broadcastable to the values
    nan_a, nan_b = a64.isnan(), b64.isnan()
    if not torch.equal(nan_a, nan_b):
        where = (nan_a != nan_b).nonzero()[0].tolist()
        raise AssertionError(f"assert_close_by_terms: NaN on one side only, at index {where}")
    inf = a64.isinf() | b64.isinf()
    if not torch.equal(a64[inf], b64[inf]):
        raise AssertionError("assert_close_by_terms: the infinities differ")
    finite = ~(nan_a | inf)
    diff = torch.where(finite, (a64 - b64).abs(), torch.zeros_like(a64))
    full_bound = torch.broadcast_to(bound, diff.shape)
    over = diff > full_bound
    if over.any():
        i = int((diff - full_bound).flatten().argmax())
        index = list(torch.unravel_index(torch.tensor(i), diff.shape)) if diff.dim() else []
        index = [int(k) for k in index]
        raise AssertionError(
            f"assert_close_by_terms: {int(over.sum())} of {diff.numel()} values differ by more "
            f"than the rounding bound; worst at index {index}: got {a64.flatten()[i].item():.17g}, "
            f"ref {b64.flatten()[i].item():.17g}, difference {diff.flatten()[i].item():.3e} > "
            f"bound {full_bound.flatten()[i].item():.3e} = {n_terms} terms × eps({_name(dtype)}) × "
            f"scale {torch.broadcast_to(s, diff.shape).flatten()[i].item():.3g}"
        )
    max_diff = float(diff.max()) if diff.numel() else 0.0
    return CloseCheck(
        max_diff=max_diff,
        bound=float(full_bound.max()) if full_bound.numel() else 0.0,
        n_terms=int(n_terms),
        dtype=_name(dtype),
        scale=float(s.max()) if s.numel() else 0.0,
        n=int(diff.numel()),
    )
