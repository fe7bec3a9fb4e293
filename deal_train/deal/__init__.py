"""The DEAL maths: retention kernels and filter, update MLP, regularisers, fold (docs/design.md section 3)."""

from .filter import (DRIFT_FLOOR_FRACTION, DRIFT_WEIGHTINGS, DEALFactor, OrthogonalGrowth, RetentionStack, UpdateMLP,
                     attach, energy_rank, fold, history_basis, history_input_basis, low_rank_svd, p_norm, regulariser,
                     set_drift_floors)
from .kernels import KERNELS, HaarFilter, SpectralFilter, build_retention_layer

__all__ = ["DRIFT_FLOOR_FRACTION", "DRIFT_WEIGHTINGS", "DEALFactor", "HaarFilter", "KERNELS", "OrthogonalGrowth",
           "RetentionStack", "SpectralFilter", "UpdateMLP", "attach", "build_retention_layer", "energy_rank", "fold",
           "history_basis", "history_input_basis", "low_rank_svd", "p_norm", "regulariser", "set_drift_floors"]
