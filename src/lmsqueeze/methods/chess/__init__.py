"""CHESS: channel-wise activation thresholds, selective attention sparsification, sparse GEMV kernels.

Importing this package registers the "chess" method (no triton import: kernels load at first GPU call).
"""

from lmsqueeze.methods.chess.method import CHESS
from lmsqueeze.methods.chess.sparse_linear import SparseLinear, SparseMLP

__all__ = ["CHESS", "SparseLinear", "SparseMLP"]
