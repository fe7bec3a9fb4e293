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

Switches of ours (docs/design.md section 3, "Round-2 switches"; all off by default):

* projection (``deal_project_residual``): ``O = X̂ + P⊥ Δ``, ``Δ = MLP correction + R`` and
  ``P⊥ = I - U_k U_kᵀ`` with U_k the history's top-k left singular vectors (Σ_{i<=k} s_i² >= energy · Σ s²);
* spectral drift (``deal_drift_weighting``): ``Σ_i w_i ||u_iᵀ D||² + ||(I - U Uᵀ) D||²``, w = s / mean(s), D = O - Y;
* split drift (``deal_lambda_drift_history`` / ``_residual``): the drifts of X̂ - Y and of O - X̂ separately.

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

DRIFT_WEIGHTINGS = ("flat", "spectral")
"""``deal_drift_weighting``: how ``DEALFactor.drift`` measures a factor's movement (see ``DEALFactor.drift_energy``)."""

__all__ = ["ACTIVATIONS", "RETENTION_ACTIVATIONS", "KERNELS", "DRIFT_WEIGHTINGS", "SpectralFilter", "RetentionStack",
           "UpdateMLP", "DEALFactor", "OrthogonalGrowth", "DRIFT_FLOOR_FRACTION", "energy_rank", "history_basis",
           "history_input_basis", "low_rank_svd", "set_drift_floors",
           "p_norm", "regulariser", "attach", "fold"]


def history_basis(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s) of the thin SVD ``history = U diag(s) Vᵀ`` (U: n × k, s: k, k = min(n, r), s descending), computed
    in float64 without gradient and returned in float32: the history's left singular basis, i.e. its directions
    in the n-dimensional space of Y's columns (the input space for lora_A, Y = Aᵀ: A's right singular vectors;
    the output space for lora_B, Y = B: B's left singular vectors)."""
    with torch.no_grad():
        u, s, _vh = torch.linalg.svd(history.detach().double(), full_matrices=False)
    return u.float().contiguous(), s.float().contiguous()


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """k: the smallest number of leading singular values whose Σ_{i<=k} s_i² reaches ``energy`` (in (0, 1]) of
    Σ_i s_i² (``s`` descending); 0 for an all-zero spectrum (no direction to protect)."""
    e = s.detach().double().pow(2)
    cumulative = torch.cumsum(e, 0)
    total = float(cumulative[-1]) if e.numel() else 0.0
    if total <= 0.0:
        return 0
    return min(int((cumulative < energy * total).sum()) + 1, e.numel()) if energy < 1.0 else int((e > 0).sum())


def low_rank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, s, V) of M = b @ a (b: d_out × R, a: R × d_in) without forming M: M = U diag(s) Vᵀ.

    M has rank ≤ R (R = r · number of adapters), while d_out × d_in is large, so: b = Q_b R_b and aᵀ = Q_a R_a
    (reduced QR; Q_b: d_out × R, Q_a: d_in × R, orthonormal columns), M = Q_b (R_b R_aᵀ) Q_aᵀ, and the SVD of the
    R × R core C = R_b R_aᵀ = U_c diag(s) V_cᵀ gives U = Q_b U_c, V = Q_a V_c. O((d_out + d_in) R²) instead of
    O(d_out d_in min(d_out, d_in)). Float64, on the CPU; the results go back to ``b``'s device.
    """
    device = b.device
    b, a = b.detach().double().cpu(), a.detach().double().cpu()
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return (q_b @ u_c).to(device), s.to(device), (q_a @ vh_c.T).to(device)


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

    ``forward(X)`` maps (n, r) to (n, r): ``X + W2 act(W1 x + b1) + b2`` for every row x; with
    ``correction_only=True`` only the correction ``W2 act(W1 x + b1) + b2`` (what the projection of
    ``DEALFactor`` acts on). W2 and b2 start at zero, so the map starts as the identity.
    """

    def __init__(self, rank: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(rank, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, rank)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, correction_only: bool = False) -> torch.Tensor:
        if correction_only:
            return self.fc2(self.act(self.fc1(x)))
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
        project: ``O = X̂ + P⊥ (MLP correction + R)`` with ``P⊥ = I - U_k U_kᵀ`` (``deal_project_residual``):
            everything the task adds on top of the filtered history is kept out of the history's top-k left
            singular directions (n-dimensional: input directions for A, output directions for B). U_k and k are
            fixed at construction from the frozen history (buffer ``basis_u``, ``project_rank``).
        project_energy: k = ``energy_rank(s, project_energy)`` (``deal_project_energy``).
        drift_weighting: ``flat`` or ``spectral`` (``deal_drift_weighting``, see ``drift_energy``).

    Buffers: ``history`` (n × r); with ``project`` or a spectral drift also ``basis_u`` (n × k) and ``basis_s`` (k)
    (``history_basis``); with a spectral drift ``drift_weights`` (k). Off, the factor holds exactly the buffers and
    computes exactly the values of before these switches existed.

    ``forward`` maps its input (the frozen original weight, whose values are the history's) to O (or Oᵀ for A) in
    the weight's dtype and layout, so ``parametrize`` can fold it with ``leave_parametrized=True``.
    """

    def __init__(self, weight: torch.Tensor, transpose: bool, num_scales: int, hidden: int, activation: str,
                 kernel: str = "heat", layers: int = 1, retention_activation: str = "identity",
                 sigma_base: float = 0.5, residual: bool = False, project: bool = False,
                 project_energy: float = 0.95, drift_weighting: str = "flat"):
        super().__init__()
        if drift_weighting not in DRIFT_WEIGHTINGS:
            raise ValueError(f"Drift weighting {drift_weighting!r} is not one of {', '.join(DRIFT_WEIGHTINGS)}.")
        if project and not 0.0 < project_energy <= 1.0:
            raise ValueError(f"project_energy must be in (0, 1], got {project_energy}.")
        self.transpose = transpose
        self.project = project
        self.drift_weighting = drift_weighting
        history = weight.detach().t() if transpose else weight.detach()
        self.register_buffer("history", history.float().contiguous().clone())
        self.retention = RetentionStack(self.history, kernel, num_scales, sigma_base, layers, retention_activation)
        self.update = UpdateMLP(history.shape[1], hidden, activation)
        self.residual = nn.Parameter(torch.zeros(self.history.shape)) if residual else None  # contiguous (DeepSpeed flattens it)
        self.project_rank = 0  # k of the projection (0: nothing projected out)
        if project or drift_weighting == "spectral":
            u, s = history_basis(self.history)
            self.register_buffer("basis_u", u)
            self.register_buffer("basis_s", s)
            if project:
                self.project_rank = energy_rank(s, project_energy)
            if drift_weighting == "spectral":
                mean = float(s.double().mean()) if s.numel() else 0.0
                weights = s / mean if mean > 0 else torch.ones_like(s)
                self.register_buffer("drift_weights", weights.float().contiguous())

    def _call(self, part: str, params: dict[str, torch.Tensor] | None, *args, **kwargs) -> torch.Tensor:
        """Submodule ``part`` (retention, update) on ``args``, with its parameters from ``params`` when given."""
        module = getattr(self, part)
        if params is None:
            return module(*args, **kwargs)
        sub = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(part + ".")}
        return torch.func.functional_call(module, sub, args, kwargs)

    def project_out(self, delta: torch.Tensor) -> torch.Tensor:
        """P⊥ delta = delta - U_k (U_kᵀ delta) (n × r): ``delta`` without its component in the history's top-k left
        singular directions (``project_rank`` = k; unchanged for k = 0)."""
        if self.project_rank == 0:
            return delta
        u = self.basis_u[:, :self.project_rank]
        return delta - u @ (u.t() @ delta)

    def _parts(self, y: torch.Tensor, params: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(X̂, O), both n × r float32, from Y (n × r) = the history's values; ``params`` as for ``factor``.
        X̂ is the filtered history, O - X̂ what the update MLP and R add (projected with ``project``)."""
        x_hat = self._call("retention", params, y)
        residual = self.residual if params is None or self.residual is None else params["residual"]
        if not self.project:  # the values (and the order of the additions) of before the projection existed
            out = self._call("update", params, x_hat)
            return x_hat, (out if residual is None else out + residual)
        added = self._call("update", params, x_hat, correction_only=True)
        if residual is not None:
            added = added + residual
        return x_hat, x_hat + self.project_out(added)

    def _map(self, y: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """O (n × r, float32) from Y (n × r) = the history's values; ``params`` as for ``factor``."""
        return self._parts(y, params)[1]

    def parts(self, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(X̂, O) from the ``history`` buffer (``params`` as for ``factor``): the history part X̂ and the whole
        factor; O - X̂ is the residual part (the update MLP's correction plus R)."""
        return self._parts(self.history, params)

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

    def drift_energy(self, diff: torch.Tensor) -> torch.Tensor:
        """The size of a movement ``diff`` (n × r) of the factor, a scalar:

        * ``flat``: ||diff||²_F;
        * ``spectral``: Σ_i w_i ||u_iᵀ diff||² + ||(I - U Uᵀ) diff||²_F with u_i the history's left singular
          vectors (``basis_u``) and w = s / mean(s) (``drift_weights``; 1 for an all-zero history): a movement
          along a strong direction of the history costs more than one along a weak direction, one outside the
          history's span costs as in the flat form. Σ_i w_i = k, so the weights redistribute the flat penalty
          (tr of the weighting = n, as the identity's) and a uniform spectrum gives exactly the flat value.
        """
        if self.drift_weighting == "flat":
            return diff.pow(2).sum()
        u = self.basis_u
        inside = u.t() @ diff                                   # k × r: the coordinates along u_i
        outside = diff - u @ inside
        return (self.drift_weights.unsqueeze(1) * inside.pow(2)).sum() + outside.pow(2).sum()

    def _drift_denominator(self) -> torch.Tensor:
        return (self.history.pow(2).sum() + self.drift_floor).clamp_min(1e-12)

    def drift(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """||O - Y||²_F / (||Y||²_F + ε) (scalar), ε = ``drift_floor`` (see ``set_drift_floors``; the sum is
        clamped at 1e-12): the relative drift of the folded factor, which stays finite and of the loss's order for
        a (near-)zero history instead of growing as 1 / ||Y||²; ``params`` as for ``factor``. With a spectral
        weighting the numerator is ``drift_energy(O - Y)``."""
        diff = self.factor(params) - self.history
        return self.drift_energy(diff) / self._drift_denominator()

    def drift_parts(self, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(history drift, residual drift): ``drift_energy(X̂ - Y)`` and ``drift_energy(O - X̂)``, each over the same
        denominator as ``drift``; ``params`` as for ``factor``. Their sum is not ``drift()``: that also holds the
        cross term 2 <X̂ - Y, O - X̂>."""
        x_hat, out = self.parts(params)
        den = self._drift_denominator()
        return self.drift_energy(x_hat - self.history) / den, self.drift_energy(out - x_hat) / den


def history_input_basis(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], energy: float) -> torch.Tensor:
    """V_k (d_in × k, float32): the top-k right singular vectors of one layer's history ΔW_h = Σ_i s_i B_i A_i over
    the earlier adapters ``pairs`` = [(B_i: d_out × r, A_i: r × d_in, s_i = lora_alpha / r)], i.e. the input
    directions the history reads, k = ``energy_rank(σ, energy)`` on ΔW_h's singular values σ (0 columns for an
    all-zero history). ΔW_h is not formed (``low_rank_svd``); float64 inside, no gradient. The same directions
    ``train.adapter_change`` measures its ``input`` overlap against."""
    with torch.no_grad():
        b_cat = torch.cat([b for b, _a, _s in pairs], dim=1)
        a_cat = torch.cat([a * s for _b, a, s in pairs], dim=0)
        _u, sv, v = low_rank_svd(b_cat, a_cat)
        k = energy_rank(sv, energy)
    return v[:, :k].float().contiguous()


class OrthogonalGrowth(nn.Module):
    """Parametrization of the new adapter's ``lora_A.weight`` under ``deal_grow_adapter`` (docs/design.md 3.4):

        A = A0 + R P⊥,   P⊥ = I − V_k V_kᵀ      (A0, R: r × d_in; V_k: d_in × k, ``history_input_basis``)

    with A0 the frozen weight that ``parametrize`` passes in (PEFT's initialisation, written already projected:
    A0 = A_init P⊥, ``project_out``) and R the trainable residual (zero at the start of the task, so A = A0 exactly).
    Every row of A stays in the orthogonal complement of the input directions the earlier adapters read, so the
    new adapter's ΔW = s B A reads nothing of what they read: O-LoRA's constraint (its |A_i A_tᵀ| penalty) made
    exact. B of the new adapter trains as plain LoRA.

    Buffers: ``basis`` (d_in × k). Parameters: ``residual`` (r × d_in). ``forward`` computes from its input (the
    frozen weight), which ZeRO-3 needs for a leaf module (``train.distributed.mark_leaf_modules``).
    """

    def __init__(self, weight: torch.Tensor, basis: torch.Tensor):
        super().__init__()
        if basis.dim() != 2 or basis.shape[0] != weight.shape[1]:
            raise ValueError(f"basis must be d_in × k with d_in = {weight.shape[1]} (lora_A is {tuple(weight.shape)}), "
                             f"got {tuple(basis.shape)}.")
        self.register_buffer("basis", basis.detach().float().contiguous().clone())
        self.residual = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32))

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        """a P⊥ = a − (a V_k) V_kᵀ (a: rows in the input space, r × d_in; unchanged for k = 0)."""
        if self.basis.shape[1] == 0:
            return a
        return a - (a @ self.basis) @ self.basis.t()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """A0 + R P⊥ in ``weight``'s dtype and layout (A0 = ``weight``)."""
        return (weight.float() + self.project_out(self.residual)).to(weight.dtype).contiguous()


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


def attach(module: nn.Module, tensor_name: str, factor: nn.Module) -> None:
    """Install ``factor`` (a ``DEALFactor`` or ``OrthogonalGrowth``) as the parametrization of
    ``module.<tensor_name>`` (the weight stays frozen)."""
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

