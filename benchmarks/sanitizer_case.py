"""One small forward + backward of every kernel backend, for compute-sanitizer (memcheck).

Bad labels are included with ``validate=False``: masked kernels must turn them into NaN losses
without touching memory outside the logits.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ntl_fast  # noqa: E402

table = ntl_fast.NumberTokenTable.from_values({3 + d: float(d) for d in range(10)}, vocab_size=1000).to("cuda")
logits = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
labels = torch.randint(0, 1000, (37,), device="cuda")
labels[:10] = torch.arange(3, 13, device="cuda")
labels[10], labels[11], labels[12] = -100, 1000, -5  # ignored, past V, negative

for backend in ("triton", "cpp"):
    try:
        ntl_fast.explain_backend("cuda", backend)
    except RuntimeError as error:
        print(f"{backend}: unavailable ({error})")
        continue
    for loss in ("was", "mse", "was_cdf"):
        out = ntl_fast.cross_entropy_with_ntl(
            logits, labels, table, loss=loss, reweigh=True, validate=False, backend=backend, reduction="none"
        )
        out.loss.nan_to_num().sum().backward()
        ntl = ntl_fast.number_token_loss(logits, labels, table, loss=loss, validate=False, backend=backend,
                                         reduction="none")
        ntl.nan_to_num().sum().backward()
    torch.cuda.synchronize()
    print(f"{backend}: ran; NaN rows at bad labels: {torch.isnan(out.ce[11:13]).all().item()}")
