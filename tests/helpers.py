"""Tables, inputs and the tolerance rule (docs/math.md §6) shared by the test modules."""

import contextlib
from typing import Iterator, Optional
from unittest import mock

import torch

import ntl_fast
from ntl_fast import NumberTokenTable


def digit_table(vocab_size: int = 40, first_id: int = 7, dot_id: Optional[int] = None) -> NumberTokenTable:
    """Digits 0-9 at ids first_id..first_id+9 of a small vocabulary."""
    return NumberTokenTable.from_values(
        {first_id + d: float(d) for d in range(10)}, vocab_size=vocab_size, dot_id=dot_id
    )


def irregular_table(vocab_size: int = 53) -> NumberTokenTable:
    """K = 7 (not a power of two), ids scattered (0 and V-1 included), uneven and unsorted values,
    and a duplicated value (two ids worth 2.5)."""
    values = {0: 9.0, 4: 0.0, 11: 2.5, 20: 100.0, 31: -3.0, 44: 7.0, vocab_size - 1: 2.5}
    return NumberTokenTable.from_values(values, vocab_size=vocab_size)


def random_labels(shape, table: NumberTokenTable, number_fraction: float = 0.5,
                  ignore_fraction: float = 0.15, ignore_index: int = -100, generator=None) -> torch.Tensor:
    """Labels mixing number tokens, other tokens and ignore_index."""
    numbers = table.number_ids.cpu()
    any_token = torch.randint(0, table.vocab_size, shape, generator=generator)
    number_token = numbers[torch.randint(0, numbers.numel(), shape, generator=generator)]
    draw = torch.rand(shape, generator=generator)
    labels = torch.where(draw < number_fraction, number_token, any_token)
    return torch.where(draw > 1 - ignore_fraction, torch.full_like(labels, ignore_index), labels)


def tolerances(dtype: torch.dtype, gradient: bool = False):
    """(rtol, atol) of docs/math.md §6 for inputs of ``dtype``."""
    if dtype in (torch.float32, torch.float64):
        return 1e-5, 1e-6
    if not gradient:
        return 1e-4, 1e-6
    # one rounding to the gradient's dtype: relative near 1, but half the smallest subnormal
    # step at the bottom of its range (2^-25 for float16, 2^-134 for bfloat16)
    return 2e-2, half_subnormal(dtype)


def half_subnormal(dtype: torch.dtype) -> float:
    """Half the distance between 0 and the smallest positive subnormal of ``dtype``: the largest
    error of one correct rounding of a value at the bottom of its range."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2


@contextlib.contextmanager
def without_reweigh_constant(table) -> Iterator[None]:
    """Within it, the reference reweighs with c = 0 on ``table`` (docs/math.md §2.4): it scores
    ``m L`` instead of ``m L + c (1 - m)``. A test-only patch of ``table.reweigh_constant`` (where
    the reference takes c from), for the two terms of a reweighed gradient (§6)."""
    with mock.patch.object(table, "reweigh_constant", lambda loss, squash_factor=None: 0.0):
        yield


def _finite_max(tensor: torch.Tensor) -> float:
    values = tensor.detach().double().abs()
    values = values[torch.isfinite(values)]
    return values.max().item() if values.numel() else 0.0


def reweighed_scale(exact: torch.Tensor, without_constant: torch.Tensor) -> float:
    """The scale of docs/math.md §6 for a reweighed gradient from non-float64 logits:
    ``max(max|b|, max|∇(mL)|, max|c ∇m|)`` over the finite elements, from two float64 reference
    gradients of the same call: ``exact`` = ∇L' and ``without_constant`` = ∇(mL) (the call under
    :func:`without_reweigh_constant`); ``c ∇m = ∇(mL) - ∇L'``."""
    exact, without_constant = exact.detach().double(), without_constant.detach().double()
    return max(_finite_max(exact), _finite_max(without_constant), _finite_max(without_constant - exact))


def assert_spec_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                      gradient: bool = False, what: str = "", scale: Optional[float] = None) -> None:
    """``|a - b| <= rtol * max|b| + atol`` per tensor (docs/math.md §6); NaN never passes.

    ``scale`` replaces ``max|b|`` where §6 conditions the bound (a reweighed gradient from
    non-float64 logits: :func:`reweighed_scale`); it never goes below ``max|b|``."""
    rtol, atol = tolerances(dtype, gradient)
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    scale = max(scale or 0.0, expected.abs().max().item() if expected.numel() else 0.0)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = rtol * scale + atol
    assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e} (rtol {rtol}, scale {scale:.3e})"


def check_one_pass_under_cuda_graph(backend: str, dtype: torch.dtype) -> None:
    """Captures a training step's CE + NTL on the one-pass path (loss and gradient from one kernel,
    a 0.5 loss scale applied in place on the device) in a CUDA graph, replays it on new inputs
    copied into the captured tensors, and checks the replay against an eager step: bitwise equal
    loss and gradient (the kernels are deterministic). ``validate=False``: validation reads the
    labels on the host, which capture forbids."""
    device = torch.device("cuda")
    cpu_table = digit_table(vocab_size=300)
    table = cpu_table.to(device)
    generator = torch.Generator().manual_seed(0)

    def fresh_inputs():
        logits = (3 * torch.randn(6, 7, 300, generator=generator)).to(dtype).to(device)
        return logits, random_labels((6, 7), cpu_table, generator=generator).to(device)

    def step(logits, labels):
        out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend=backend, reweigh=True,
                                              shift_labels=True, validate=False)
        (0.5 * out.loss).backward()
        return out.loss.detach()

    static_logits, static_labels = fresh_inputs()
    static_logits.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) off the capturing stream
        for _ in range(3):
            static_logits.grad = None
            step(static_logits, static_labels)
    torch.cuda.current_stream().wait_stream(side)
    static_logits.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(static_logits, static_labels)
    for _ in range(2):
        logits, labels = fresh_inputs()
        with torch.no_grad():
            static_logits.copy_(logits)
        static_labels.copy_(labels)
        graph.replay()
        eager_logits = logits.clone().requires_grad_()
        eager_loss = step(eager_logits, labels)
        torch.cuda.synchronize()
        assert torch.isfinite(eager_loss) and eager_loss > 0
        assert torch.equal(static_loss, eager_loss), (static_loss, eager_loss)
        assert torch.equal(static_logits.grad, eager_logits.grad)
