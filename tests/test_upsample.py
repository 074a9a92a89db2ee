"""Logits upsampling as two matmuls: the same numbers as F.interpolate's bilinear resize, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from offroad.upsample import bilinear_matrix, upsample_bilinear

SIZES = [((19, 34), (266, 476)), ((3, 4), (10, 13)), ((5, 7), (5, 7)), ((1, 1), (4, 4)), ((7, 9), (8, 20))]


@pytest.mark.parametrize("small, size", SIZES)
def test_equals_interpolate_forward_and_backward(small, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *small, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    x32 = x.detach().float().requires_grad_()
    got = upsample_bilinear(x32, size)
    (got_grad,) = torch.autograd.grad(got, x32, grad.float())
    assert got.dtype == torch.float32 and got.shape == (2, 3, *size)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-4, atol=1e-4)


def test_each_output_row_blends_at_most_two_neighbours_with_weights_summing_to_one():
    m = bilinear_matrix(19, 266)
    assert m.shape == (266, 19)
    torch.testing.assert_close(m.sum(1), torch.ones(266))
    assert ((m > 0).sum(1) <= 2).all() and (m >= 0).all()
    assert m[0, 0] == 1 and m[-1, -1] == 1  # the edges repeat the edge pixel


def test_full_resolution_logits_are_fp32_under_autocast():
    x = torch.randn(2, 10, 19, 34).to(torch.bfloat16)  # what the head gives under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = upsample_bilinear(x, (266, 476))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, upsample_bilinear(x.float(), (266, 476)), rtol=0, atol=0)
    assert not torch.equal(got, got.bfloat16().float())  # not rounded to bf16 on the way


def test_a_matrix_first_built_during_evaluation_still_trains():
    bilinear_matrix.cache_clear()
    x = torch.randn(1, 2, 7, 9)
    with torch.inference_mode():
        upsample_bilinear(x, (23, 31))  # evaluation builds and caches the matrices
    x.requires_grad_(True)
    upsample_bilinear(x, (23, 31)).sum().backward()  # training reuses them
    assert x.grad is not None and x.grad.shape == x.shape
