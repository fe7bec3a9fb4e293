"""The DEAL maths (docs/design.md section 3; paper Eqs. 7-12).

A LoRA layer computes ``h = W0 x + (alpha / r) B A x`` with ``A = lora_A.weight`` (r × d_in) and
``B = lora_B.weight`` (d_out × r). DEAL writes each factor with the rank as its column dimension,
``Y`` (n × r): ``Y = Aᵀ`` for A and ``Y = B`` for B. For every task after the first, the factors left
by the previous task are the frozen *history* and DEAL learns a map ``Y -> O``:

1. Knowledge retention, a wavelet filter over Y's singular spectrum (Eqs. 7-10)::

       Y = U diag(s) Vᵀ                      (thin SVD, taken once per task, no gradient)
       phi_j(s) = exp(-(ŝ - c_j)² / (2 sigma_j²)),  ŝ = s / max(s)     (heat kernels, j = 1..J)
       rho(s)   = 1 + sum_j g_j ⊙ phi_j(s)   (g: J × r learnable gains, c: J learnable centres)
       X̂        = U diag(s ⊙ rho(s)) Vᵀ

   The kernel is a switch (``deal_kernel``: heat, xexp, spline, haar; App. F, Table 7), see ``kernels.py``;
   K > 1 stacked layers with an activation between them are ``RetentionStack``.

2. Controlled knowledge update, an MLP over the rank dimension applied to each row (Eq. 11)::

       O = X̂ + W2 act(W1 X̂ᵀ + b1) + b2      (W1: h × r, W2: r × h; W2 = 0, b2 = 0 at start)

3. Regularisers (Eq. 12) on the retention parameters θ1 = {g, c} (Haar: the band scales) and the update parameters
   θ2 = {W1, b1, W2, b2}, plus an optional drift penalty ||O - Y||²_F / ||Y||²_F (ours).

With g = 0 (Haar: scales = 1) and W2 = b2 = 0 at the start of a task, O = Y exactly (identity at start). After the
task the map is folded: A <- O_Aᵀ, B <- O_B, giving a plain LoRA adapter of the same shape.

The map is installed with ``torch.nn.utils.parametrize`` on ``lora_A.weight`` / ``lora_B.weight``;
the history factor and its SVD are buffers (not parameters) so ZeRO-3 does not shard them away.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .kernels import KERNELS, SpectralFilter, build_retention_layer

ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU, "identity": nn.Identity}
RETENTION_ACTIVATIONS = ("identity", "gelu", "tanh")
"""Activations allowed between retention layers: all have δ(0) = 0, which the identity at start needs."""

__all__ = ["ACTIVATIONS", "RETENTION_ACTIVATIONS", "KERNELS", "SpectralFilter", "RetentionStack", "UpdateMLP",
           "DEALFactor", "DRIFT_FLOOR_FRACTION", "set_drift_floors", "p_norm", "regulariser", "attach", "fold"]


class RetentionStack(nn.Module):
    """K stacked retention layers (paper Eq. 9, H^0 = Y, X̂ = H^K) with an activation between them.

    ``H^{k+1} = H^k + δ(C_k(H^k))`` for k < K-1 and ``X̂ = H^{K-1} + C_{K-1}(H^{K-1})``, where C_k is layer k's
    correction (``kernels.KERNELS``; zero at start) and δ the retention activation. The paper writes
    ``H^{k+1} = δ(filter(H^k))``; we apply δ to the correction instead so that the stack starts as the exact
    identity for any δ with δ(0) = 0 (identity, gelu, tanh), as the update MLP does (docs/design.md section 3).
    The first layer decomposes the frozen history once; later layers decompose their (trainable) input on every
    forward (``SpectralFilter.decompose``, finite gradients for any input).

    Args:
        history: Y (n × r), float32.
        kernel: a key of ``KERNELS`` (heat, xexp, spline, haar).
        num_scales: J; sigma_base: sigma_j = sigma_base · 2^-j.
        layers: K >= 1.
        activation: δ, one of ``RETENTION_ACTIVATIONS``.
    Raises:
        ValueError: K < 1, an unknown kernel, or an activation with δ(0) != 0 / not in the list.
    """

    def __init__(self, history: torch.Tensor, kernel: str = "heat", num_scales: int = 4, sigma_base: float = 0.5,
                 layers: int = 1, activation: str = "identity"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"DEAL needs at least one retention layer, got {layers}.")
        if activation not in RETENTION_ACTIVATIONS:
            raise ValueError(f"Retention activation {activation!r} is not one of {', '.join(RETENTION_ACTIVATIONS)}.")
        self.layers = nn.ModuleList(
            build_retention_layer(kernel, history, num_scales, sigma_base, decompose_input=(k > 0))
            for k in range(layers))
        self.act = ACTIVATIONS[activation]()

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """X̂ (n × r) from Y (n × r)."""
        h = history
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            c = layer.correction(h)
            h = h + (c if k == last else self.act(c))
        return h


class UpdateMLP(nn.Module):
    """Row-wise residual MLP over the rank dimension (paper Eq. 11, residual form of docs/design.md section 3).

    ``forward(X)`` maps (n, r) to (n, r): ``X + W2 act(W1 x + b1) + b2`` for every row x.
    W2 and b2 start at zero, so the map starts as the identity.
    """

    def __init__(self, rank: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(rank, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, rank)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class DEALFactor(nn.Module):
    """Parametrization ``W -> DEAL(history)`` for one LoRA weight (``lora_A.weight`` or ``lora_B.weight``).

    Args:
        weight: the history weight as stored by PEFT: A (r × d_in) when ``transpose`` else B (d_out × r).
        transpose: True for lora_A (Y = Aᵀ), False for lora_B (Y = B).
        num_scales, hidden, activation: J, h and the update MLP's activation.
        kernel: the retention kernel (``deal_kernel``: heat, xexp, spline, haar).
        layers: K retention layers (``deal_layers``); retention_activation: δ between them.
        sigma_base: sigma_j = sigma_base · 2^-j (``deal_sigma_base``).
        residual: add a trainable residual R (n × r, zero at start): O = MLP(X̂) + R (``deal_residual_update``;
            ours, not the paper's).

    ``forward`` maps its input (the frozen original weight, whose values are the history's) to O (or Oᵀ for A) in
    the weight's dtype and layout, so ``parametrize`` can fold it with ``leave_parametrized=True``.
    """

    def __init__(self, weight: torch.Tensor, transpose: bool, num_scales: int, hidden: int, activation: str,
                 kernel: str = "heat", layers: int = 1, retention_activation: str = "identity",
                 sigma_base: float = 0.5, residual: bool = False):
        super().__init__()
        self.transpose = transpose
        history = weight.detach().t() if transpose else weight.detach()
        self.register_buffer("history", history.float().contiguous().clone())
        self.retention = RetentionStack(self.history, kernel, num_scales, sigma_base, layers, retention_activation)
        self.update = UpdateMLP(history.shape[1], hidden, activation)
        self.residual = nn.Parameter(torch.zeros(self.history.shape)) if residual else None  # contiguous (DeepSpeed flattens it)

    def _map(self, y: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """O (n × r, float32) from Y (n × r) = the history's values; ``params`` as for ``factor``."""
        if params is None:
            out = self.update(self.retention(y))
            return out if self.residual is None else out + self.residual
        sub = {part: {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(part + ".")}
               for part in ("retention", "update")}
        x_hat = torch.func.functional_call(self.retention, sub["retention"], (y,))
        out = torch.func.functional_call(self.update, sub["update"], (x_hat,))
        return out if self.residual is None else out + params["residual"]

    def factor(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """O, shape (n, r), float32, from the ``history`` buffer; with ``params`` (name -> tensor, as
        ``named_parameters``) computed from those tensors instead of the module's parameters
        (``torch.func.functional_call``; used under ZeRO-3)."""
        return self._map(self.history, params)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """O (or Oᵀ for A) in ``weight``'s dtype and layout, computed from ``weight``: the frozen LoRA weight that
        ``parametrize`` passes in, whose values are the history's (Y = weightᵀ for A, Y = weight for B; made
        contiguous, so O is bit-identical to ``factor()``). Computing from the input rather than from the buffer
        puts the input at the root of the module's graph, which ZeRO-3 needs (see
        ``distributed.mark_leaf_modules``)."""
        y = (weight.t() if self.transpose else weight).float().contiguous()
        out = self._map(y)
        out = out.t() if self.transpose else out
        # The same dtype, shape and strides as the plain LoRA weight: a transposed view would send F.linear to
        # another BLAS kernel on some CPUs, and the identity at the start of a task would differ in the last bits.
        return out.to(weight.dtype).contiguous()

    def retention_parameters(self) -> list[nn.Parameter]:
        """θ1 of Eq. 12: {g, c} of every spectral layer, or the band scales a of every Haar layer."""
        return list(self.retention.parameters())

    def update_parameters(self) -> list[nn.Parameter]:
        """θ2 = {W1, b1, W2, b2} of Eq. 12."""
        return list(self.update.parameters())

    def residual_parameters(self) -> list[nn.Parameter]:
        """[R] with ``residual=True``, else []. Not part of θ1/θ2; the drift penalty covers it."""
        return [] if self.residual is None else [self.residual]

    drift_floor: float = 0.0
    """ε of ``drift``'s denominator, set for all factors of an adapter by ``set_drift_floors``."""

    def drift(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """||O - Y||²_F / (||Y||²_F + ε) (scalar), ε = ``drift_floor`` (see ``set_drift_floors``; the sum is
        clamped at 1e-12): the relative drift of the folded factor, which stays finite and of the loss's order for
        a (near-)zero history instead of growing as 1 / ||Y||²; ``params`` as for ``factor``."""
        diff = self.factor(params) - self.history
        return diff.pow(2).sum() / (self.history.pow(2).sum() + self.drift_floor).clamp_min(1e-12)


DRIFT_FLOOR_FRACTION = 1e-3
"""ε of the drift penalty as a fraction of the mean history energy ||Y||²_F of the adapter's factors."""


def set_drift_floors(factors: list[DEALFactor], fraction: float = DRIFT_FLOOR_FRACTION) -> None:
    """Set each factor's ``drift_floor`` ε = ``fraction`` × the mean ||Y||²_F of the factors on its side (all
    lora_A factors, or all lora_B ones), or of all factors where that side's histories are all zero (e.g. a B never
    trained). For a typical factor ε changes the relative drift by about ``fraction`` (0.1 %); for a vanishing
    history it replaces the division by ~0 (an all-zero B once made the penalty 1e10 against a cross-entropy of 10)
    by one on the adapter's own scale. Deterministic in the histories, so a resumed task gets the same ε."""
    if not factors:
        return
    energy = [float(f.history.double().pow(2).sum()) for f in factors]
    overall = sum(energy) / len(energy)
    for side in (True, False):
        idx = [i for i, f in enumerate(factors) if f.transpose is side]
        mean = sum(energy[i] for i in idx) / len(idx) if idx else 0.0
        for i in idx:
            factors[i].drift_floor = fraction * (mean if mean > 0 else overall)


def p_norm(x: torch.Tensor, p: float) -> torch.Tensor:
    """||x||_p = (sum |x|^p)^(1/p), computed as m · ||x / m||_p with m = max |x| (constant) so that large p
    (the paper's a = 10) neither underflows nor overflows in float32. Gradient 0 at x = 0 (not NaN). No host sync
    (the x = 0 case is a ``torch.where``, not a Python branch), so it does not stall a GPU."""
    m = x.detach().abs().amax()
    return m * torch.linalg.vector_norm(x / torch.where(m > 0, m, torch.ones_like(m)), ord=p)


def regulariser(params: list[torch.Tensor], starts: list[torch.Tensor] | None, p: float, form: str) -> torch.Tensor:
    """Sum over parameter tensors of ||θ - θ₀||_p (``form='norm'``) or ||θ - θ₀||_p^p (``form='power'``).

    Tensors of the same shape (DEAL has one gains, centres, W1, b1, W2, b2 per factor, i.e. a few shapes for
    hundreds of factors) are stacked and reduced together: the same value as a loop over tensors with ``p_norm``,
    in a few dozen kernels instead of thousands, and without host syncs.

    Args:
        params: the current parameters.
        starts: their values at the start of the task (same shapes), or None for the raw ``||θ||`` form.
        p: the norm order (a or b of Eq. 12), p >= 1.
        form: ``norm`` or ``power``.
    Returns:
        A scalar tensor (float32) with gradients to ``params``.
    """
    total = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    groups: dict[tuple, list[int]] = {}
    for i, theta in enumerate(params):
        groups.setdefault((tuple(theta.shape), theta.device), []).append(i)
    for idx in groups.values():
        x = torch.stack([params[i].float() for i in idx]).flatten(1)                  # G × numel
        if starts is not None:
            x = x - torch.stack([starts[i] for i in idx]).flatten(1).to(x.device)
        if form == "power":
            total = total + x.abs().pow(p).sum()
            continue
        m = x.detach().abs().amax(dim=1, keepdim=True)                                 # G × 1, constant
        norms = torch.linalg.vector_norm(x / torch.where(m > 0, m, torch.ones_like(m)), ord=p, dim=1)
        total = total + (m.squeeze(1) * norms).sum()
    return total


def attach(module: nn.Module, tensor_name: str, factor: DEALFactor) -> None:
    """Install ``factor`` as the parametrization of ``module.<tensor_name>`` (the weight stays frozen)."""
    getattr(module, tensor_name).requires_grad_(False)
    parametrize.register_parametrization(module, tensor_name, factor)


def fold(module: nn.Module, tensor_name: str = "weight") -> None:
    """Replace the parametrized weight by its current value O (or Oᵀ) and drop the DEAL modules.

    The parameter object stays the same and keeps ``requires_grad=False``.
    """
    param_before = module.parametrizations[tensor_name].original
    requires_grad = param_before.requires_grad
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    getattr(module, tensor_name).requires_grad_(requires_grad)

