"""The DEAL maths: retention kernels and filter, update MLP, regularisers, fold (docs/design.md section 3)."""

from .filter import (DRIFT_FLOOR_FRACTION, DRIFT_WEIGHTINGS, DEALFactor, RetentionStack, UpdateMLP, attach,
                     energy_rank, fold, history_basis, p_norm, regulariser, set_drift_floors)
from .kernels import KERNELS, HaarFilter, SpectralFilter, build_retention_layer

__all__ = ["DRIFT_FLOOR_FRACTION", "DRIFT_WEIGHTINGS", "DEALFactor", "HaarFilter", "KERNELS", "RetentionStack", "SpectralFilter", "UpdateMLP", "attach",
           "build_retention_layer", "energy_rank", "fold", "history_basis", "p_norm", "regulariser", "set_drift_floors"]
