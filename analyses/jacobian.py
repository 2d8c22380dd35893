"""Local linearisation: the top singular values of each block's Jacobian along real trajectories,
by randomized block Krylov iteration (Musco & Musco 2015) on JVPs and VJPs; no Jacobian is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch.nn.attention import SDPBackend, sdpa_kernel

from analyses.perturbation import last_layer, parameter_of, select_images, states_at
from analyses.streaming import image_coords, rounded
from dynamo.progress import progress_bar
from dynamo.stepping import propagator_for

__all__ = ["DESCRIPTION", "compute", "summarize", "top_singular_triplets", "top_singular_values"]

DESCRIPTION = (
    "Block Jacobians: the top singular values of each block's Jacobian at real states, from JVPs and "
    "VJPs, as per-block expansion rates (and, composed, the most a perturbation can grow to the last layer)."
)


def top_singular_values(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, k: int = 4, oversample: int = 6,
                        n_iter: int = 6, generator: torch.Generator | None = None) -> torch.Tensor:
    """Top singular values of the Jacobian of ``function`` at every sample of ``x``: `top_singular_triplets` without the vectors."""
    return top_singular_triplets(function, x, k, oversample, n_iter, generator)[1]


def top_singular_triplets(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, k: int = 4, oversample: int = 6,
                          n_iter: int = 6, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets of the Jacobian of ``function`` at every sample of ``x``.

    Block Lanczos on JᵀJ with full reorthogonalisation, then Rayleigh-Ritz (Krylov, as a residual
    block's spectrum clusters near 1); attention runs on the math kernel, as the fused kernels have no
    forward-mode derivative. ``function`` maps (N, ...) to (N, ...) sample by sample; each of
    ``n_iter`` steps costs one JVP and one VJP pass of ``k + oversample`` probes.

    Returns
    -------
    left : torch.Tensor
        (B, n, k) left singular vectors (output directions), orthonormal columns.
    values : torch.Tensor
        (B, k) singular values, largest first, of the (n x n) Jacobian per sample, n = x[0].numel().
    right : torch.Tensor
        (B, n, k) right singular vectors (input directions). Vectors are defined up to sign and up
        to rotation among equal singular values: compare subspaces.
    """
    b, n = x.shape[0], x[0].numel()
    p = min(k + oversample, n)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the state's size), got {k}")
    repeated = x.detach().repeat(p, *[1] * (x.dim() - 1))  # probe-major: (p B, ...)

    def as_probes(matrix: torch.Tensor) -> torch.Tensor:  # (B, n, p) -> (p B, ...)
        return matrix.permute(2, 0, 1).reshape(p * b, *x.shape[1:])

    def as_matrix(probes: torch.Tensor) -> torch.Tensor:  # (p B, ...) -> (B, n, p)
        return probes.reshape(p, b, n).permute(1, 2, 0)

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        _, pullback = torch.func.vjp(function, repeated)

        def jvp(matrix):
            return as_matrix(torch.func.jvp(function, (repeated,), (as_probes(matrix),))[1].detach())

        def vjp(matrix):
            return as_matrix(pullback(as_probes(matrix).contiguous())[0].detach())

        start = torch.randn(b, n, p, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        blocks = [_orthonormal(start, start)]  # orthonormal basis of the Krylov space, block by block
        images = []  # J applied to each block
        for step in range(n_iter + 1):
            images.append(jvp(blocks[-1]))
            if step == n_iter or p * (step + 2) > n:
                break
            grown = vjp(images[-1])  # J^T J on the newest block
            residual, basis = grown, torch.cat(blocks, dim=2)
            for _ in range(2):  # full reorthogonalisation, twice (Kahan-Parlett)
                residual = residual - basis @ (basis.transpose(1, 2) @ residual)
            blocks.append(_orthonormal(residual, grown))
        left, values, right_t = torch.linalg.svd(torch.cat(images, dim=2), full_matrices=False)
        right = torch.cat(blocks, dim=2) @ right_t.transpose(1, 2)
        return left[..., :k], values[:, :k], right[..., :k]


def _orthonormal(matrix: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning (B, n, p) ``matrix``, with zero columns where it has no rank left.

    Directions at rounding noise relative to ``before`` are dropped: there the Krylov space has
    closed, and normalising the noise would bring back directions already in the basis.
    """
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    scale = before.norm(dim=1).amax(dim=1, keepdim=True)
    return u * (s > 100 * torch.finfo(matrix.dtype).eps * scale).unsqueeze(1)


def compute(ds: xr.Dataset, model, n_singular: int = 4, blocks: Sequence[int] | None = None, composed: bool = False,
            images: int | Sequence[int] | None = 32, oversample: int = 6, n_iter: int = 6, batch_size: int = 8, seed: int = 0,
            progress: bool = True) -> xr.Dataset:
    """Top singular values of every block's Jacobian at every image's real state.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store with ``hidden``: the points of linearisation.
    model : LoadedModel, timm ViT, BlockStepper or surrogate
        See `dynamo.stepping.propagator_for`.
    blocks : sequence of int, optional
        The blocks to linearise, 1..L (block l produces layer l); default all.
    composed : bool
        Also linearise the map from every layer l0 in 0..L-1 to the last layer L.
    images : int, sequence of int, or None
        `dynamo.store.image_positions`; default 32 images evenly spaced (None: all).
    oversample, n_iter : int
        Krylov settings (`top_singular_triplets`).

    Returns
    -------
    xarray.Dataset
        ``singular_value`` (image, block, component) of dX_l / dX_{l-1}; ``expansion_rate`` log
        sigma_1; ``norm_growth`` |X_l| / |X_{l-1}|; ``relative_expansion`` log sigma_1 - log
        norm_growth; with ``composed`` ``singular_value_to_end`` (image, start, component) of
        dX_L / dX_start and ``lyapunov_exponent`` log sigma_1 / (L - start).
    """
    propagator = propagator_for(model, ds)
    ds = select_images(ds, images)
    L = last_layer(ds)
    blocks = list(range(1, L + 1)) if blocks is None else sorted({int(b) for b in blocks})
    if not blocks or blocks[0] < 1 or blocks[-1] > L:
        raise ValueError(f"blocks must lie in 1..{L}, got {blocks}")
    if n_singular < 1:
        raise ValueError(f"n_singular must be at least 1, got {n_singular}")
    starts = list(range(L)) if composed else []
    like = parameter_of(propagator)
    generator = torch.Generator().manual_seed(seed)
    n = ds.sizes["image"]
    per_block = np.full((n, len(blocks), n_singular), np.nan, np.float32)
    growth = np.full((n, len(blocks)), np.nan, np.float32)
    to_end = np.full((n, len(starts), n_singular), np.nan, np.float32)

    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    bar = progress_bar(total=len(batches) * (len(blocks) + len(starts)), desc="jacobian", enabled=progress)
    for batch in batches:
        for bi, block in enumerate(blocks):
            x = states_at(ds, block - 1, batch, like)
            per_block[batch, bi] = _spectrum(propagator, x, block - 1, block, n_singular, oversample, n_iter, generator)
            with torch.no_grad():
                after = propagator.run(x, block - 1, block)[-1]
            growth[batch, bi] = (after.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).cpu().numpy()
            bar.update()
        for si, start in enumerate(starts):
            x = states_at(ds, start, batch, like)
            to_end[batch, si] = _spectrum(propagator, x, start, L, n_singular, oversample, n_iter, generator)
            bar.update()
    bar.close()

    coords = {"image": ds["image"].values, "block": blocks, "component": np.arange(1, n_singular + 1)}
    coords.update({name: ("image", values) for name, values in image_coords(ds).items()})
    result = xr.Dataset(
        {
            "singular_value": (("image", "block", "component"), per_block,
                               {"long_name": "singular value of the block Jacobian dX_l / dX_(l-1)"}),
            "norm_growth": (("image", "block"), growth, {"long_name": "|X_l| / |X_(l-1)|, Frobenius over tokens"}),
        },
        coords=coords,
    )
    result["expansion_rate"] = np.log(result["singular_value"].sel(component=1, drop=True))
    result["expansion_rate"].attrs["long_name"] = "log of the top singular value (per block, natural log)"
    result["relative_expansion"] = result["expansion_rate"] - np.log(result["norm_growth"])
    result["relative_expansion"].attrs["long_name"] = "log sigma_1 - log norm growth (per block)"
    if composed:
        result = result.assign_coords(start=starts)
        result["singular_value_to_end"] = (("image", "start", "component"), to_end,
                                           {"long_name": f"singular value of dX_{L} / dX_start"})
        top = result["singular_value_to_end"].sel(component=1, drop=True)
        result["lyapunov_exponent"] = np.log(top) / (L - result["start"])
        result["lyapunov_exponent"].attrs["long_name"] = "finite-depth Lyapunov exponent log sigma_1 / (L - start)"
    result.attrs = {"analysis": "jacobian_spectrum", "model": ds.attrs.get("model", ""), "propagator": type(propagator).__name__,
                    "num_blocks": L, "method": f"randomized block Krylov on JVP/VJP, {n_singular}+{oversample} probes, {n_iter} steps",
                    "seed": seed}
    return result


def _spectrum(propagator, x, start, stop, k, oversample, n_iter, generator) -> np.ndarray:
    """(B, k) top singular values of the map from layer ``start`` to ``stop`` at ``x``."""
    values = top_singular_values(lambda z: propagator.run(z, start, stop)[-1], x, k=k, oversample=oversample, n_iter=n_iter,
                                 generator=generator)
    return values.float().cpu().numpy()


def summarize(result: xr.Dataset) -> dict:
    """Medians over images: ``sigma_1`` and ``relative_expansion`` per block, ``most_expanding_block``,
    and with composed maps ``lyapunov_exponent`` per start.
    """
    sigma = result["singular_value"].sel(component=1).median("image")
    summary = {
        "sigma_1": rounded(sigma.values),
        "relative_expansion": rounded(result["relative_expansion"].median("image").values),
        "most_expanding_block": int(sigma.idxmax()),
    }
    if "lyapunov_exponent" in result:
        summary["lyapunov_exponent"] = rounded(result["lyapunov_exponent"].median("image").values)
    return summary


