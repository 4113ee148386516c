"""SSIM (Wang et al., 2004) per image, as torchmetrics computes it: the separable Gaussian window and its
padding become one matrix product per side of each map (tests/test_metrics.py checks it against torchmetrics)."""

import torch

from aecurves.errors import UserError

SSIM_WINDOW = 11  # the side of SSIM's Gaussian window (Wang et al., 2004): images must be at least this large


def check_ssim_size(height: int, width: int) -> None:
    if min(height, width) < SSIM_WINDOW:
        raise UserError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its Gaussian window), "
                        f"but these are {height}x{width}; leave SSIM out for images this small.")


SSIM_SIGMA, SSIM_K1, SSIM_K2 = 1.5, 0.01, 0.03


def ssim_per_image(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each image's SSIM (Wang et al., 2004: 11x11 Gaussian window, σ 1.5, K1 0.01, K2 0.03, data range 1 for
    images in [0, 1]), the mean over its pixels and channels, as torchmetrics' structural_similarity_index_measure
    defines it (reflection padding, local statistics by the Gaussian window, negative variances clamped to 0).

    The window is separable and the padding linear, so both are applied as one [H, H] and one [W, W] matrix
    product per map instead of torchmetrics' depthwise 11x11 convolution: the same sums in another order,
    several times faster on a CPU (benchmarks/eval_throughput.py). tests/test_metrics.py checks it against
    torchmetrics.
    """
    check_ssim_size(x.shape[-2], x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 evaluation
        recon, x = recon.float().contiguous(), x.float().contiguous()  # rows of pixels for the matrix products
        rows, cols = window_matrix(x.shape[-2], x.device), window_matrix(x.shape[-1], x.device)
        local = rows.T @ torch.stack((recon, x, recon * recon, x * x, recon * x)) @ cols
        mu_r, mu_x, rr, xx, rx = local
        c1, c2 = SSIM_K1**2, SSIM_K2**2
        mu_rr, mu_xx, mu_rx = mu_r.pow(2), mu_x.pow(2), mu_r * mu_x
        var_r, var_x, cov = (rr - mu_rr).clamp_min(0), (xx - mu_xx).clamp_min(0), rx - mu_rx
        ssim = ((2 * mu_rx + c1) * (2 * cov + c2)) / ((mu_rr + mu_xx + c1) * (var_r + var_x + c2))
        return ssim.flatten(1).mean(1)


_WINDOWS: dict = {}


def window_matrix(n: int, device) -> torch.Tensor:
    """[n, n]: reflection padding by 5 on both sides, then the 11-tap Gaussian (σ 1.5, normalized to sum 1), as one
    linear map along an axis of n pixels (a row vector times it is the filtered row)."""
    key = (n, str(device))
    if key not in _WINDOWS:
        half = (SSIM_WINDOW - 1) // 2
        taps = torch.arange(-half, half + 1, dtype=torch.float64)
        gauss = torch.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
        gauss /= gauss.sum()
        source = torch.arange(-half, n + half).abs()       # padded position -> pixel: reflection at 0 ...
        source = torch.where(source > n - 1, 2 * (n - 1) - source, source)  # ... and at n - 1
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for out in range(n):  # output pixel `out` reads padded positions out .. out + 10
            matrix.index_put_((source[out:out + SSIM_WINDOW], torch.full((SSIM_WINDOW,), out)), gauss,
                              accumulate=True)
        _WINDOWS[key] = matrix.float().to(device)
    return _WINDOWS[key]
