"""ntl_fast: the Number Token Loss ("Regress, Don't Guess", Zausinger et al.) as fused kernels.

Cross-entropy scores a wrong digit the same whatever its value; NTL adds, at every position whose
label is a number token, a regression-like term on the model's distribution over the number
tokens (docs/math.md §2). Typical use::

    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer, vocab_size=logits.shape[-1])
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table.to(logits.device), ntl_weight=0.3)
    out.loss.backward()   # out.ce and out.ntl are detached, for logging

Functions: :func:`number_token_loss` (NTL alone), :func:`cross_entropy_with_ntl` (CE + λ·NTL in
one pass over the logits), :func:`linear_cross_entropy_with_ntl` (the same from the LM head's
input, without materialising the logits), :func:`number_level_loss` (whole numbers),
:func:`predict_numbers` (expected value and number mass, for evaluation), :func:`global_counts`
(exact means under data parallelism), :func:`explain_backend` (which kernels serve a device).
Modules: :class:`NumberTokenLoss`, :class:`CrossEntropyWithNTL`,
:class:`LinearCrossEntropyWithNTL`. The authors' ``ntloss`` classes, with their defaults
(reweighing on): :mod:`ntl_fast.compat`. Training integrations: :mod:`ntl_fast.integrations`.

The native functions follow the paper: no reweighing (``reweigh=False``), ``ntl_weight=0.3``,
NTL-WAS. Each call checks label values eagerly (``validate=True``: one device-to-host read);
pass ``validate=False``, or compile the step with ``torch.compile``, to avoid that sync.
"""

from . import compat
from .backends import BackendChoice, explain_backend
from .config import LOSSES, REDUCTIONS, LossConfig
from .distributed import global_counts, token_counts
from .functional import NTLOutput, cross_entropy_with_ntl, number_level_loss, number_token_loss
from .linear import linear_cross_entropy_with_ntl
from .module import CrossEntropyWithNTL, LinearCrossEntropyWithNTL, NumberTokenLoss
from .predict import NumberPrediction, predict_numbers
from .table import NumberTokenTable

__version__ = "0.1.0"

from ._extension import preload as _preload_extension  # noqa: E402
from .backends import load_backends as _load_backends  # noqa: E402

_preload_extension()  # the CPU build of ntl_fast._C this machine runs best, before the backends import it
_load_backends()

__all__ = [
    "BackendChoice",
    "CrossEntropyWithNTL",
    "LOSSES",
    "LinearCrossEntropyWithNTL",
    "LossConfig",
    "NTLOutput",
    "NumberPrediction",
    "NumberTokenLoss",
    "NumberTokenTable",
    "REDUCTIONS",
    "compat",
    "cross_entropy_with_ntl",
    "explain_backend",
    "global_counts",
    "linear_cross_entropy_with_ntl",
    "number_level_loss",
    "number_token_loss",
    "predict_numbers",
    "token_counts",
]
