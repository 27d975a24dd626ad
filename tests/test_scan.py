"""Linear recurrences and segment sums (titans_mini.scan)."""

import torch

from titans_mini.scan import linear_scan, linear_scan_loop, segsum


def _naive(a, b, h0):
    """Independent loop over the last dim, in pure Python indexing."""
    out = torch.empty_like(b)
    h = h0
    for t in range(b.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out[..., t] = h
    return out


def test_loop_matches_naive():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 17, generator=g, dtype=torch.float64)
    b = torch.randn(3, 17, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_scan_loop(a, b, h0), _naive(a, b, h0))


def test_parallel_scan_matches_loop_any_length_and_coefficients():
    g = torch.Generator().manual_seed(1)
    for T in (1, 2, 5, 16, 33):
        # include zeros and negative transitions: the scan must not rely on logs
        a = torch.randn(2, 4, T, generator=g, dtype=torch.float64)
        a[..., ::3] = 0.0
        b = torch.randn(2, 4, T, generator=g, dtype=torch.float64)
        h0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
        torch.testing.assert_close(linear_scan(a, b), linear_scan_loop(a, b))
        torch.testing.assert_close(linear_scan(a, b, h0), _naive(a, b, h0))


def test_scan_over_leading_dim_with_matrix_inputs():
    """a per step (T,), b per step (T, o, i): the momentum recurrence of a weight matrix."""
    g = torch.Generator().manual_seed(2)
    a = torch.rand(9, generator=g, dtype=torch.float64)
    b = torch.randn(9, 3, 2, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    expected = []
    h = h0
    for t in range(9):
        h = a[t] * h + b[t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b, h0, dim=0), torch.stack(expected))
    torch.testing.assert_close(linear_scan_loop(a, b, h0, dim=0), torch.stack(expected))


def test_segsum_is_products_of_gates():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 6, generator=g, dtype=torch.float64).log()
    out = segsum(x)
    for i in range(6):
        for j in range(6):
            if i >= j:
                expected = x[:, j + 1: i + 1].sum(-1)
                torch.testing.assert_close(out[:, i, j], expected)
            else:
                assert torch.isinf(out[:, i, j]).all() and (out[:, i, j] < 0).all()


def test_segsum_handles_minus_infinity():
    """log 0 = −inf (η ≡ 0) must give exact zeros after exp, no NaN."""
    x = torch.full((5,), float("-inf"), dtype=torch.float64)
    p = segsum(x).exp()
    torch.testing.assert_close(p, torch.eye(5, dtype=torch.float64))
