"""benchmarks/static_report.py: its ptxas and SASS readers on known text, and the whole tool at
one small shape (compiling the relative-attention kernels for sm_90a, no GPU)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "static_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("static_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sr = _load()

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    488 bytes stack frame, 568 bytes spill stores, 532 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 488 bytes cumulative stack size, 2048 bytes smem
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    40 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90a'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_ptxas_log_gives_registers_spills_and_shared_memory_per_entry():
    res = sr.parse_ptxas(PTXAS_LOG)
    assert res["_Z3fooPf"] == dict(registers=255, spill_store_bytes=568, spill_load_bytes=532, spill_bytes=1100,
                                   stack_bytes=488, shared_bytes=2048)
    # the device function after an entry's summary does not overwrite the entry
    assert res["_Z3barPf"]["registers"] == 40 and res["_Z3barPf"]["spill_bytes"] == 0


def _sass(body):
    lines = ["\tcode for sm_90a", "\t\tFunction : k"]
    for addr, text in enumerate(body):
        lines.append(f"        /*{addr * 16:04x}*/                   {text} ;   /* 0x0 */")
    return "\n".join(lines)


def test_hot_loop_is_the_loop_with_most_instructions_of_its_own():
    # 0: prologue; 1-13: an outer loop holding a 2-instruction inner loop (3-4) and 9 more of its
    # own (one a NOP); 14-15: a small second loop; then EXIT and the trap branch to itself
    body = ["MOV R1, R2",
            "HGMMA.64x64x16.F32.BF16 R0, gdesc[UR4], R0", "FSETP.GT.AND P0, PT, R1, R2, PT",
            "FADD R1, R1, R2", "@P1 BRA {3}",
            "FSEL R1, R1, R2, P0", "ISETP.GE.AND P0, PT, R1, R2, PT", "NOP", "FMUL R1, R1, R2",
            "FADD R1, R1, R2", "FADD R1, R1, R2", "FADD R1, R1, R2", "FADD R1, R1, R2",
            "@!P0 BRA {1}",
            "IADD3 R1, R1, 1, RZ", "@P2 BRA {14}",
            "EXIT", "BRA {17}"]
    body = [line.format(*[f"0x{i * 16:x}" for i in range(len(body))]) for line in body]
    ins = sr.parse_sass(_sass(body))["k"]
    assert sr.find_loops(ins) == [(1, 13), (3, 4), (14, 15)]
    a = sr.analyse_sass(ins)
    assert a["loops"] == 3
    assert a["sass_instructions"] == 17  # the NOP is not counted
    assert a["hot_loop_instructions"] == 12  # the outer loop: 13 minus the NOP
    assert a["hot_loop_tensor_core_instructions"] == 1 and a["tensor_core_instructions"] == 1
    assert a["hot_loop_mix"]["compare_select"] == 3 and a["hot_loop_mix"]["fp_arith"] == 6
    # heavy loops (own size at least a quarter of the hot loop's own 10): the outer one only
    assert a["heavy_loop_instructions"] == 12 and a["once_instructions"] == 5
    assert a["heavy_loop_tensor_flops"] == 2 * 64 * 64 * 16 / 4  # one warp's share of a warpgroup MMA
    # per loop, its own instructions (nested loops left out) and the source line of its back edge
    line_of = {16 * i: f"k.py:{100 + i}" for i in range(len(body))}
    loops = sr.analyse_sass(ins, line_of)["loop_list"]
    assert [(loop["line"], loop["instructions"]) for loop in loops] == [("k.py:113", 10), ("k.py:104", 2), ("k.py:115", 2)]
    assert loops[0]["tensor_flops"] == 2 * 64 * 64 * 16 / 4 and loops[1]["tensor_flops"] == 0
    assert a["outside_loops_instructions"] == 17 - 14


def test_a_branch_to_an_address_outside_the_code_is_not_a_loop():
    """A backward branch whose target is no instruction of the function is skipped (it raised
    StopIteration once loops became natural loops)."""
    ins = sr.parse_sass(_sass(["MOV R1, R2", "BRA 0x8", "EXIT"]))["k"]
    assert sr.find_loops(ins) == []


def test_a_branch_back_from_a_cold_path_is_not_a_loop():
    """ptxas puts a diverged warp's collective reduction after the code (entered by ``BRA.DIV``)
    and branches from there back into the loop body: a backward branch whose target does not
    dominate it. Only the loop's own back edge is a loop; the cold path counts outside loops."""
    body = ["MOV R1, R2",
            "HMMA.16816.F32.BF16 R0, R2, R4, R0",  # 1: loop head
            "BRA.DIV UR5, {6}",
            "SHFL.BFLY PT, R3, R1, 0x1, 0x1f",  # 3: where the cold path comes back
            "@!P0 BRA {1}",
            "EXIT",
            "WARPSYNC.COLLECTIVE R4, {7}",  # 6: the cold path
            "SHFL.BFLY PT, R3, R1, 0x1, 0x1f",
            "BRA {3}",
            "BRA {9}"]
    body = [line.format(*[f"0x{i * 16:x}" for i in range(len(body))]) for line in body]
    ins = sr.parse_sass(_sass(body))["k"]
    assert ins[4][3] == "@!P0" and ins[2][3] == ""
    assert sr.find_loops(ins) == [(1, 4)]
    a = sr.analyse_sass(ins, by_tensor_work=True)
    assert a["loops"] == 1 and a["hot_loop_instructions"] == 4 and a["outside_loops_instructions"] == 10 - 4
    # the same branch back with the head on every path to it (a second back edge of the loop) is one
    body[2] = "NOP"
    body[5] = "@P1 BRA {6}"
    body[6] = "SHFL.BFLY PT, R3, R1, 0x1, 0x1f"
    body[8] = "BRA 0x10"
    assert sr.find_loops(sr.parse_sass(_sass(body))["k"]) == [(1, 8), (1, 4)]


NVDISASM = """\
_k:
	//## File "/src/fastpe/kernels/triton/rmha.py", line 338
        /*0000*/                   LDC R1, c[0x0][0x28] ;
	//## File "/src/fastpe/kernels/triton/rmha.py", line 407
        /*0010*/                   IMAD.U32 R2, RZ, RZ, UR7 ;
        /*0020*/              @!P2 BRA `(.L_x_2) ;
.L_x_0:
	//## File "/src/fastpe/kernels/triton/_launch.py", line 12
        /*0030*/                   EXIT ;
"""


def test_line_info_maps_each_address_to_file_and_line():
    assert sr.parse_line_info(NVDISASM) == {0x0: "rmha.py:338", 0x10: "rmha.py:407", 0x20: "rmha.py:407",
                                            0x30: "_launch.py:12"}


def _record(trips, lines=("k.py:5", "k.py:9")):
    from fastpe.kernels.triton._launch import Launch

    def kernel():
        pass

    launch = Launch(kernel, (10, 2), {}, {"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)
    analysis = dict(registers=128, shared_bytes=0, spill_bytes=0, spill_store_bytes=0, spill_load_bytes=0,
                    stack_bytes=0, sass_instructions=160, tensor_core_instructions=0, spill_instructions=0, loops=2,
                    hot_loop_instructions=100, hot_loop_tensor_core_instructions=0, hot_loop_mix={},
                    heavy_loop_instructions=150, heavy_loop_tensor_flops=0.0, once_instructions=10,
                    once_tensor_flops=0.0, outside_loops_instructions=10, outside_loops_tensor_flops=0.0,
                    global_atomic_instructions=3, outside_loops_global_atomics=1,
                    loop_list=[dict(line=lines[0], instructions=100, tensor_flops=0.0, global_atomics=2),
                               dict(line=lines[1], instructions=50, tensor_flops=0.0, global_atomics=0)])
    return sr.launch_record("rmha", "X", (5, 2, 32, 16), sr.torch.bfloat16, False, "fwd", 0, launch, analysis, trips)


def test_traced_trips_weight_each_loop_and_a_missing_line_falls_back_to_the_heuristic():
    rec = _record({"k.py:5": 40, "k.py:9": 7})
    # 4 warps x (20 CTAs x 10 outside + 100 x 40 + 50 x 7)
    assert rec["model"]["trips"] == "traced" and rec["model"]["warp_instructions"] == 4 * (200 + 4000 + 350)
    assert rec["kernel_instructions_per_score_element"] == round(32 * 4 * 4550 / (5 * 2 * 32 * 32), 1)
    rec = _record({"k.py:5": 40})
    # heuristic: 4 warps x (tiles x heavy + CTAs x once), tiles = 5 x 2 x 2 x 2
    assert rec["model"]["trips"] == "heuristic" and rec["model"]["warp_instructions"] == 4 * (40 * 150 + 20 * 10)
    assert rec["kernel_instructions_per_score_element"] is None


def test_global_atomics_are_counted_per_loop_and_reported_outside_the_time_model():
    # an outer loop (1-6) with a reduction of its own around an inner loop (2-4) of two reductions
    # and an atomic exchange; a shared-memory atomic and a warp's register reduction do not count
    body = ["REDG.E.ADD.STRONG.GPU desc[UR4][R2.64], R5",
            "ATOMS.ADD R1, [R2], R3", "REDG.E.ADD.64.STRONG.GPU desc[UR4][R2.64], R4",
            "RED.E.ADD.STRONG.GPU [R2.64], R5", "@P1 BRA {2}",
            "ATOMG.E.EXCH.STRONG.GPU PT, R1, desc[UR4][R2.64], R3", "@!P0 BRA {1}", "REDUX.MAX.S32 UR4, R1", "EXIT",
            "BRA {9}"]
    body = [line.format(*[f"0x{i * 16:x}" for i in range(len(body))]) for line in body]
    a = sr.analyse_sass(sr.parse_sass(_sass(body))["k"], {16 * i: f"k.py:{i}" for i in range(len(body))})
    assert a["global_atomic_instructions"] == 4 and a["hot_loop_mix"]["memory"] == 4
    assert [(loop["line"], loop["global_atomics"]) for loop in a["loop_list"]] == [("k.py:6", 1), ("k.py:4", 2)]
    assert a["outside_loops_global_atomics"] == 1
    # traced: 4 warps x (20 CTAs x 1 outside + 2 x 40 trips of the first loop + 0 x 7)
    rec = _record({"k.py:5": 40, "k.py:9": 7})
    assert rec["model"]["global_atomic_instructions"] == 4 * (20 + 80)
    assert _record({"k.py:5": 40})["model"]["global_atomic_instructions"] is None  # untraced: not counted
    report = {"machine": sr.MACHINE, "summary": [], "records": [rec]}
    rate = 32 * 400 / (rec["model"]["time_us"] * 1e-6) / 1e9
    row = sr.atomics_table(report)[2]
    assert row.startswith("| rmha | X | no | fwd | kernel | 400 | 0.01 |") and row.endswith(f"| {rate:.0f} |")
    assert "## Global atomics (not in the time model)" in sr.markdown(report, "cmd")
    rec["model"]["global_atomic_instructions"] = 0
    assert sr.atomics_table(report) == [] and "Global atomics" not in sr.markdown(report, "cmd")


def test_copies_of_an_inlined_loop_share_its_traced_trips():
    """A helper's loop inlined at two call sites: two SASS loops on one source line, whose traced
    count (40) covers both sites, so each copy runs 20 times, not 40."""
    rec = _record({"k.py:5": 40}, lines=("k.py:5", "k.py:5"))
    assert rec["model"]["trips"] == "traced"
    assert rec["model"]["warp_instructions"] == 4 * (20 * 10 + 100 * 20 + 50 * 20)
    assert [loop["trips"] for loop in rec["loop_trips"]] == [20, 20]


def test_issue_time_is_the_busiest_sms():
    """20 CTAs leave 112 of the 132 SMs idle: the issue term is that of one SM's CTA, not an
    even share of the launch; 264 CTAs (two per SM) divide evenly."""
    rec = _record({"k.py:5": 40, "k.py:9": 7})
    per_sm = rec["model"]["warp_instructions"] / 20  # one CTA on the busiest SM
    assert rec["model"]["busiest_sm_factor"] == round(132 / 20, 3)
    per_sm_rate = sr.MACHINE["issue_per_s"] / sr.MACHINE["sms"]
    assert rec["model"]["t_issue_us"] == pytest.approx(per_sm / per_sm_rate * 1e6)
    assert sr.busiest_sm_factor(264) == 1.0 and sr.busiest_sm_factor(150) == pytest.approx(2 * 132 / 150)
    ideal = sr.model_time(0, 1e6, 0)
    assert ideal["busiest_sm_factor"] == 1.0 and ideal["t_issue_us"] == pytest.approx(1e6 / sr.MACHINE["issue_per_s"] * 1e6)


def _nested_loops(inner, outer_own):
    """SASS of an outer loop with ``outer_own`` FADDs of its own around an inner loop of an MMA and
    ``inner - 2`` FADDs (plus its branch), then EXIT."""
    body = (["MOV R1, R2", "HGMMA.64x64x16.F32.BF16 R0, gdesc[UR4], R0"] + ["FADD R1, R1, R2"] * (inner - 2)
            + ["@P1 BRA {1}"] + ["FADD R1, R1, R2"] * outer_own + ["@!P0 BRA {1}", "EXIT", "BRA {%d}" % (inner + outer_own + 3)])
    body = [line.format(*[f"0x{i * 16:x}" for i in range(len(body))]) for line in body]
    return sr.parse_sass(_sass(body))["k"]


def test_triton_hot_loop_is_the_loop_with_the_tensor_core_work():
    # an outer loop with a longer epilogue of its own (5 + its branch) around an inner loop with
    # the MMA (3): the inner one is the loop over score tiles
    ins = _nested_loops(inner=3, outer_own=5)
    assert sr.find_loops(ins) == [(1, 9), (1, 3)]
    a = sr.analyse_sass(ins, by_tensor_work=True)
    assert a["hot_loop_instructions"] == 3 and a["hot_loop_tensor_core_instructions"] == 1
    assert sr.analyse_sass(ins)["hot_loop_instructions"] == 9  # the CUDA rule: the most of its own
    # an inner MMA loop under a quarter of the outer loop's own size is not: the outer one is
    a = sr.analyse_sass(_nested_loops(inner=3, outer_own=12), by_tensor_work=True)
    assert a["hot_loop_instructions"] == 16 and a["hot_loop_tensor_core_instructions"] == 1


def test_kernel_without_loops_has_an_empty_hot_loop():
    a = sr.analyse_sass(sr.parse_sass(_sass(["HMMA.16816.F32.BF16 R0, R2, R4, R0", "EXIT", "BRA 0x20"]))["k"])
    assert a["loops"] == 0 and a["hot_loop_instructions"] == 0
    assert a["once_tensor_flops"] == 2 * 16 * 8 * 16


def test_occupancy_follows_registers_shared_memory_and_warps():
    assert sr.occupancy(255, 0, 8) == 1  # 255 registers: 8 warps per SM
    assert sr.occupancy(128, 0, 4) == 4
    assert sr.occupancy(32, 0, 4) == 16  # 64 warps
    assert sr.occupancy(32, 100 * 1024, 4) == 2  # 228 KiB of shared memory per SM


@pytest.mark.parametrize("args", [["--ops", "nope"], ["--shapes", "S9"], ["--jobs", "0"],
                                  ["--compare", "missing.json"], ["--compare", "README.md"]])
def test_bad_arguments_are_one_line_errors_with_status_2(args, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so that the argument itself is what fails
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        sr.main(["--out", str(tmp_path / "out"), "--no-cuda", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("static_report.py: error:")
    assert not (tmp_path / "out").exists()  # caught before any work


def test_report_at_a_small_shape(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, not interpreted
    cmd = [sys.executable, str(TOOL), "--out", str(tmp_path), "--ops", "rmha", "--shapes", "B4h1L20dh16",
           "--dropout", "off", "--no-cuda", "--jobs", "1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "static_sm90.json").read_text())
    records = report["records"]
    kernels = {r["kernel"] for r in records}
    assert {"_rmha_fwd_kernel", "_rmha_bwd_kernel"} <= kernels
    for r in records:
        for field in ("op", "kernel", "shape", "dtype", "dropout", "direction", "grid", "num_warps", "num_stages",
                      "registers", "spill_bytes", "shared_bytes", "ctas_per_sm", "waves", "tensor_core_instructions",
                      "hot_loop_instructions", "hot_loop_score_elements"):
            assert field in r, field
        assert 0 < r["registers"] <= 255 and r["ctas_per_sm"] >= 1 and r["sass_instructions"] > 0
        assert r["model"]["time_us"] > 0 and r["model"]["bound"] in ("memory", "issue", "tensor")
        if r["kernel"] in ("_rmha_fwd_kernel", "_rmha_bwd_kernel"):
            c = r["constexprs"]
            assert r["hot_loop_score_elements"] == c["BLOCK_M"] * c["BLOCK_N"] / (32 * r["num_warps"])
            assert r["tensor_core_instructions"] > 0 and r["hot_loop_instructions"] > 0
            assert r["hot_loop_instructions_per_score_element"] > 0
        else:
            assert r["hot_loop_score_elements"] is None
    # every loop's trips were counted under the interpreter: the forward (one key block) runs its
    # one loop once per program (4 sequences x 2 query blocks of 16 rows)
    assert all(r["model"]["trips"] == "traced" for r in records)
    fwd = next(r for r in records if r["kernel"] == "_rmha_fwd_kernel")
    assert fwd["constexprs"]["ONE_KEY_BLOCK"] and fwd["grid"] == [4, 2]
    assert [loop["trips"] for loop in fwd["loop_trips"]] == [8]
    assert fwd["kernel_instructions_per_score_element"] > 0
    directions = {(s["op"], s["direction"]) for s in report["summary"]}
    assert directions == {("rmha", "fwd"), ("rmha", "bwd")}
    assert all(s["baseline"]["name"] == "SDPA" and s["ratio"] > 0 for s in report["summary"])
    md = (tmp_path / "static_sm90.md").read_text()
    assert "_rmha_bwd_kernel" in md and "| rmha | B4h1L20dh16 |" in md


def test_comparison_pairs_rows_of_two_reports():
    def report(spill, per_elem, time_us):
        key = dict(op="rmha", shape="S2", dropout=False, direction="fwd")
        score = dict(key, kernel="_rmha_fwd_kernel", registers=255, spill_bytes=spill, waves=1.5,
                     hot_loop_score_elements=32.0, hot_loop_instructions_per_score_element=per_elem)
        other = dict(key, kernel="_reduce", hot_loop_score_elements=None)
        only_before = dict(key, shape="S9")
        return {"records": [score, other], "summary": [dict(key, time_us=time_us, launches=1), dict(only_before, time_us=1.0, launches=1)]}

    before, after = report(448, 107.3, 118.9), report(0, 20.0, 30.0)
    after["summary"].pop()  # a shape only the old report has is left out
    rows = sr.comparison_table(before, after)
    assert len(rows) == 3
    assert rows[2].startswith("| rmha | S2 | no | fwd | 118.9 -> 30.0 | 1 -> 1 | _rmha_fwd_kernel |")
    assert "448 -> 0" in rows[2] and "107.3 -> 20.0" in rows[2]


def test_targets_table_names_what_each_score_kernel_misses():
    def record(direction, spill, per_elem, waves, ctas):
        return dict(op="rmha", shape="S2", dropout=direction == "bwd", direction=direction, spill_bytes=spill,
                    hot_loop_score_elements=16.0, hot_loop_instructions_per_score_element=per_elem, waves=waves,
                    model=dict(busiest_sm_factor=sr.busiest_sm_factor(ctas)))

    other = dict(op="tisas", hot_loop_score_elements=32.0)
    report = {"records": [record("fwd", 0, 24.0, 5.17, 2048), record("fwd", 8, 25.1, 1.0, 132),
                          record("bwd", 513, 60.0, 1.5, 198), record("bwd", 512, 59.0, 0.97, 128), other]}
    rows = sr.targets_table(report)
    assert len(rows) == 6  # header, rule, the four relative-attention kernels
    assert rows[2] == "| S2 | no | fwd | 0 (0) | 24.0 (25) | - (5.17) | none |"  # 5 waves: no tail target
    assert rows[3].endswith("| 0% (1.00) | spills, instr/elem |")
    assert rows[4].endswith("| 25% (1.50) | spills, tail |")  # 198 CTAs: the busiest SM runs 2, the average 1.5
    assert rows[5].endswith("| 3% (0.97) | none |")


@pytest.mark.parametrize("programs", [4, 5])
def test_persistent_programs_with_unequal_tiles_are_counted_exactly(programs):
    """A persistent launch whose first programs take one tile more than the others: the traced
    count of its tile loop is the number of tiles, not the first program's count times the grid."""
    pytest.importorskip("triton")
    import torch

    from fastpe.kernels.triton import _launch

    name, dims = sr.parse_shape("B3h1L20dh16")
    with _launch.override("tisas_fwd", programs=programs, block_m=16, block_n=32):
        launches, _baseline = sr.plan_op("tisas", dims, torch.float16, False)
    fwd = launches["fwd"][0]
    assert fwd.grid == (programs,) and fwd.constexprs["BLOCK_M"] == 16
    tiles = 3 * 1 * 2  # sequences x heads x query blocks of 16 rows
    source = (ROOT / "fastpe" / "kernels" / "triton" / "interval.py").read_text().splitlines()
    line = 1 + next(i for i, text in enumerate(source) if "for tile in range(pid, N_TILES, nprog):" in text)
    (trips,) = sr.traced_trips([fwd])
    assert trips[f"interval.py:{line}"] == tiles, trips
