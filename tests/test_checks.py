"""The notebooks' rounding bound (nthr_book.checks): the derivation holds on real sums, the check
fails where it must, and its report reads as one line."""

from __future__ import annotations

import math

import pytest
import torch

from nthr_book import checks


def test_rounding_bound_is_n_eps_scale():
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    assert checks.rounding_bound(8, 2.0, torch.float64) == 8 * eps64 * 2.0
    assert checks.rounding_bound(3, 1.0) == 3 * eps32  # float32 by default
    assert checks.machine_eps(torch.bfloat16) == 2.0**-7
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_terms"):
            checks.rounding_bound(bad, 1.0)
    with pytest.raises(ValueError, match="scale"):
        checks.rounding_bound(2, -1.0)
    with pytest.raises(ValueError, match="scale"):
        checks.rounding_bound(2, math.nan)
    with pytest.raises(TypeError, match="floating"):
        checks.machine_eps(torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_derivation_holds_for_sums_in_any_order(dtype):
    """Two orders of the same n-term sum, and the sum against the exact one (float64 of float32
    terms, or math.fsum), differ by less than n·eps·Σ|t|, also when the terms cancel."""
    gen = torch.Generator().manual_seed(0)
    for n in (2, 7, 100, 4096):
        for trial in range(20):
            terms = torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** (trial % 5)
            terms = (terms - terms.mean()).to(dtype)  # sums that cancel: the result is small
            forward = terms.sum()
            backward = terms.flip(0).cumsum(0)[-1]  # another order of the same additions
            exact = math.fsum(terms.double().tolist())
            scale = terms.double().abs().sum()
            checks.assert_close_by_terms(forward, backward, n_terms=n, scale=scale)
            checks.assert_close_by_terms(forward, exact, n_terms=n, scale=scale, dtype=dtype)


def test_default_dtype_scale_and_report():
    ref = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    got = ref.float()  # exact: these are representable in float32
    found = checks.assert_close_by_terms(got, ref, n_terms=4)
    assert found.exact and found.dtype == "float32" and found.scale == 3.0
    assert found.bound == 4 * torch.finfo(torch.float32).eps * 3.0
    assert str(found) == "3 values: equal to the last bit"
    off = ref + torch.tensor([2.0**-50, 0.0, 0.0], dtype=torch.float64)  # exact: 1 + 2^-50
    found = checks.assert_close_by_terms(off, ref, n_terms=8)  # float64 both: eps64
    assert found.dtype == "float64" and found.max_diff == 2.0**-50
    text = str(found)
    assert text.startswith("3 values: largest difference 8.9e-16, within the rounding bound")
    assert "8 terms × eps(float64) × scale 3" in text
    # Python numbers count as float64; a scalar check reads "1 value"
    assert str(checks.assert_close_by_terms(0.1 + 0.2, 0.3, n_terms=2)).startswith("1 value:")


def test_fails_beyond_the_bound_and_names_the_worst_element():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    got = ref.clone()
    got[1, 2] = 1e-9
    with pytest.raises(AssertionError, match=r"1 of 6 values .* worst at index \[1, 2\]"):
        checks.assert_close_by_terms(got, ref, n_terms=10, scale=1.0)
    # a per-element scale: the same difference passes where its scale allows it
    scale = torch.tensor([[1.0], [1e8]], dtype=torch.float64)  # broadcasts over the columns
    checks.assert_close_by_terms(got, ref, n_terms=10, scale=scale)
    with pytest.raises(AssertionError, match="shapes differ"):
        checks.assert_close_by_terms(torch.zeros(2), torch.zeros(3), n_terms=1)
    with pytest.raises(ValueError, match="scale"):
        checks.assert_close_by_terms(torch.zeros(2), torch.zeros(2), n_terms=1, scale=-1.0)


def test_nan_and_inf_must_match():
    nan, inf = math.nan, math.inf
    checks.assert_close_by_terms([1.0, nan, inf], [1.0, nan, inf], n_terms=1)
    with pytest.raises(AssertionError, match="NaN on one side only"):
        checks.assert_close_by_terms([1.0, nan], [1.0, 2.0], n_terms=1)
    with pytest.raises(AssertionError, match="infinities differ"):
        checks.assert_close_by_terms([inf], [-inf], n_terms=1)
