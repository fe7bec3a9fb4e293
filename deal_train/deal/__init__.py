"""The DEAL maths: spectral retention filter, update MLP, regularisers, fold (DESIGN.md section 3)."""

from .filter import DEALFactor, SpectralFilter, UpdateMLP, attach, fold, p_norm, regulariser

__all__ = ["DEALFactor", "SpectralFilter", "UpdateMLP", "attach", "fold", "p_norm", "regulariser"]
