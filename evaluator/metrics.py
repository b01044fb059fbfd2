"""ADM's metrics from Inception features: Fréchet distance (FID, sFID), Inception Score, precision / recall.

Each function reproduces the arithmetic of `guided-diffusion/evaluations/evaluator.py` step by step, so the
numbers match the paper's table; where ADM's choice is odd (float16 distances), the comment says it is ADM's.
"""
import warnings

import numpy as np
import torch
from scipy import linalg

from utils.errors import DataError


def compute_statistics(features):
    """(mu, sigma) of a feature set, as ADM's `compute_statistics` (np.cov works in float64)."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), ADM's `FIDStatistics.frechet_distance`."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    # ADM calls sqrtm(..., disp=False)[0]; `disp` is deprecated since SciPy 1.16 and the plain call
    # returns the same matrix.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"Imaginary component {np.max(np.abs(covmean.imag))} in the square root of the "
                            "covariance product: the statistics are degenerate (too few images for the feature "
                            "size, or many identical images), so no FID can be computed from them")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` rows, averaged over splits (ADM / improved-GAN)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        # 0·log 0 = 0: ADM's formula gives NaN for an exactly-zero probability and is identical elsewhere.
        kl = np.where(part > 0, kl, 0)
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device=None):
    """ADM's improved precision / recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    A point's manifold ball has the squared distance to its k-th nearest neighbour in its own set as radius.
    precision = share of samples inside some reference ball; recall = share of references inside some sample
    ball. Distances run in `batch_size`² blocks (ADM's row/column batch of 10000), on the GPU if there is one.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.as_tensor(np.asarray(ref_features, dtype=np.float32), device=device)
    sample = torch.as_tensor(np.asarray(sample_features, dtype=np.float32), device=device)
    if min(len(ref), len(sample)) <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} points in each set, "
                        f"got {len(ref)} reference and {len(sample)} sample points")
    ref_radii = _manifold_radii(ref, k, batch_size)
    sample_radii = _manifold_radii(sample, k, batch_size)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=device)
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(sample), batch_size):
            dist = _squared_distances(ref[i : i + batch_size], sample[j : j + batch_size])
            ref_inside[i : i + batch_size] |= (dist <= sample_radii[None, j : j + batch_size]).any(1)
            sample_inside[j : j + batch_size] |= (dist <= ref_radii[i : i + batch_size, None]).any(0)
    return sample_inside.sum().item() / len(sample), ref_inside.sum().item() / len(ref)


def _manifold_radii(features, k, batch_size):
    """Squared distance of each point to its k-th nearest neighbour in `features` (itself being the 0-th)."""
    radii = []
    for i in range(0, len(features), batch_size):
        rows = features[i : i + batch_size]
        nearest = rows.new_full((len(rows), k + 1), float("inf"))
        for j in range(0, len(features), batch_size):
            block = _squared_distances(rows, features[j : j + batch_size])
            # Keep the k+1 smallest so far: the exact values np.partition(kth=k) would select.
            nearest = torch.cat([nearest, block], 1).topk(k + 1, dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _squared_distances(u, v):
    """ADM's DistanceBlock: squared distances in float16, redone in float32 if any float16 value overflows."""
    dist = _pairwise_squared_distances(u, v, torch.float16)
    return dist if torch.isfinite(dist).all() else _pairwise_squared_distances(u, v, torch.float32)


def _pairwise_squared_distances(u, v, dtype):
    """max(||u||² - 2 u·v + ||v||², 0) with each op's result rounded to `dtype`, as ADM's TF graph rounds it.

    The arithmetic runs in float32 and rounds after each op, which emulates float16 ops (a product of two
    float16 values is exact in float32; GPU float16 matmuls and sums accumulate in float32; rounding a float32
    +, - or * to float16 equals the float16 op), so CPU and GPU share one path without half-precision kernels.
    """
    def rounded(x):
        return x.to(dtype).to(torch.float32)

    u, v = rounded(u), rounded(v)
    norm_u = rounded(rounded(u * u).sum(1, keepdim=True))
    norm_v = rounded(rounded(v * v).sum(1))[None]
    return rounded(rounded(norm_u - rounded(2 * (u @ v.T))) + norm_v).clamp_min(0)
