"""Static evidence of the CUDA kernel's performance, read from the compiled cubins.

No GPU is needed: for every kernel named like `ema_update_kernel` and every architecture
that fused_ema._C carries, cuobjdump shows (see tests/_cubin.py)
- no stack frame and no local memory, so no register spills (-res-usage, and no LDL/STL);
- registers few enough that the register file allows as many resident threads per SM as
  the block size of the kernel's __launch_bounds__ does (full occupancy) for the 16
  single-dtype-pair kernels, and half of that for the two mixed-dtype kernels;
- for each dtype pair's kernel, a main loop (an innermost loop with a 16-byte access)
  that moves 16 bytes of the wider array per thread and access and the same elements of
  the narrower one, nothing narrower (no param read element by element);
- no FFMA/DFMA: the numeric contract is no contraction, so the CUDA kernel gives the CPU
  kernel's bits (ema_math.h; the CPU side is built with -ffp-contract=off).

They run where the module was built with its CUDA kernels and cuobjdump is found (a CUDA
toolkit's, or `pip install nvidia-cuda-cuobjdump`). FUSED_EMA_REQUIRE_CUBIN_TEST=1 (set by
.ci/run for its CUDA build) turns the skip into a failure, and FUSED_EMA_EXPECT_CUDA_ARCHS
(TORCH_CUDA_ARCH_LIST syntax) names the architectures the module must carry.
The parser itself is tested on small SASS excerpts everywhere.
"""
import os
import re

import pytest

from test_engine import DTYPES

import _cubin

REQUIRED = os.environ.get("FUSED_EMA_REQUIRE_CUBIN_TEST") == "1"


@pytest.fixture(scope="module")
def module():
    """(path of the compiled module, cuobjdump), or a skip (a failure when required)."""
    from fused_ema import _ext
    reason = None
    if _ext._C is None:
        reason = f"the compiled module is not available: {_ext.LOAD_ERROR}"
    elif not _ext._C.compiled_with_cuda():
        reason = "fused_ema was built without its CUDA kernels"
    tool = _cubin.find_cuobjdump()
    if reason is None and tool is None:
        reason = "cuobjdump not found (pip install nvidia-cuda-cuobjdump)"
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"FUSED_EMA_REQUIRE_CUBIN_TEST=1 but {reason}")
        pytest.skip(reason)
    return _ext._C.__file__, tool


@pytest.fixture(scope="module")
def kernels(module):
    found = _cubin.load_kernels(*module)
    assert found, f"no kernel named like {_cubin.KERNEL_BASE_NAME} in {module[0]}"
    for kernel in found:
        print(kernel.summary())
    return found


def check(kernels, bad):
    """Fails with one line per kernel for which `bad(kernel)` gives a complaint."""
    complaints = [f"{k.arch} {k.short_name}: {msg}" for k in kernels for msg in [bad(k)] if msg]
    if complaints:
        pytest.fail("\n".join(complaints), pytrace=False)


def test_every_architecture_has_the_kernel(module, kernels):
    cubins, ptx = _cubin.list_archs(*module)
    assert cubins, f"{module[0]} holds no cubin"
    assert sorted({k.arch for k in kernels}) == cubins, "some cubin lacks the kernel"
    expected = os.environ.get("FUSED_EMA_EXPECT_CUDA_ARCHS")
    if expected:
        archs = [a.strip() for a in re.split(r"[;\s]+", expected) if a.strip()]
        want_cubins = sorted("sm_" + a.replace("+PTX", "").replace(".", "") for a in archs)
        want_ptx = sorted("sm_" + a.replace("+PTX", "").replace(".", "")
                          for a in archs if a.endswith("+PTX"))
        assert (cubins, ptx) == (want_cubins, want_ptx), (
            f"{module[0]}: cubins {cubins}, PTX {ptx}; FUSED_EMA_EXPECT_CUDA_ARCHS={expected}")


def test_no_stack_no_local_memory_no_spills(kernels):
    check(kernels, lambda k: (
        f"{k.stack} bytes of stack, {k.local} of local memory, "
        f"{k.count('LDL', 'STL')} local loads/stores (spills or arrays indexed at run time)"
        if k.stack or k.local or k.count("LDL", "STL") else None))


def test_registers_allow_the_occupancy_of_the_design(kernels):
    # The 16 single-decay kernels (one dtype pair each: the common path) must allow full
    # occupancy at their launch bound. The two mixed-dtype / multi-decay kernels read the
    # dtypes per row and keep up to 8 decays and EMA pointers live, so they are built for
    # half occupancy (__launch_bounds__(256, 4)): 1024 threads per SM with 16 to 48 bytes
    # in flight each is ~16-48 KB per SM, above the ~14 KB per SM that Little's law asks
    # for 3 TB/s at ~600 ns of latency on an H100 (132 SMs), so they stay memory-bound.
    def bad(k):
        if not k.max_threads:
            return "no __launch_bounds__: the compiler may take any number of registers"
        resident, possible = k.resident_threads()
        needed = possible if k.dtype_pair else possible // 2
        if resident < needed:
            return (f"{k.registers} registers x {k.max_threads} threads per block: "
                    f"{resident} resident threads per SM where {needed} are required "
                    f"({possible} possible)")
        return None
    check(kernels, bad)


def test_a_16_byte_main_loop_for_every_dtype_pair(kernels):
    # Each (param dtype, EMA dtype) pair has a kernel of its own for the single-decay path;
    # its main loop must move 16 bytes of the wider array per thread and access, the same
    # elements of the narrower one (allowed_widths), and never an element at a time. The
    # mixed-dtype kernels must have 16-byte main loops too.
    pairs = len(DTYPES) ** 2
    complaints = []
    for arch in sorted({k.arch for k in kernels}):
        fixed = [k for k in kernels if k.arch == arch and k.dtype_pair]
        if len({k.short_name for k in fixed}) != pairs:
            complaints.append(f"{arch}: {len(fixed)} single-dtype-pair kernels, not {pairs}")
        for k in kernels:
            if k.arch != arch:
                continue
            if k.dtype_pair and not k.clean_vector_loops():
                narrow = sorted({f"{a.instr.opcode} ({a.width} B)"
                                 for a in k.narrow_accesses_in_vector_loops()})
                complaints.append(f"{arch} {k.short_name}: no main loop with full-vector "
                                  f"accesses only (allowed widths {sorted(k.allowed_widths())} "
                                  f"B; narrow: {', '.join(narrow) or 'no 16-byte loop'})")
            elif not k.dtype_pair and not k.vector_loops():
                complaints.append(f"{arch} {k.short_name}: no main loop with 16-byte accesses")
    if complaints:
        pytest.fail("\n".join(complaints), pytrace=False)


def test_no_fused_multiply_add(kernels):
    # HFMA2 is left out: ptxas uses `HFMA2.MMA Rx, -RZ, RZ, ...` to move constants, and
    # the 16-bit types are computed in fp32.
    check(kernels, lambda k: (
        f"{k.count('FFMA', 'FFMA2')} FFMA, {k.count('DFMA')} DFMA (contracted a*b+c rounds "
        "once, the CPU kernel twice)" if k.count("FFMA", "FFMA2", "DFMA") else None))


# The parser on excerpts of real cuobjdump output (sm_90), so it is tested on every machine.

RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN9fused_ema6kernel17ema_update_kernelEv:
  REG:52 STACK:208 SHARED:1088 LOCAL:0 CONSTANT[2]:276 CONSTANT[0]:672 TEXTURE:0 SURFACE:0
 Function _Z5otherv:
  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:352 TEXTURE:0 SURFACE:0
"""

ELF = """
Fatbin elf code:
================
arch = sm_90

.nv.info._ZN9fused_ema6kernel17ema_update_kernelEv
	<0x9>
	Attribute:	EIATTR_MAXREG_COUNT
	Format:	EIFMT_HVAL
	Value:	0x80
	<0x14>
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	0x200 0x1 0x1 
.nv.callgraph
	Attribute:	EIATTR_MAX_THREADS
	Value:	0x400 0x1 0x1 
"""

SASS = """
Fatbin elf code:
================
arch = sm_90

	code for sm_90
		Function : _ZN9fused_ema6kernel17ema_update_kernelEv
        /*0000*/                   LDG.E.64 R2, desc[UR4][R4.64] ;        /* 0x0 */
        /*0010*/                   LD.E.128 R8, desc[UR8][R6.64] ;        /* 0x0 */
        /*0020*/                   LD.E.U16 R12, desc[UR8][R4.64] ;       /* 0x0 */
        /*0030*/                   FFMA R8, R12, R9, R8 ;                 /* 0x0 */
        /*0040*/                   ST.E.128 desc[UR8][R6.64], R8 ;        /* 0x0 */
        /*0050*/               @P0 BRA 0x10 ;                             /* 0x0 */
        /*0060*/                   LDG.E.128.CONSTANT R8, desc[UR8][R6.64] ; /* 0x0 */
        /*0070*/                   DFMA R8, R12, R9, R8 ;                 /* 0x0 */
        /*0080*/                   STG.E.128 desc[UR8][R6.64], R8 ;       /* 0x0 */
        /*0090*/              @!P1 BRA 0x60 ;                             /* 0x0 */
        /*00a0*/                   LDL.64 R2, [R1+0x10] ;                 /* 0x0 */
        /*00b0*/                   STG.E.U16 desc[UR8][R6.64], R8 ;       /* 0x0 */
        /*00c0*/                   BRA 0xa0 ;                             /* 0x0 */
        /*00d0*/                   BRA 0x0 ;                              /* 0x0 */
        /*00e0*/                   EXIT ;                                 /* 0x0 */
"""


def parsed_kernel():
    name = "_ZN9fused_ema6kernel17ema_update_kernelEv"
    usage = _cubin.parse_res_usage(RES_USAGE)
    assert usage[("sm_90", name)]["REG"] == 52 and usage[("sm_90", name)]["STACK"] == 208
    assert usage[("sm_90", "_Z5otherv")]["REG"] == 8
    assert _cubin.parse_max_threads(ELF) == {("sm_90", name): 512}
    code = _cubin.parse_sass(SASS)[("sm_90", name)]
    assert [i.opcode for i in code][:3] == ["LDG.E.64", "LD.E.128", "LD.E.U16"]
    res = usage[("sm_90", name)]
    return _cubin.Kernel("sm_90", name, res["REG"], res["STACK"], res["LOCAL"], res["SHARED"],
                         512, code)


def test_parser_finds_loops_widths_and_fmas():
    k = parsed_kernel()
    assert k.loops() == [(0x0, 0xd0), (0x10, 0x50), (0x60, 0x90), (0xa0, 0xc0)]
    assert k.innermost_loops() == [(0x10, 0x50), (0x60, 0x90), (0xa0, 0xc0)]
    assert k.vector_loops() == [(0x10, 0x50), (0x60, 0x90)]  # 0xa0 stores 2 bytes only
    assert k.clean_vector_loops() == [(0x60, 0x90)]  # 0x10 also loads 2 bytes
    narrow = k.narrow_accesses_in_vector_loops()
    assert [(a.instr.opcode, a.space, a.width) for a in narrow] == [("LD.E.U16", "generic", 2)]
    assert [a.width for a in k.accesses()] == [8, 16, 2, 16, 16, 16, 8, 2]
    assert (k.count("FFMA"), k.count("DFMA"), k.count("LDL", "STL")) == (1, 1, 1)


def test_parser_allows_the_narrower_array_its_share_of_a_vector():
    # bf16 params with an fp32 EMA: 4 elements per thread are 8 bytes of param and 16 of
    # EMA; a param read 2 bytes at a time is narrow.
    k = parsed_kernel()
    k.display_name = "void fused_ema::kernel::ema_update_kernel<c10::BFloat16, float>(int)"
    assert k.dtype_pair == (2, 4) and k.allowed_widths() == {8, 16}
    k.code = _cubin.parse_sass(SASS.replace("LD.E.U16", "LD.E.64"))[("sm_90", k.name)]
    assert k.clean_vector_loops() == [(0x10, 0x50), (0x60, 0x90)]
    k.code = _cubin.parse_sass(SASS)[("sm_90", k.name)]
    assert k.clean_vector_loops() == [(0x60, 0x90)]
    k.display_name = "void fused_ema::kernel::mixed_ema_update_kernel<true>(int)"
    assert k.dtype_pair is None and k.allowed_widths() == {16, 32}


def test_occupancy_arithmetic():
    k = parsed_kernel()
    # 52 registers: 1792 per warp, 36 warps of the 64K file: 2 blocks of 512 on sm_90.
    assert k.resident_threads() == (1024, 2048)
    k.registers = 32
    assert k.resident_threads() == (2048, 2048)
    k.registers = 33  # rounds up to 40 per thread
    assert k.resident_threads() == (1536, 2048)
    k.arch = "sm_89"  # 1536 threads per SM: 40 registers still fill it with 3 blocks of 512
    k.registers = 40
    assert k.resident_threads() == (1536, 1536)
