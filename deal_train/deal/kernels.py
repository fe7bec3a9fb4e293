"""Retention kernels of DEAL's knowledge-retention filter (paper Eqs. 7-10; App. F, Table 7), behind one registry.

Every retention layer maps a factor H (n × r, float32) to ``H + correction(H)`` (n × r) and starts as the exact
identity (its correction is exactly zero at initialisation). ``KERNELS`` maps the config value ``deal_kernel`` to
a builder with one signature; nothing else in the package branches on the kernel name.

Spectral kernels (``heat``, ``xexp``, ``spline``) filter the singular spectrum of H = U diag(s) Vᵀ::

    ŝ        = s / max(s)                                     (k,), in [0, 1]; 0 for an all-zero H
    rho(ŝ)   = 1 + sum_j g_j ⊙ phi_j(ŝ)                       (k,), g: J × k learnable gains, zero at start
    X̂        = U diag(s ⊙ rho(ŝ)) Vᵀ = H + U diag(s ⊙ (rho(ŝ) - 1)) Vᵀ

with k = min(n, r) singular values (k = r unless the rank exceeds the factor's width n), J learnable centres c_j
and fixed widths sigma_j = sigma_base · 2^-j (j = 0..J-1, on the normalised
spectrum). The kernel profiles phi_j(ŝ) (each J × r, peak value 1):

* ``heat`` (paper Eq. 8, the default): ``exp(-(ŝ - c_j)² / (2 sigma_j²))``.
* ``xexp`` (App. F, f(x) = x e^-x): ``t e^(1 - t)`` with ``t = ŝ / c̃_j`` and ``c̃_j = |c_j| + 1e-3``: a bump that
  is 0 at ŝ = 0, peaks at 1 where ŝ = c̃_j and decays like e^-t above. The width scales with the centre, so
  sigma is not used; the floor 1e-3 keeps t ≤ 1000 (finite value and gradient for c_j -> 0 and ŝ = 0).
  Centres start at linspace(1/J, 1, J) so that no bump starts collapsed at 0.
* ``spline`` (App. F, quadratic splines): the quadratic cardinal B-spline ``(4/3) B2((ŝ - c_j) / sigma_j)``,
  ``B2(x) = 3/4 - x²`` for |x| ≤ 1/2, ``(3/2 - |x|)² / 2`` for 1/2 < |x| ≤ 3/2, else 0 (support 3 sigma_j wide,
  continuously differentiable).

``haar`` is the DEAL reference code's variant: a one-level 2-D Haar DWT of H, a learnable scaling of the
approximation band, the inverse DWT. See ``HaarFilter``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

SIGMA_FLOOR = 1e-12
"""Smallest max singular value that is normalised; below it the spectrum counts as all zero (ŝ = 0)."""


def kernel_widths(num_scales: int, sigma_base: float = 0.5) -> torch.Tensor:
    """Fixed multi-scale widths sigma_j = sigma_base · 2^-j, j = 0..J-1 (shape (J,), on ŝ in [0, 1])."""
    return sigma_base * torch.pow(2.0, -torch.arange(num_scales, dtype=torch.float32))


# --- spectral profiles phi_j(ŝ) ---------------------------------------------------------------------------------

class SpectralProfile:
    """A kernel profile: ``phi(s_hat (r,), centres (J,), sigma (J,)) -> (J × r)`` and the centres' start values."""

    name = ""

    def initial_centres(self, num_scales: int) -> torch.Tensor:
        """Start values of the J learnable centres: linspace(0, 1, J)."""
        return torch.linspace(0.0, 1.0, num_scales)

    def __call__(self, s_hat: torch.Tensor, centres: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HeatProfile(SpectralProfile):
    """phi_j(ŝ) = exp(-(ŝ - c_j)² / (2 sigma_j²)) (paper Eq. 8)."""

    name = "heat"

    def __call__(self, s_hat, centres, sigma):
        diff = s_hat.unsqueeze(0) - centres.unsqueeze(1)                        # J × r
        return torch.exp(-diff.pow(2) / (2.0 * sigma.unsqueeze(1).pow(2)))


class XExpProfile(SpectralProfile):
    """phi_j(ŝ) = t e^(1 - t), t = ŝ / (|c_j| + 1e-3) (App. F's f(x) = x e^-x, rescaled to peak 1 at ŝ = c̃_j)."""

    name = "xexp"
    floor = 1e-3

    def initial_centres(self, num_scales: int) -> torch.Tensor:
        return torch.linspace(1.0 / num_scales, 1.0, num_scales)

    def __call__(self, s_hat, centres, sigma):
        t = s_hat.unsqueeze(0) / (centres.abs() + self.floor).unsqueeze(1)       # J × r, 0 <= t <= 1000
        return t * torch.exp(1.0 - t)


class SplineProfile(SpectralProfile):
    """phi_j(ŝ) = (4/3) B2((ŝ - c_j) / sigma_j), B2 the quadratic cardinal B-spline (App. F), peak 1 at ŝ = c_j."""

    name = "spline"

    def __call__(self, s_hat, centres, sigma):
        x = (s_hat.unsqueeze(0) - centres.unsqueeze(1)) / sigma.unsqueeze(1)    # J × r
        ax = x.abs()
        inner = 0.75 - x.pow(2)
        outer = 0.5 * (1.5 - ax).clamp_min(0.0).pow(2)
        return (4.0 / 3.0) * torch.where(ax <= 0.5, inner, outer)


# --- retention layers ---------------------------------------------------------------------------------------

class SpectralFilter(nn.Module):
    """One spectral retention layer (paper Eqs. 7-10): ``H -> H + U diag(s ⊙ (rho(ŝ) - 1)) Vᵀ`` (n × r -> n × r).

    Args:
        reference: a tensor of the layer's input shape (n, r). When ``decompose_input`` is False it *is* the
            input (the frozen history Y of the first layer) and its thin SVD is taken once here, without gradient.
        num_scales: J.
        profile: the kernel profile phi (``HeatProfile()`` etc.).
        sigma_base: sigma_j = sigma_base · 2^-j.
        decompose_input: True for layers after the first (K > 1), whose input depends on trainable parameters:
            the SVD is then taken of every input, see ``decompose``.

    Buffers: ``sigma`` (J); with a fixed input also ``U`` (n × k), ``s`` (k), ``Vh`` (k × r), ``s_norm`` (k), where
    k = min(n, r) is the length of the thin SVD (k = r unless the LoRA rank exceeds the layer's width n).
    Parameters: ``centres`` c (J), ``gains`` g (J × k, zeros: the layer starts as the identity).
    """

    def __init__(self, reference: torch.Tensor, num_scales: int, profile: SpectralProfile | None = None,
                 sigma_base: float = 0.5, decompose_input: bool = False):
        super().__init__()
        self.profile = profile or HeatProfile()
        self.decompose_input = decompose_input
        spectrum = min(reference.shape)  # the thin SVD's length: r, or n when the rank exceeds the width
        self.register_buffer("sigma", kernel_widths(num_scales, sigma_base))
        if not decompose_input:
            with torch.no_grad():
                u, s, vh = torch.linalg.svd(reference.detach().float(), full_matrices=False)
            self.register_buffer("U", u)
            self.register_buffer("s", s)
            self.register_buffer("Vh", vh)
            self.register_buffer("s_norm", self._normalise(s, s))
        self.centres = nn.Parameter(self.profile.initial_centres(num_scales))
        self.gains = nn.Parameter(torch.zeros(num_scales, spectrum))

    @staticmethod
    def _normalise(s: torch.Tensor, s_const: torch.Tensor) -> torch.Tensor:
        """ŝ = s / max(s_const) with a constant (detached) denominator; ŝ = 0 when max(s_const) < SIGMA_FLOOR."""
        if s_const.numel() == 0:
            return s
        s_max = s_const.detach().max()
        return torch.where(s_max >= SIGMA_FLOOR, s / s_max.clamp_min(SIGMA_FLOOR), torch.zeros_like(s))

    @staticmethod
    def decompose(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, Vh, ŝ) of H (n × r) for a trainable input, with gradients that are finite for any H.

        U and Vh come from the SVD of the *detached* H and are constants; s is recomputed with gradient as
        ``s_k = u_kᵀ H v_k``. Its value equals the SVD's s (up to rounding) and its gradient ``u_k v_kᵀ`` is the
        exact derivative of a simple singular value. What is dropped is the derivative of the singular vectors,
        whose 1 / (s_i² - s_j²) factors are infinite for repeated or zero singular values (the failure of
        ``torch.linalg.svd``'s own backward). The map stays exact in the forward pass.
        """
        with torch.no_grad():
            u, s_const, vh = torch.linalg.svd(h.detach(), full_matrices=False)
        s = ((u.t() @ h) * vh).sum(dim=1)
        return u, s, vh, SpectralFilter._normalise(s, s_const)

    def response(self, s_norm: torch.Tensor | None = None) -> torch.Tensor:
        """rho(ŝ) = 1 + sum_j g_j ⊙ phi_j(ŝ), shape (k,); ŝ defaults to the fixed input's."""
        s_norm = self.s_norm if s_norm is None else s_norm
        return 1.0 + (self.gains * self.profile(s_norm, self.centres, self.sigma)).sum(dim=0)

    def correction(self, h: torch.Tensor) -> torch.Tensor:
        """U diag(s ⊙ (rho(ŝ) - 1)) Vᵀ (n × r); exactly zero while g = 0."""
        if self.decompose_input:
            u, s, vh, s_norm = self.decompose(h)
        else:
            u, s, vh, s_norm = self.U, self.s, self.Vh, self.s_norm
        return (u * (s * (self.response(s_norm) - 1.0)).unsqueeze(0)) @ vh

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """X̂ = U diag(s ⊙ rho(ŝ)) Vᵀ computed as H + U diag(s ⊙ (rho(ŝ) - 1)) Vᵀ.

        The two forms are equal since H = U diag(s) Vᵀ; the second returns H bit-exactly while g = 0 (identity
        at the start of a task) instead of H up to the SVD's rounding.
        """
        return h + self.correction(h)


class HaarFilter(nn.Module):
    """The reference code's retention variant: ``H -> H + IDWT((a - 1) ⊙ LL(H), 0, 0, 0)`` (n × r -> n × r).

    ``LL(H)`` is the approximation band of a one-level 2-D Haar DWT of H (zero padding; ceil(n/2) × ceil(r/2)),
    ``a`` the learnable scaling of that band (``scale``, same shape, ones at start), and IDWT the inverse
    transform, cropped back to n × r. Since the DWT is linear and perfectly reconstructing, this equals
    ``IDWT(a ⊙ LL(H), LH, HL, HH)`` -- the approximation band scaled, the detail bands kept -- but the residual
    form gives H bit-exactly while a = 1, where a full round trip would be off by rounding (~5e-7).

    The transform is ``ptwt`` (the PyTorch Wavelet Toolbox, filters from PyWavelets): differentiable, runs on the
    tensor's device, reconstructs to <= 1e-6 in float32 for odd and even n and r (checked in the tests), and its
    backward is that of a convolution (finite for any H). One scale per approximation coefficient:
    ceil(n/2) · ceil(r/2) parameters per factor.

    Args:
        reference: a tensor of the layer's input shape (n, r) (only its shape is used).
        num_scales, sigma_base, decompose_input: accepted for the registry's common signature; unused.
    """

    wavelet = "haar"
    mode = "zero"

    def __init__(self, reference: torch.Tensor, num_scales: int = 1, profile=None, sigma_base: float = 0.5,
                 decompose_input: bool = False):
        super().__init__()
        n, r = reference.shape
        self.shape = (n, r)
        self.scale = nn.Parameter(torch.ones(math.ceil(n / 2), math.ceil(r / 2)))

    def dwt(self, h: torch.Tensor):
        """One-level 2-D Haar DWT of H (n × r): ``(LL, WaveletDetailTuple2d(LH, HL, HH))``, each (1, ⌈n/2⌉, ⌈r/2⌉)."""
        import ptwt

        return ptwt.wavedec2(h.unsqueeze(0), self.wavelet, level=1, mode=self.mode)

    def idwt(self, coeffs) -> torch.Tensor:
        """Inverse of ``dwt``, cropped to n × r (zero padding makes odd sizes come back one larger)."""
        import ptwt

        n, r = self.shape
        return ptwt.waverec2(coeffs, self.wavelet)[0, :n, :r]

    def correction(self, h: torch.Tensor) -> torch.Tensor:
        """IDWT((a - 1) ⊙ LL(H), 0, 0, 0) (n × r); exactly zero while a = 1."""
        import ptwt

        approx, details = self.dwt(h)
        zeros = torch.zeros_like(approx)
        return self.idwt((approx * (self.scale - 1.0), ptwt.WaveletDetailTuple2d(zeros, zeros, zeros)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.correction(h)


def _spectral(profile: SpectralProfile) -> Callable[..., nn.Module]:
    def build(reference, num_scales, sigma_base, decompose_input):
        return SpectralFilter(reference, num_scales, profile, sigma_base, decompose_input)
    build.__doc__ = f"A SpectralFilter with the {profile.name} profile."
    return build


def _haar(reference, num_scales, sigma_base, decompose_input):
    return HaarFilter(reference)


KERNELS: dict[str, Callable[..., nn.Module]] = {
    "heat": _spectral(HeatProfile()),
    "xexp": _spectral(XExpProfile()),
    "spline": _spectral(SplineProfile()),
    "haar": _haar,
}
"""``deal_kernel`` -> builder ``(reference (n × r), num_scales J, sigma_base, decompose_input) -> layer``.
Each layer has ``correction(H)`` (n × r, zero at start) and ``forward(H) = H + correction(H)``."""


def build_retention_layer(kernel: str, reference: torch.Tensor, num_scales: int, sigma_base: float = 0.5,
                          decompose_input: bool = False) -> nn.Module:
    """The retention layer named ``kernel`` for inputs shaped like ``reference`` (n × r).

    Raises:
        ValueError: an unknown kernel name (the config's choices are checked against ``KERNELS`` in the tests).
    """
    if kernel not in KERNELS:
        raise ValueError(f"Unknown DEAL kernel {kernel!r}; choose one of {', '.join(KERNELS)}.")
    return KERNELS[kernel](reference, num_scales, sigma_base, decompose_input)
