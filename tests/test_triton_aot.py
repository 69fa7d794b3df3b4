"""The Triton kernels compiled ahead of time for sm_90 and sm_80, without a GPU.

``benchmarks/triton_aot.py`` records the specialisations the real wrappers launch and compiles
each with Triton's bundled ptxas; it fails on a compile error, a spill with K <= 16, or a larger
table's spill or registers more than 16 above K <= 16, and prints the drift from
``benchmarks/results/triton_aot_registers.csv``. It runs in its own process: this suite sets
TRITON_INTERPRET=1, which must be unset when the kernels are defined.
"""

import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout[-8000:], result.stderr[-4000:])
    return result


def test_ci_subset_compiles_without_spills():
    result = _run(["benchmarks/triton_aot.py"], timeout=1800)
    assert result.returncode == 0, "a Triton specialisation failed to compile or spills (output above)"
    assert "triton_aot: ok" in result.stdout
    # the committed table has this triton version's rows, so the drift report is a real comparison
    assert "has no rows for triton" not in result.stdout


def test_compile_errors_and_spills_are_caught():
    """The gate itself: a broken specialisation reports an error, a spilling K <= 16 row fails."""
    script = textwrap.dedent("""
        import json
        from benchmarks import triton_aot as aot

        plan = dict(dtypes=["fp32"], V=[32128], K=[10], squash=[False], archs=[90])
        records = aot.record_launches(plan, rows=64)
        assert {r["kernel"] for r in records} >= {"_ntl_forward_kernel", "_ce_ntl_backward_kernel"}, records
        data = json.loads(next(r["spec"] for r in records if r["kernel"] == "_ntl_forward_kernel"))
        names = list(data["signature"])
        # BLOCK_K = 12: tl.arange needs a power of two, so this specialisation cannot compile
        data["constant_vals"] = [12 if names[key[0]] == "BLOCK_K" else value
                                 for key, value in zip(data["constant_keys"], data["constant_vals"])]
        aot._init_worker()
        result = aot.compile_specialisation((90, json.dumps(data)))
        assert "error" in result, result
        row = dict(K="10", spill_stores="0", spill_loads="4")
        assert aot.spilling([row, dict(row, K="1110"), dict(row, spill_loads="0")]) == [row]
        small = dict(kernel="k", variant="was", dtype="fp32", V="32128", arch="90", K="10", regs="40",
                     spill_stores="0", spill_loads="0")
        fits, heavy, spills = dict(small, K="1110", regs="56"), dict(small, K="1110", regs="57"), \
            dict(small, K="1110", spill_loads="4")
        assert [r["regs"] for r in aot.over_budget([small, fits, heavy, spills])] == ["57", "40"]
        cdf = [dict(row, variant="was_cdf+reweigh") for row in (small, heavy)]
        assert [r["regs"] for r in aot.over_budget(cdf)] == ["57"]
        # every kernel is held to the margin (the CE + WAS_CDF backward too); a MARGIN_EXEMPT pair only
        # to no spill, its heavy rows still reported; an architecture outside BUDGET_ARCHS is reported
        backward = [dict(row, kernel="_ce_ntl_backward_kernel", variant="was_cdf") for row in (small, heavy, spills)]
        assert aot.MARGIN_EXEMPT == ()
        assert [r["regs"] for r in aot.over_budget(backward)] == ["57", "40"]
        aot.MARGIN_EXEMPT = (("_ce_ntl_backward_kernel", "was_cdf"),)
        assert [r["regs"] for r in aot.over_budget(backward)] == ["40"]
        assert len(aot.over_budget(backward, enforced_only=False)) == 2
        aot.MARGIN_EXEMPT = ()
        elsewhere = [dict(row, arch="70") for row in (small, heavy, spills)]
        assert aot.over_budget(elsewhere) == [] and len(aot.over_budget(elsewhere, enforced_only=False)) == 2
        print("gate ok:", result["error"].splitlines()[0][:200])
    """)
    result = _run(["-c", script], timeout=600)
    assert result.returncode == 0 and "gate ok:" in result.stdout
