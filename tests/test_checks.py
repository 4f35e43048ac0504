"""attrprims._checks.check_finite: the compiled scan and the torch fallback find the same first NaN/Inf."""

import pytest
import torch

from attrprims._checks import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "column-strided", "3-d"])
def test_first_non_finite_is_named(dtype, bad, layout):
    big = torch.randn(9, 40).to(dtype)
    big[big.abs() > 3] = 0  # finite everywhere, even in fp16
    x = {"contiguous": big[:, :17], "row-strided": big[::2, 3:20], "column-strided": big[:, :34:2],
         "3-d": big[:8].reshape(2, 4, 40)[:, :, :17]}[layout]
    check_finite("x", x)
    position = (1, 2, 5) if layout == "3-d" else (3, 5)
    later = (1, 3, 1) if layout == "3-d" else (4, 0)
    x[later] = bad
    x[position] = bad
    with pytest.raises(ValueError, match=rf"x: expected finite values, found {bad} at \[{', '.join(map(str, position))}\]"):
        check_finite("x", x)


def test_empty_and_max_values_pass():
    check_finite("x", torch.zeros(0, 5))
    check_finite("x", torch.zeros(5, 0))
    check_finite("x", torch.full((2, 3), torch.finfo(torch.float16).max, dtype=torch.float16))
    check_finite("x", torch.full((2, 3), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16))
