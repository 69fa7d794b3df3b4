"""The CUDA kernels of csrc/cuda/ntl_kernels.cu, executed on the CPU through the emulation of
tests/cuda_emulation (README.md there), against the C++ CPU operators: every kernel on the CI case
set under AddressSanitizer + UBSan and under the race checker, every block barrier shown to be
needed, and the emulation's own checks shown to fire.

Needs g++ (skipped with the reason otherwise) and the compiled operators (the CPU reference).
"""

import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ntl_fast.cpp", reason="ntl_fast._C is not built (the CPU operators are the reference)")

from cuda_emulation import cases as emulation_cases  # noqa: E402
from cuda_emulation import harness  # noqa: E402

KINDS = ("memcheck", "racecheck")


@pytest.fixture(scope="module")
def ci_cases():
    return emulation_cases.ci_cases()


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    try:
        harness.build(request.param)
    except harness.BuildUnavailable as reason:
        pytest.skip(f"the CUDA emulation needs a C++ compiler: {reason}")
    return request.param


def _summary(failures):
    lines = [f"{name}: {problems[:3]}" for name, problems in list(failures.items())[:15]]
    return f"{len(failures)} failing cases:\n" + "\n".join(lines)


def test_rewrite_keeps_lines_and_rewrites_cuda_syntax():
    source = (
        "__global__ void k(int* p) {\n"
        "  __shared__ Pair<int, float> a[4], b;\n"
        "  extern __shared__ __align__(16) unsigned char smem[];\n"
        "}\n"
        "void go(int* p) { k<int, 2><<<dim3(4), 128, 64 * sizeof(int), s>>>(p); }\n"
    )
    out = harness.rewrite_cuda_source(source, "x.cu").splitlines()
    assert out[0] == '#line 1 "x.cu"'
    assert len(out) == 1 + len(source.splitlines())
    assert out[2] == "  static Pair<int, float> a[4], b; NTL_EMU_SHARED(a); NTL_EMU_SHARED(b);"
    assert out[3] == "  #define smem (reinterpret_cast<unsigned char*>(::ntl_emu::dynamic_shared_memory()))"
    assert out[5] == ("void go(int* p) { ::ntl_emu::launch(k<int, 2>, "
                      "::ntl_emu::configure(dim3(4), 128, 64 * sizeof(int), s))(p); }")


def test_kernels_match_cpu_operators(kind, ci_cases):
    start = time.perf_counter()
    failures = harness.check(ci_cases, kind)
    seconds = time.perf_counter() - start
    print(f"{kind}: {len(ci_cases)} cases in {seconds:.1f} s")
    assert len(ci_cases) >= 500
    assert not failures, _summary(failures)


ONE_PASS = emulation_cases.loss_and_grad_cases()


def test_loss_and_grad_matches_cpu_operator(kind):
    """The one-pass kernels (fresh gradient and in place) against ce_ntl_loss_and_grad on the CPU."""
    failures = harness.check(ONE_PASS, kind)
    assert len(ONE_PASS) >= 100
    assert not failures, _summary(failures)


def test_one_pass_cases_cover_the_edges():
    names = " ".join(case.name for case in ONE_PASS)
    for kernel in emulation_cases.ONE_PASS_KERNELS:
        assert f"-{kernel}-" in names
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        assert f"-{dtype}-" in names
    for special in ("neg_inf_mask", "pos_inf_row", "nan_row", "numbers_masked"):
        assert f"-{special}-" in names
    assert "misaligned" in names
    for kernel in emulation_cases.ONE_PASS_KERNELS:  # workspaces of 1 and 2 rows: several chunks
        for rows in (1, 2):
            assert any(f"-{kernel}-" in case.name and case.name.endswith(f"-chunks{rows}") for case in ONE_PASS)
    assert min(case.logits.shape[0] for case in ONE_PASS) == 1
    assert {case.logits.shape[1] for case in ONE_PASS} >= {2, 53, 517, 1023, 4099, 8203}
    assert {case.table.num_numbers for case in ONE_PASS} >= {1, 7, 10, 1110}
    labels = [(case.labels.long(), case.config.ignore_index) for case in ONE_PASS]
    assert any((lab == ignore).any() for lab, ignore in labels)  # ignored rows: no read, zeros
    both_zero = [(case.grad_ce == 0) & (case.grad_ntl == 0) for case in ONE_PASS]
    assert any(rows.any() for rows in both_zero)  # rows that count for nothing


LAUNCH_CASES = {launch: emulation_cases.one_pass_launch_cases(launch) for launch in emulation_cases.LAUNCHES}
STATIC_SHARED_RESERVE = 2048  # ntl_kernels.cu: kStaticSharedReserve


def _expected_plan(case, launch):
    """(staged, blocks) by the rule of csrc/cuda/ntl_kernels.h: staged when the row fits in the
    opt-in shared memory beside the fixes; otherwise as many blocks as keep the rows in flight (and
    their gradients unless in place) within half of L2, at most 3 per SM (1 for float64)."""
    settings = emulation_cases.LAUNCHES[launch]
    M, V = case.logits.shape
    size, acc = case.logits.element_size(), 8 if case.logits.dtype == torch.float64 else 4
    fixes = (case.table.num_numbers * acc + 15) // 16 * 16
    optin, l2, sms = settings.get("device_smem_optin", 227 * 1024), settings.get("device_l2", 50 << 20), \
        settings.get("device_sms", 132)
    staged = settings.get("row_in_smem", 1) != 0 and fixes + V * size + 16 + STATIC_SHARED_RESERVE <= optin
    in_flight = V * size * (1 if case.kernel.endswith("inplace") else 2)
    blocks = 0 if staged else max(1, min(l2 // 2 // in_flight, sms * (1 if size == 8 else 3)))
    return int(staged), settings.get("rows_in_flight", blocks)


def test_one_pass_launch_plans(kind):
    """Every launch plan of the one-pass kernels (rows staged in shared memory, opting in above
    48 KiB, or read twice from global memory; one block per row, one block looping over every row,
    an L2-bounded grid of fewer blocks than rows) matches the CPU operator, and all of them give the
    same bits: the plan changes where the row is read from and which block does it, never a value."""
    results = {launch: harness.run(cases, kind) for launch, cases in LAUNCH_CASES.items()}
    looping = {"staged": 0, "unstaged": 0}
    for launch, cases in LAUNCH_CASES.items():
        for case, result in zip(cases, results[launch]):
            problems = harness.compare(case, result)
            assert not problems and not result.reports, (case.name, problems, result.reports[:3])
            staged, blocks = result.outputs["plan"].tolist()
            assert (staged, blocks) == _expected_plan(case, launch), case.name
            if 0 < blocks < case.logits.shape[0]:
                looping["staged" if staged else "unstaged"] += 1
    assert min(looping.values()) >= 3, looping  # blocks that loop over several rows, both ways
    plans = {(launch, case.name.split("-")[1]): r.outputs["plan"][0].item()
             for launch, cases in LAUNCH_CASES.items() for case, r in zip(cases, results[launch])}
    assert plans[("optin-4k", "V517")] == 1 and plans[("optin-4k", "V1500")] == 0  # fits / does not fit
    assert plans[("planned", "V12300")] == 1  # 49 KB staged: opted in above 48 KiB
    unbounded = results["unstaged-unbounded"]
    for launch in LAUNCH_CASES:
        for case, a, b in zip(LAUNCH_CASES[launch], results[launch], unbounded):
            for name in ("ce", "ntl", "grad"):
                assert torch.equal(a.outputs[name].view(torch.uint8), b.outputs[name].view(torch.uint8)), \
                    (launch, case.name, name)


def test_launch_cases_cover_the_edges():
    cases = [case for launch_cases in LAUNCH_CASES.values() for case in launch_cases]
    assert min(case.logits.shape[0] for case in cases) == 1
    assert {2, 517, 4099, 8203, 12300} <= {case.logits.shape[1] for case in cases}
    assert max(case.table.num_numbers for case in cases) == 1110
    assert any((case.labels.long() == case.config.ignore_index).any() for case in cases)
    assert {case.kernel for case in cases} == set(emulation_cases.ONE_PASS_KERNELS)
    assert any(case.misaligned for case in cases) and any(case.workspace_rows for case in cases)


def test_wide_tables_match_cpu_operators(kind):
    """K = 4,096 number tokens, the most the kernels serve, through every entry point."""
    cases = emulation_cases.wide_table_cases()
    assert max(case.table.num_numbers for case in cases) == 4096
    failures = harness.check(cases, kind)
    assert not failures, _summary(failures)


def test_scale_gradient_matches_torch(kind):
    """grad *= grad_output in place, the scalar read by the kernel: every dtype, packs and tails,
    aligned or not; 1 leaves the buffer as it was."""
    cases = emulation_cases.scale_gradient_cases()
    failures = harness.check(cases, kind)
    assert not failures, _summary(failures)
    unit = [case for case in cases if float(case.grad_output) == 1.0]
    for case, result in zip(unit, harness.run(unit, kind)):
        got = result.outputs["grad"].reshape(-1).view(torch.uint8)
        assert torch.equal(got, case.logits.reshape(-1).view(torch.uint8)), case.name


def test_case_set_covers_the_kernel_edges(ci_cases):
    """The rotation reaches what the case set promises (README.md: Cases)."""
    names = " ".join(case.name for case in ci_cases)
    for kernel in ("forward", "backward", "backward_inplace"):
        assert f"-{kernel}-" in names
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        assert f"-{dtype}-" in names
    for variant in ("was-", "was+squash", "was+reweigh", "mse", "mae+reweigh", "huber", "was_cdf-",
                    "was_cdf+reweigh+gaussian", "was+gaussian", "ntl_only"):
        assert variant in names, variant
    for special in emulation_cases.SPECIALS:
        assert f"-{special}-" in names
    assert "misaligned" in names and "-int32" in names
    for kernel in ("backward", "backward_inplace"):  # workspaces of 1 and 2 rows: several chunks
        for rows in (1, 2):
            assert any(f"-{kernel}-" in case.name and case.name.endswith(f"-chunks{rows}") for case in ci_cases)
    sizes = {case.logits.shape[1] for case in ci_cases}
    assert {2, 131, 1023, 1024, 8191, 8203} <= sizes
    assert max(case.table.num_numbers for case in ci_cases) >= 1110
    assert min(case.logits.shape[0] for case in ci_cases) == 1
    labels = torch.cat([case.labels.long() for case in ci_cases])
    assert (labels == -100).any() and (labels < -100).any()
    assert any((case.labels.long() >= case.logits.shape[1]).any() for case in ci_cases)
    assert any(case.config.ignore_index >= 0 and (case.labels == case.config.ignore_index).any() for case in ci_cases)


def test_every_barrier_is_reached():
    try:
        result = harness.run(emulation_cases.barrier_cases(), "memcheck")[-1]
    except harness.BuildUnavailable as reason:
        pytest.skip(f"the CUDA emulation needs a C++ compiler: {reason}")
    assert harness.barrier_sites(), "no __syncthreads found in the kernel sources"
    assert set(harness.barrier_sites()) == set(result.barriers)


@pytest.mark.parametrize("site", harness.barrier_sites())
def test_each_barrier_is_needed(site):
    """Leaving any one block barrier out is caught (a race, a wrong result or a sanitizer)."""
    try:
        harness.build("racecheck")
    except harness.BuildUnavailable as reason:
        pytest.skip(f"the CUDA emulation needs a C++ compiler: {reason}")
    findings = harness.barrier_removal(site, emulation_cases.barrier_cases(), "racecheck")
    print(f"without {site}: {findings[:2]}")
    assert findings, f"removing the barrier at {site} went unnoticed"


# selftest.cu: kernel -> what the emulation must print for it, per build ("" = nothing at all).
FAULTS = {
    "warp_ops": {"memcheck": "", "racecheck": ""},
    "shared_race": {"racecheck": "race on __shared__ x"},
    "global_race": {"racecheck": "race on out byte 0: write after write"},
    "cross_block_race": {"racecheck": "of another block"},
    "divergent_barrier": {"memcheck": "divergent __syncthreads", "racecheck": "divergent __syncthreads"},
    "early_exit": {"memcheck": "exited while threads", "racecheck": "exited while threads"},
    "deadlock": {"memcheck": "deadlock in block", "racecheck": "deadlock in block"},
    "poisoned_read": {"memcheck": "", "racecheck": ""},
}


def _selftest(kind):
    try:
        return harness.build(kind, "selftest")
    except harness.BuildUnavailable as reason:
        pytest.skip(f"the CUDA emulation needs a C++ compiler: {reason}")


@pytest.mark.parametrize("fault,build", [(f, b) for f in sorted(FAULTS) for b in sorted(FAULTS[f])])
def test_emulation_reports_each_fault(fault, build):
    """Each fault the emulation promises to catch is reported, deterministically (races by the
    race checker's build only); a kernel without faults (every warp operation, counting barriers,
    atomics, dynamic shared memory) computes CUDA's results, and unwritten shared memory reads NaN."""
    kind = build
    done = subprocess.run([str(_selftest(kind)), fault], capture_output=True, text=True, timeout=120,
                          env={"ASAN_OPTIONS": "detect_leaks=0"})
    assert done.returncode == 0, done.stderr[-3000:]
    expected = FAULTS[fault][kind]
    if expected:
        assert expected in done.stdout, done.stdout
    else:
        assert done.stdout == "", done.stdout  # poisoned_read prints any thread that read a non-NaN


def test_address_sanitizer_sees_an_overrun_by_one():
    done = subprocess.run([str(_selftest("memcheck")), "overrun"], capture_output=True, text=True, timeout=120,
                          env={"ASAN_OPTIONS": "detect_leaks=0"})
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]


def _conversion_inputs():
    halves = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    bf16s = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = []
    for grid in (halves, bf16s):
        finite = grid[torch.isfinite(grid)].double().unique()
        middles = (finite[1:] + finite[:-1]) / 2  # the ties: round to even
        values += [grid, middles.float(), torch.nextafter(middles, torch.full_like(middles, 1e300)).float(),
                   torch.nextafter(middles, torch.full_like(middles, -1e300)).float()]
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2 ** -24, 2 ** -25, 3 * 2 ** -26,
                            1e-30, 3.4e38, float("inf"), -float("inf"), float("nan")])
    random = torch.randn(100000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 100000)
    return torch.cat(values + [special, random.float()])


def test_half_and_bfloat16_conversions_round_like_cuda():
    """float -> half / bfloat16 round to nearest even, as CUDA's __float2half / __float2bfloat16;
    half / bfloat16 -> float are exact: both checked against torch's conversions, all ties included."""
    values = _conversion_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        source.write_bytes(values.numpy().tobytes())
        done = subprocess.run([str(_selftest("memcheck")), "convert", str(source), str(target)], capture_output=True,
                              text=True, timeout=120, env={"ASAN_OPTIONS": "detect_leaks=0"})
        assert done.returncode == 0, done.stderr[-3000:]
        out = torch.frombuffer(bytearray(target.read_bytes()), dtype=torch.uint8)
    n = values.numel()
    got_half = out[:2 * n].view(torch.int16)
    got_bf16 = out[2 * n:4 * n].view(torch.int16)
    got_from_half, got_from_bf16 = out[4 * n:].view(torch.float32).split(65536)
    nan = torch.isnan(values)
    for got, dtype in ((got_half, torch.float16), (got_bf16, torch.bfloat16)):
        want = values.to(dtype)
        assert torch.isnan(got.view(dtype)).equal(nan)
        assert torch.equal(got[~nan], want.view(torch.int16)[~nan]), dtype
    for got, dtype in ((got_from_half, torch.float16), (got_from_bf16, torch.bfloat16)):
        want = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).float()
        assert torch.isnan(got).equal(torch.isnan(want))
        assert torch.equal(got[~torch.isnan(want)].view(torch.int32), want[~torch.isnan(want)].view(torch.int32))


CORRUPT = emulation_cases.corrupt_table_cases()


def test_corrupt_tables_are_refused_by_the_cpu_operators():
    for case in CORRUPT:
        with pytest.raises(RuntimeError):
            harness.reference(case)


def test_corrupt_tables_stay_deterministic_on_the_cuda_kernels(kind):
    """The CUDA kernels cannot check table contents without a host read: whatever they are given,
    they run without a race or an out-of-bounds access and give the same bits twice."""
    first, second = harness.run(CORRUPT, kind), harness.run(CORRUPT, kind)
    for case, a, b in zip(CORRUPT, first, second):
        assert a.error is None and not a.reports, (case.name, a.error, a.reports[:3])
        assert torch.isfinite(a.outputs["grad"]).all(), case.name
        assert torch.equal(a.outputs["grad"], b.outputs["grad"]), case.name
