"""The codegen report's SASS reader, device model, budgets and row arithmetic, on small SASS texts.

The hand-written texts are tiny programs whose counts are worked out in the comments; the two excerpts are
real: nvdisasm and cuobjdump output of the repository's kernels (as they were before issue 10's rewrite)
compiled for sm_90 with Triton 3.9 and nvcc 13.0.
No compiler runs here (tests/test_codegen_budgets.py compiles the kernels).
"""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.codegen import budgets, devices, report, sass  # noqa: E402
from bench.codegen.cases import all_cases, quick_cases, select_cases  # noqa: E402
from bench.codegen.model import CodegenCase, KernelBuild, RoleCode  # noqa: E402

# Nested loops, nvdisasm style. Outer loop (header .L_x_0) runs OUTER times, the inner (.L_x_1) INNER times
# per outer iteration; the self-branch and NOP after EXIT are padding.
NESTED_NVDISASM = """
        .text.nested:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_0:
        /*0020*/                   MOV R3, RZ ;
.L_x_1:
        /*0030*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0040*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
        /*0050*/                   FADD R4, R4, R12 ;
        /*0060*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0070*/                   ISETP.NE.AND P0, PT, R3, 0x8, PT ;
        /*0080*/               @P0 BRA `(.L_x_1) ;
        /*0090*/                   STG.E.U16 desc[UR4][R8.64], R4 ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00b0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00c0*/                   ISETP.NE.AND P1, PT, R2, 0x4, PT ;
        /*00d0*/               @P1 BRA `(.L_x_0) ;
        /*00e0*/                   EXIT ;
.L_x_2:
        /*00f0*/                   BRA `(.L_x_2);
        /*0100*/                   NOP;
"""

# The same program as cuobjdump prints it: hex targets, encodings after each instruction.
NESTED_CUOBJDUMP = """
		Function : nested
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a00ff017b82 */
                                                                   /* 0x000ff00000000800 */
        /*0010*/                   MOV R2, RZ ;                    /* 0x000000ff00027202 */
        /*0020*/                   MOV R3, RZ ;                    /* 0x000000ff00037202 */
        /*0030*/                   LDG.E.128 R4, desc[UR4][R8.64] ;   /* 0x0000000408047981 */
        /*0040*/                   LDG.E.128 R12, desc[UR4][R10.64] ; /* 0x00000004080c7981 */
        /*0050*/                   FADD R4, R4, R12 ;              /* 0x0000000c04047221 */
        /*0060*/                   IADD3 R3, R3, 0x1, RZ ;         /* 0x0000000103037810 */
        /*0070*/                   ISETP.NE.AND P0, PT, R3, 0x8, PT ; /* 0x000000080300780c */
        /*0080*/               @P0 BRA 0x30 ;                      /* 0xfffffffc00e80947 */
        /*0090*/                   STG.E.U16 desc[UR4][R8.64], R4 ; /* 0x0000000408007986 */
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;   /* 0x0000000000007b1d */
        /*00b0*/                   IADD3 R2, R2, 0x1, RZ ;         /* 0x0000000102027810 */
        /*00c0*/                   ISETP.NE.AND P1, PT, R2, 0x4, PT ; /* 0x000000040200780c */
        /*00d0*/               @P1 BRA 0x20 ;                      /* 0xfffffffc00d01947 */
        /*00e0*/                   EXIT ;                          /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                       /* 0xfffffffc00fc7947 */
        /*0100*/                   NOP;                            /* 0x0000000000007918 */
"""

# Real: a Triton 3.9 sm_90 excerpt (nvdisasm): the Payne-Hanek argument reduction loop of sin/cos,
# the slow path for |angle| > 105615, which the kernel's reduced angles never take.
TRITON_SINCOS_LOOP = """
/*2500*/                   SHF.L.U32 R0, R41, 0x8, RZ ;
/*2510*/                   HFMA2.MMA R10, -RZ, RZ, 0, 0 ;
/*2520*/                   MOV R39, RZ ;
/*2530*/                   HFMA2.MMA R40, -RZ, RZ, 0, 0 ;
/*2540*/                   MOV R42, RZ ;
/*2550*/                   ULDC.64 UR4, c[0x4][0x8] ;
/*2560*/                   LOP3.LUT R0, R0, 0x80000000, RZ, 0xfc, !PT ;
.L_x_2:
/*2570*/                   IADD3 R12, P2, R40, UR4, RZ ;
/*2580*/                   IADD3.X R13, R42, UR5, RZ, P2, !PT ;
/*2590*/                   IADD3 R40, P2, R40, 0x4, RZ ;
/*25a0*/                   LDG.E.CONSTANT R13, desc[UR6][R12.64] ;
/*25b0*/                   IADD3.X R42, RZ, R42, RZ, P2, !PT ;
/*25c0*/                   ISETP.EQ.AND P2, PT, R39, RZ, PT ;
/*25d0*/                   MOV R11, RZ ;
/*25e0*/                   IMAD.WIDE.U32 R10, R0, R13, R10 ;
/*25f0*/               @P2 MOV R75, R10 ;
/*2600*/                   ISETP.EQ.AND P2, PT, R39, 0x4, PT ;
/*2610*/               @P2 MOV R74, R10 ;
/*2620*/                   ISETP.EQ.AND P2, PT, R39, 0x8, PT ;
/*2630*/               @P2 MOV R73, R10 ;
/*2640*/                   ISETP.EQ.AND P2, PT, R39, 0xc, PT ;
/*2650*/               @P2 MOV R72, R10 ;
/*2660*/                   ISETP.EQ.AND P2, PT, R39, 0x10, PT ;
/*2670*/               @P2 MOV R144, R10 ;
/*2680*/                   ISETP.EQ.AND P2, PT, R39, 0x14, PT ;
/*2690*/               @P2 MOV R142, R10 ;
/*26a0*/                   ISETP.NE.U32.AND P2, PT, R40, 0x18, PT ;
/*26b0*/                   ISETP.NE.U32.AND.EX P2, PT, R42, RZ, PT, P2 ;
/*26c0*/                   MOV R10, R11 ;
/*26d0*/                   IADD3 R39, R39, 0x4, RZ ;
/*26e0*/               @P2 BRA `(.L_x_2) ;
/*26f0*/                   SHF.R.U32.HI R13, RZ, 0x17, R41 ;
"""

# Real: the CUDA kernel's lane_group_sum shuffle loop (cuobjdump, nvcc 13.0, sm_90), with the BRA.DIV to
# its divergence fallback (which lies outside the excerpt).
CUDA_SHUFFLE_LOOP = """
/*12fe0*/                   BSSY B0, 0x13090 ;                                                /* 0x000000a000007945 */
                                                                                              /* 0x000fe20003800000 */
/*12ff0*/                   IMAD.U32 R8, RZ, RZ, UR5 ;                                        /* 0x00000005ff087e24 */
                                                                                              /* 0x000fce000f8e00ff */
/*13000*/                   UMOV UR5, 0xffffffff ;                                            /* 0xffffffff00057882 */
                                                                                              /* 0x000fe20000000000 */
/*13010*/                   SHF.R.S32.HI R3, RZ, 0x1, R8 ;                                    /* 0x00000001ff037819 */
                                                                                              /* 0x000fe40000011408 */
/*13020*/                   BRA.DIV UR5, 0x41730 ;                                            /* 0x000002e605c07947 */
                                                                                              /* 0x000fea000b800000 */
/*13030*/                   SHFL.BFLY PT, R0, R24, R3, 0x1f ;                                 /* 0x0c001f0318007589 */
                                                                                              /* 0x00006400000e0000 */
/*13040*/                   ISETP.GT.AND P2, PT, R8, 0x3, PT ;                                /* 0x000000030800780c */
                                                                                              /* 0x000fe20003f44270 */
/*13050*/                   FADD R24, R0, R24 ;                                               /* 0x0000001800187221 */
                                                                                              /* 0x003fe20000000000 */
/*13060*/                   MOV R8, R3 ;                                                      /* 0x0000000300087202 */
                                                                                              /* 0x000fd60000000f00 */
/*13070*/               @P2 BRA 0x13000 ;                                                     /* 0xfffffffc00e02947 */
                                                                                              /* 0x000fea000383ffff */
/*13080*/                   BSYNC B0 ;                                                        /* 0x0000000000007941 */
                                                                                              /* 0x000fea0003800000 */
"""


def _counts(text, trips):
    instrs = sass.parse(text)
    return (sass.weighted_instruction_count(instrs, trips), sass.barrier_count(instrs, trips),
            sass.global_accesses(instrs, trips), sass.loads_before_first_use(instrs, trips))


@pytest.mark.parametrize("text", [NESTED_NVDISASM, NESTED_CUOBJDUMP], ids=["nvdisasm", "cuobjdump"])
def test_nested_loops_are_weighted_by_the_product_of_trips(text):
    instrs = sass.parse(text)
    loops = sass.find_loops(instrs)
    assert [(loop.start, loop.end) for loop in loops] == [(0x20, 0xd0), (0x30, 0x80)]
    outer, inner = 4, 8
    count, barriers, accesses, inflight = _counts(text, [outer, inner])
    # 2 prologue + EXIT, 6 outer-only instructions (0x20, 0x90-0xd0), 6 inner ones; padding not executed.
    assert count == 3 + 6 * outer + 6 * outer * inner
    assert barriers == outer
    assert sorted((a.kind, a.bits, a.weight) for a in accesses) == [
        ("load", 128, 32.0), ("load", 128, 32.0), ("store", 16, 4.0)]
    # Both 16-byte loads are issued before the FADD reads R4: 32 bytes in flight per thread.
    assert inflight.max_bytes == 32 and inflight.mean_bytes == 32


def test_both_formats_parse_to_the_same_instructions():
    a = sass.parse(NESTED_NVDISASM)
    b = sass.parse(NESTED_CUOBJDUMP)
    assert [(i.addr, i.opcode, i.predicate, i.target) for i in a] == [
        (i.addr, i.opcode, i.predicate, i.target) for i in b]
    branch = next(i for i in a if i.addr == 0x80)
    assert (branch.base, branch.predicate, branch.target, branch.modifiers) == ("BRA", "P0", 0x30, ())
    assert a[3].operands == ("R4", "desc[UR4][R8.64]")


def test_zero_trips_remove_a_path_and_wrong_trip_lists_raise():
    instrs = sass.parse(NESTED_NVDISASM)
    assert sass.weighted_instruction_count(instrs, [0, 8]) == 3
    with pytest.raises(ValueError, match="2 loops"):
        sass.weighted_instruction_count(instrs, [4])
    with pytest.raises(ValueError, match=">= 0"):
        sass.weighted_instruction_count(instrs, [4, -1])
    with pytest.raises(TypeError, match="loop_trips"):
        sass.weighted_instruction_count(instrs, [4, "8"])


def test_predicates_and_uniform_predicates():
    text = """
        /*0000*/              @!P2 IADD3 R1, R1, 0x1, RZ ;
        /*0010*/               @UP0 MOV R2, RZ ;
        /*0020*/              @!UP1 LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0030*/               @PT STG.E desc[UR4][R2.64], R4 ;
        /*0040*/                   EXIT ;
    """
    instrs = sass.parse(text)
    assert [i.predicate for i in instrs] == ["!P2", "UP0", "!UP1", "PT", ""]
    assert [i.unconditional for i in instrs] == [False, False, False, True, True]
    accesses = sass.global_accesses(instrs, [])
    assert [(a.kind, a.bits) for a in accesses] == [("load", 64), ("store", 32)]


def test_a_branch_with_a_condition_operand_falls_through():
    # nvcc writes "BRA !P5, target" (and "@!P4 BRA !P5, target"): the code after it runs when !P5 is false.
    text = """
        /*0000*/                   BRA !P5, `(.L_x_1) ;
        /*0010*/                   FADD R1, R1, R0 ;
.L_x_1:
        /*0020*/                   EXIT ;
    """
    instrs = sass.parse(text)
    assert not instrs[0].unconditional
    assert [i.addr for i in sass.executed(instrs)] == [0x0, 0x10, 0x20]


def test_divergence_fallback_is_not_executed_code_nor_a_loop():
    # The BRA.DIV fallback after EXIT jumps back into the main path: not a loop, not executed.
    text = """
        /*0000*/                   BRA.DIV UR4, `(.L_x_9) ;
        /*0010*/                   SHFL.BFLY PT, R0, R1, 0x1, 0x1f ;
.L_x_8:
        /*0020*/                   FADD R1, R1, R0 ;
        /*0030*/                   EXIT ;
.L_x_9:
        /*0040*/                   WARPSYNC.ALL ;
        /*0050*/                   SHFL.BFLY PT, R0, R1, 0x1, 0x1f ;
        /*0060*/                   BRA `(.L_x_8) ;
    """
    instrs = sass.parse(text)
    assert [i.addr for i in sass.executed(instrs)] == [0x0, 0x10, 0x20, 0x30]
    assert sass.find_loops(instrs) == []


def test_cold_code_jumping_back_is_executed_but_not_a_loop():
    text = """
        /*0000*/               @P0 BRA `(.L_cold) ;
.L_join:
        /*0010*/                   FADD R1, R1, R0 ;
        /*0020*/                   EXIT ;
.L_cold:
        /*0030*/                   MUFU.RCP R0, R1 ;
        /*0040*/                   BRA `(.L_join) ;
    """
    instrs = sass.parse(text)
    assert len(sass.executed(instrs)) == 5
    assert sass.find_loops(instrs) == []
    assert sass.weighted_instruction_count(instrs, []) == 5


def test_a_loop_with_a_predicated_exit_and_a_call_to_a_subroutine():
    text = """
.L_top:
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0010*/               @P0 EXIT ;
        /*0020*/                   CALL.REL.NOINC `($helper) ;
        /*0030*/               @P1 BRA `(.L_top) ;
        /*0040*/                   EXIT ;
$helper:
        /*0050*/                   MOV R2, R1 ;
        /*0060*/                   RET.REL.NODEC R20 `(nothing) ;
    """
    instrs = sass.parse(text.replace("`(nothing)", "0x0"))
    loops = sass.find_loops(instrs)
    assert [(loop.start, loop.end) for loop in loops] == [(0x0, 0x30)]
    # The subroutine is reachable (counted once, where it sits), not part of the loop body.
    assert sass.weighted_instruction_count(instrs, [10]) == 4 * 10 + 1 + 2


def test_real_triton_sincos_slow_path_loop():
    instrs = sass.parse(TRITON_SINCOS_LOOP)
    loops = sass.find_loops(instrs)
    assert [(loop.start, loop.end) for loop in loops] == [(0x2570, 0x26e0)]
    accesses = sass.global_accesses(instrs, [6])
    assert [(a.instr.opcode, a.bits, a.weight) for a in accesses] == [("LDG.E.CONSTANT", 32, 6.0)]
    assert sass.weighted_instruction_count(instrs, [0]) == len(instrs) - 24


def test_real_cuda_shuffle_loop_with_divergence_branch():
    instrs = sass.parse(CUDA_SHUFFLE_LOOP)
    assert len(instrs) == 11 and instrs[4].opcode == "BRA.DIV"
    loops = sass.find_loops(instrs)
    assert [(loop.start, loop.end) for loop in loops] == [(0x13000, 0x13070)]
    # 3 instructions around the loop, 8 in it: a 16-lane row sum takes log2(16) = 4 trips.
    assert sass.weighted_instruction_count(instrs, [4]) == 3 + 8 * 4


def test_parse_rejects_bad_text():
    with pytest.raises(ValueError, match="no SASS"):
        sass.parse("nothing here")
    with pytest.raises(ValueError, match="several functions"):
        sass.parse(NESTED_NVDISASM + NESTED_NVDISASM)
    with pytest.raises(ValueError, match="undefined label"):
        sass.parse("/*0000*/  BRA `(.L_x_99) ;")
    with pytest.raises(TypeError):
        sass.parse(None)


def test_split_functions_both_header_styles():
    dump = NESTED_CUOBJDUMP + NESTED_CUOBJDUMP.replace("Function : nested", "Function : other")
    assert list(sass.split_functions(dump)) == ["nested", "other"]
    nv = sass.split_functions(NESTED_NVDISASM)
    assert list(nv) == ["nested"] and len(sass.parse(nv["nested"])) == 17


def test_load_groups_close_at_first_use_and_at_block_ends():
    text = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*0030*/                   FADD R20, R7, R7 ;
        /*0040*/                   LDG.E.U16 R16, desc[UR4][R2.64+0x30] ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   LDG.E R17, desc[UR4][R2.64+0x40] ;
.L_x_1:
        /*0070*/                   LDG.E.64 R18, desc[UR4][R2.64+0x50] ;
        /*0080*/                   STG.E.64 desc[UR4][R2.64], R18 ;
        /*0090*/                   EXIT ;
    """
    groups = sass.load_groups(sass.parse(text), [])
    # R7 belongs to the first 128-bit load (R4..R7): the group of three closes there.
    assert [(g.loads, g.bytes) for g in groups] == [(3, 48), (1, 2), (1, 4), (1, 8)]
    inflight = sass.loads_before_first_use(sass.parse(text), [])
    assert inflight.max_bytes == 48
    assert inflight.mean_bytes == pytest.approx((48 * 48 + 2 * 2 + 4 * 4 + 8 * 8) / (48 + 2 + 4 + 8))


def test_issue_budget_and_littles_law():
    h100 = devices.DEVICES["h100"]
    # 132 SMs x 4 x 1.98 GHz x 32 thread-instructions/s over (0.85 x 3.35 TB/s / 4 bytes) elements/s.
    expected = 132 * 4 * 1.98e9 * 32 / (0.85 * 3.35e12 / 4)
    assert h100.issue_budget(2) == pytest.approx(expected)
    assert h100.issue_budget(4) == pytest.approx(2 * expected)
    assert h100.required_bytes_in_flight_per_sm(1e-6) == pytest.approx(0.85 * 3.35e12 * 1e-6 / 132)
    with pytest.raises(ValueError):
        h100.issue_budget(0)


@pytest.mark.parametrize("arch, registers, shared, threads, expected", [
    (90, 255, 0, 256, (1, "registers")),    # 8192 registers per warp: 2 warps per sub-partition
    (90, 128, 0, 256, (2, "registers")),
    (90, 32, 0, 1024, (2, "registers")),    # registers and threads both allow 2
    (90, 16, 100 * 1024, 128, (2, "shared")),   # 228 KB / 101 KB
    (80, 16, 100 * 1024, 128, (1, "shared")),   # 164 KB / 101 KB
    (90, 16, 0, 32, (32, "blocks")),
    (90, 256, 0, 32, (0, "registers")),     # more than 255 registers cannot launch
])
def test_blocks_per_sm(arch, registers, shared, threads, expected):
    assert devices.blocks_per_sm(arch, registers, shared, threads) == expected


def test_modelled_fraction_is_the_roofline_minimum():
    h200 = devices.DEVICES["h200"]
    budget = h200.issue_budget(2)
    need = h200.required_bytes_in_flight_per_sm()
    assert devices.modelled_fraction(h200, budget / 2, 2, need)["fraction"] == 1.0
    assert devices.modelled_fraction(h200, budget * 2, 2, 4 * need)["fraction"] == pytest.approx(0.5)
    assert devices.modelled_fraction(h200, budget / 2, 2, need / 4)["fraction"] == pytest.approx(0.25)


def _streaming_role(role, trips, programs, elements_per_program, threads=128, extra=""):
    # A thread streams `trips` iterations of two 128-bit loads and two 128-bit stores (16 elements of fp16);
    # `extra` adds instructions to the loop body.
    text = f"""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   STG.E.128 desc[UR4][R12.64], R4 ;
        /*0040*/                   STG.E.128 desc[UR4][R12.64+0x10], R8 ;
        /*0050*/                   IADD3 R0, R0, 0x1, RZ ;
        {extra}
        /*0070*/               @P0 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
    """
    return RoleCode(role, text, [trips], programs, threads, elements_per_program)


def test_analyse_whole_output_arithmetic():
    case = CodegenCase("tiny", (2, 64, 32, 32), (2, 64, 32, 32), "fp16")
    elements = case.output_elements  # 2 x 128 x 1024
    # Each role program: 128 threads x 4 trips x 16 elements = 8192 elements; 16 programs per role.
    roles = [_streaming_role("backbone", 4, 16, 8192), _streaming_role("skip", 4, 16, 8192)]
    build = KernelBuild("triton", case, 90, registers=32, spill_bytes=0, shared_bytes=0, threads_per_program=128,
                        compile_seconds=1.5, roles=roles, launch={"grid": [32]})
    row = report.analyse(build)
    per_thread = 2 + 6 * 4
    assert row["instructions_per_element"] == pytest.approx(per_thread * 128 * 32 / elements)
    assert row["instructions_per_element_by_role"]["skip"] == pytest.approx(per_thread * 128 / 8192)
    assert row["roles_cover_output"] == pytest.approx(1.0)
    assert row["load_bits_min"] == 128 and row["store_bits_min"] == 128
    assert row["load_bytes_per_input_byte"] == pytest.approx(1.0)
    assert row["store_bytes_per_output_byte"] == pytest.approx(1.0)
    # 32 bytes per thread in flight, 128 threads, 1 resident block (32 programs over 132 SMs).
    assert row["resident_blocks_per_sm"] == 1
    assert row["bytes_in_flight_per_sm"] == pytest.approx(32 * 128)
    expected = devices.modelled_fraction(devices.DEVICES["h100"], row["instructions_per_element"], 2, 32 * 128)
    assert row["modelled_fraction_of_copy_h100"] == pytest.approx(expected["fraction"])
    assert row["modelled_fraction_of_copy_h100"] < 1  # 4 KiB in flight per SM is far from enough


def test_auxiliary_loads_do_not_hide_the_stream_width():
    case = CodegenCase("tiny", (2, 64, 32, 32), (2, 64, 32, 32), "fp16")
    table = "/*0060*/                   LDG.E R20, desc[UR4][R30.64] ;"
    roles = [_streaming_role("skip", 4, 32, 8192, extra=table)]
    build = KernelBuild("cuda", case, 90, 32, 0, 0, 128, 1.0, roles, {})
    row = report.analyse(build)
    # 4 table bytes per 32 data bytes: 12.5% excess, all of it 32-bit, set aside.
    assert row["load_bytes_per_input_byte"] == pytest.approx(1.125)
    assert row["load_bits_min"] == 128
    assert row["load_bits_weighted"] == pytest.approx((128 * 2 + 32) / 3)
    # Data loaded 16 bits at a time has no excess to hide in: the stream width is 16.
    narrow = _streaming_role("skip", 4, 32, 8192).sass.replace("LDG.E.128 R8, desc[UR4][R2.64+0x10]",
                                                               "LDG.E.U16 R8, desc[UR4][R2.64+0x10]")
    roles = [RoleCode("skip", narrow, [4], 32, 128, 8192)]
    assert report.analyse(KernelBuild("cuda", case, 90, 32, 0, 0, 128, 1.0, roles, {}))["load_bits_min"] == 16


def _row(**overrides):
    row = {"backend": "cuda", "case": "sdxl-64x64-640+640", "dtype": "fp16", "arch": 90, "error": None,
           "x_shape": [2, 640, 64, 64], "h_shape": [2, 640, 64, 64], "channels_last": False, "element_size": 2,
           "instructions_per_element": 12.0, "load_bits_min": 128, "store_bits_min": 128, "spill_bytes": 0,
           "bytes_in_flight_per_sm": 40 * 1024, "modelled_fraction_of_copy_h100": 0.9,
           "modelled_fraction_of_copy_h200": 0.86, "compile_seconds": 3.0}
    row.update(overrides)
    return row


def test_budgets_pass_and_fail_with_reasons():
    assert budgets.check([_row()]) == []
    lines = budgets.check([_row(instructions_per_element=21.0, load_bits_min=16, spill_bytes=28,
                                modelled_fraction_of_copy_h200=0.5)])
    text = "\n".join(lines)
    assert "21.0 instructions per element > 20" in text
    assert "loads of 16 bits < 128" in text
    assert "28 spill bytes > 0" in text
    assert "H200 copy ceiling" in text and "H100 copy ceiling" not in text
    failed = budgets.check([_row(error="RuntimeError: target module missing")])
    assert len(failed) == 1 and "build failed" in failed[0] and "sdxl-t1-floor,no-spills" in failed[0]
    # sm_80 rows carry only the spill budget; fp32 SDXL threshold-1 rows are not under the floor budget.
    assert [b.name for b in budgets.applicable(_row(arch=80))] == ["no-spills"]
    assert [b.name for b in budgets.applicable(_row(dtype="fp32"))] == ["no-spills"]
    assert [b.name for b in budgets.applicable(_row(case="sdxl-64x64-640+640-t8"))] == ["threshold-8", "no-spills"]


def test_layout_vector_bits():
    assert budgets.layout_vector_bits(_row(x_shape=[2, 1280, 8, 8], h_shape=[2, 1280, 8, 8])) == 128
    assert budgets.layout_vector_bits(_row(x_shape=[2, 4, 7, 7], h_shape=[2, 4, 7, 7])) == 16
    assert budgets.layout_vector_bits(_row(x_shape=[2, 6, 7, 7], h_shape=[2, 2, 7, 7], channels_last=True)) == 32


def test_cases_come_from_the_decoder_walk():
    cases = all_cases()
    keys = [(c.name, c.dtype) for c in cases]
    assert len(keys) == len(set(keys))
    by_name = {c.name: c for c in cases if c.dtype == "fp16"}
    assert by_name["sdxl-32x32-1280+640"].h_shape == (2, 640, 32, 32)
    assert by_name["video16f-8x8-1280+1280"].x_shape == (2, 1280, 16, 8, 8)
    assert by_name["sdxl-64x64-640+640-t2radial"].spec().band.radial
    assert by_name["sdxl-64x64-640+640-t8"].spec().band.nx == 16
    assert [(c.name, c.dtype) for c in quick_cases()] == [
        ("sdxl-32x32-1280+1280", "fp16"), ("sdxl-32x32-1280+1280", "bf16"),
        ("sdxl-64x64-640+640", "fp16"), ("sdxl-64x64-640+640", "bf16")]
    assert {c.dtype for c in select_cases(cases, ["*/bf16"])} == {"bf16"}
    x, _ = by_name["sd15-8x8-1280+1280-cl"].tensors()
    assert x.stride()[1] == 1 and x.device.type == "meta"


def test_build_row_reports_failures_and_goes_on(monkeypatch):
    case = quick_cases()[0]

    def missing_tool(backend):
        raise FileNotFoundError("nvcc not found")

    monkeypatch.setattr(report, "load_target", missing_tool)
    row = report.build_row("cuda", case, 90)
    assert row["error"].startswith("tool missing: nvcc not found")
    assert row["verdicts"] and not any(v["ok"] for v in row["verdicts"])
    md = report.report_markdown([row], {"date": "now"})
    assert "## Failures" in md and "tool missing" in md


def test_command_line_rejects_bad_options_before_compiling():
    from bench.codegen.__main__ import main

    with pytest.raises(SystemExit, match="matches no case"):
        main(["--cases", "no-such-case"])
    with pytest.raises(SystemExit):
        main(["--archs", "70"])
    with pytest.raises(SystemExit):
        main(["--backends", "opencl"])
