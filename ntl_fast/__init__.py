"""ntl_fast: the Number Token Loss ("Regress, Don't Guess", Zausinger et al.) as fused kernels.

    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer, vocab_size=logits.shape[-1])
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table.to(logits.device), ntl_weight=0.3)
    out.loss.backward()   # out.ce and out.ntl are detached, for logging
"""

from .backends import BackendChoice, explain_backend
from .config import LOSSES, REDUCTIONS, LossConfig
from .distributed import global_counts, token_counts
from .functional import NTLOutput, cross_entropy_with_ntl, number_level_loss, number_token_loss
from .linear import linear_cross_entropy_with_ntl
from .module import CrossEntropyWithNTL, NumberTokenLoss
from .table import NumberTokenTable

__version__ = "0.1.0"

from .backends import load_backends as _load_backends  # noqa: E402

_load_backends()

__all__ = [
    "BackendChoice",
    "CrossEntropyWithNTL",
    "LOSSES",
    "LossConfig",
    "NTLOutput",
    "NumberTokenLoss",
    "NumberTokenTable",
    "REDUCTIONS",
    "cross_entropy_with_ntl",
    "explain_backend",
    "global_counts",
    "linear_cross_entropy_with_ntl",
    "number_level_loss",
    "number_token_loss",
    "token_counts",
]
