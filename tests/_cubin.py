"""Reads the CUDA kernels a compiled module carries, for each architecture, with cuobjdump.

No GPU is needed: `cuobjdump` (a CUDA toolkit's, or PyPI's nvidia-cuda-cuobjdump)
prints each cubin's resource usage (-res-usage), its ELF attributes (-elf: the
__launch_bounds__ thread count) and its machine code (-sass). This module parses
them into `Kernel`s and measures what tests/test_cubin.py checks.

`python tests/_cubin.py [path/to/_C.so]` prints one line per kernel and architecture.
"""
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

KERNEL_BASE_NAME = "ema_update_kernel"  # every __global__ whose name contains it is checked

# Per compute capability: (max resident threads per SM, max resident blocks per SM), from
# the CUDA C++ Programming Guide, "Features and Technical Specifications". Every one of
# these has a 64K-register file, registers allocated per warp in units of 256.
SM_LIMITS = {
    "sm_80": (2048, 32), "sm_86": (1536, 16), "sm_87": (2048, 16), "sm_89": (1536, 24),
    "sm_90": (2048, 32), "sm_100": (2048, 32), "sm_103": (2048, 32),
    "sm_120": (1536, 32), "sm_121": (1536, 32),
}
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # per warp

_INSTR = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_.]*)\b([^;]*);")


@dataclasses.dataclass
class Instr:
    addr: int
    predicate: str
    opcode: str
    operands: str

    @property
    def base(self):
        return self.opcode.split(".")[0]


@dataclasses.dataclass
class Access:
    """A load or store of memory: `space` global, generic (LD/ST: the address space was
    not proven, but this kernel's pointers all point to global memory) or local."""
    instr: Instr
    space: str
    is_store: bool
    width: int  # bytes per thread


_SPACES = {"LDG": ("global", False), "STG": ("global", True), "LD": ("generic", False),
           "ST": ("generic", True), "LDL": ("local", False), "STL": ("local", True)}
_ELEMENT_SIZES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}
_WIDTHS = {"256": 32, "128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def access(instr: Instr):
    if instr.base not in _SPACES:
        return None
    space, is_store = _SPACES[instr.base]
    width = next((_WIDTHS[m] for m in instr.opcode.split(".")[1:] if m in _WIDTHS), 4)
    return Access(instr, space, is_store, width)


@dataclasses.dataclass
class Kernel:
    arch: str  # "sm_90"
    name: str  # mangled
    registers: int
    stack: int  # bytes of stack frame per thread
    local: int  # bytes of local memory per thread
    shared: int
    max_threads: int  # from __launch_bounds__; 0 when it has none
    code: list
    display_name: str = ""  # demangled, for messages

    @property
    def short_name(self):
        """The demangled name without its parameter list (the mangled name without c++filt)."""
        return (self.display_name or self.name).split("(")[0]

    def accesses(self, instrs=None):
        return [a for a in map(access, self.code if instrs is None else instrs) if a]

    def loops(self):
        """(first, last) instruction address of each loop: a branch back to `first` at `last`.

        Several back-edges to one header are one loop (the furthest one ends it)."""
        ends = {}
        for i in self.code:
            if i.base != "BRA":
                continue
            target = re.search(r"0x([0-9a-f]+)", i.operands)
            if target and int(target.group(1), 16) <= i.addr:
                start = int(target.group(1), 16)
                ends[start] = max(ends.get(start, 0), i.addr)
        return sorted(ends.items())

    def innermost_loops(self):
        loops = self.loops()
        return [(s, e) for s, e in loops
                if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]

    def body(self, loop):
        return [i for i in self.code if loop[0] <= i.addr <= loop[1]]

    @property
    def dtype_pair(self):
        """(param, EMA) element sizes of a kernel made for one dtype pair
        (`ema_update_kernel<c10::Half, float>`), or None for the mixed-dtype kernels."""
        m = re.search(r"ema_update_kernel<([\w:]+), ([\w:]+)>", self.display_name or "")
        if not m or m.group(1) not in _ELEMENT_SIZES or m.group(2) not in _ELEMENT_SIZES:
            return None
        return _ELEMENT_SIZES[m.group(1)], _ELEMENT_SIZES[m.group(2)]

    def vector_loops(self):
        """Innermost loops with a 16-byte (or wider) global access per thread: the main loops."""
        return [loop for loop in self.innermost_loops()
                if any(a.width >= 16 and a.space != "local"
                       for a in self.accesses(self.body(loop)))]

    def allowed_widths(self):
        """Access widths a main loop may use. A thread moves the same elements of both
        arrays per step: 16 bytes of the wider one, as many elements of the narrower one
        (8 bytes of bf16 next to 16 of fp32), so every warp access is contiguous. Anything
        else (a param read element by element) is narrow."""
        pair = self.dtype_pair
        if pair is None:
            return {16, 32}
        wide = max(pair)
        return {16 * size // wide for size in pair}

    def narrow_accesses(self, loop):
        """Global (or generic) accesses in `loop` of a width the design does not allow."""
        allowed = self.allowed_widths()
        return [a for a in self.accesses(self.body(loop))
                if a.space != "local" and a.width not in allowed]

    def clean_vector_loops(self):
        """Main loops whose every access moves a full vector (see allowed_widths).

        A mixed-dtype main loop may legitimately also read the plan's table (an EMA slot
        per decay in the multi-decay path), so for those kernels these are counted, not
        required of every main loop."""
        return [loop for loop in self.vector_loops() if not self.narrow_accesses(loop)]

    def narrow_accesses_in_vector_loops(self):
        return [a for loop in self.vector_loops() for a in self.narrow_accesses(loop)]

    def count(self, *bases):
        return sum(i.base in bases for i in self.code)

    def resident_threads(self, block=None):
        """Threads per SM at `block` threads per block (default: the launch bound), and the
        most the SM could hold at that block size whatever the registers."""
        max_threads, max_blocks = SM_LIMITS[self.arch]
        block = block or self.max_threads
        warps = -(-block // 32)
        per_warp = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        by_threads = min(max_blocks, max_threads // block)
        by_registers = (REGISTERS_PER_SM // per_warp) // warps if per_warp else by_threads
        return min(by_threads, by_registers) * block, by_threads * block

    def summary(self):
        acc = [a for a in self.accesses() if a.space != "local"]
        wide = lambda store: sum(a.is_store == store and a.width >= 16 for a in acc)  # noqa: E731
        resident, possible = self.resident_threads() if self.max_threads else (0, 0)
        return (f"{self.arch:7} regs {self.registers:3} stack {self.stack:4} local {self.local} "
                f"LDL/STL {self.count('LDL', 'STL'):3} launch bound {self.max_threads:4} "
                f"threads/SM {resident}/{possible} ({SM_LIMITS[self.arch][0]}) "
                f"16B loads {wide(False):3} stores {wide(True):3} of {len(acc)} accesses "
                f"(generic {sum(a.space == 'generic' for a in acc)}) "
                f"main loops {len(self.vector_loops()):3} "
                f"16B-only {len(self.clean_vector_loops()):3} "
                f"narrow in them {len(self.narrow_accesses_in_vector_loops()):3} "
                f"FFMA {self.count('FFMA', 'FFMA2'):3} DFMA {self.count('DFMA'):3}  "
                f"{self.short_name}")


def find_cuobjdump():
    """FUSED_EMA_CUOBJDUMP, PATH, the CUDA toolkit, then PyPI's nvidia-cuda-cuobjdump."""
    if os.environ.get("FUSED_EMA_CUOBJDUMP"):
        return os.environ["FUSED_EMA_CUOBJDUMP"]
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import nvidia  # namespace package of the nvidia-* wheels
        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump")))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _run(cuobjdump, flag, path):
    out = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cuobjdump} {flag} {path} failed:\n{out.stderr}")
    return out.stdout


def _per_arch(text):
    """Yields (arch, line) for every line, the arch being that of the cubin it belongs to."""
    arch = None
    for line in text.splitlines():
        m = re.match(r"^arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        yield arch, line


def parse_res_usage(text):
    usage, name = {}, None
    for arch, line in _per_arch(text):
        m = re.match(r"^\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and re.match(r"^\s*REG:", line):
            usage[arch, name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return usage


def parse_max_threads(text):
    """(arch, name) -> threads per block of __launch_bounds__ (EIATTR_MAX_THREADS)."""
    bounds, name, attribute = {}, None, None
    for arch, line in _per_arch(text):
        m = re.match(r"^\.nv\.info\.(\S+)\s*$", line)
        if m:
            name = m.group(1)
        elif line.startswith("."):
            name = None
        m = re.match(r"^\s*Attribute:\s*(\w+)", line)
        if m:
            attribute = m.group(1)
        m = re.match(r"^\s*Value:\s*(.*)$", line)
        if m and name and attribute == "EIATTR_MAX_THREADS":
            dims = [int(v, 16) for v in m.group(1).split()]
            bounds[arch, name] = dims[0] * dims[1] * dims[2]
    return bounds


def parse_sass(text):
    code, name = {}, None
    for arch, line in _per_arch(text):
        m = re.match(r"^\s*Function : (\S+)\s*$", line)
        if m:
            name = m.group(1)
            code[arch, name] = []
            continue
        m = _INSTR.match(line)
        if m and name:
            code[arch, name].append(Instr(int(m.group(1), 16), m.group(2) or "", m.group(3),
                                          m.group(4).strip()))
    return code


def demangle(names):
    """Readable names (c++filt, when there is one) for messages; the mangled ones otherwise."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    readable = out.stdout.splitlines()
    return readable if out.returncode == 0 and len(readable) == len(names) else list(names)


def load_kernels(path, cuobjdump):
    """Every kernel of `path` whose name contains KERNEL_BASE_NAME, one per architecture."""
    usage = parse_res_usage(_run(cuobjdump, "-res-usage", path))
    bounds = parse_max_threads(_run(cuobjdump, "-elf", path))
    code = parse_sass(_run(cuobjdump, "-sass", path))
    kernels = []
    for (arch, name), res in sorted(usage.items()):
        if arch is None:
            raise RuntimeError(f"{path}: no `arch =` line; give a module or object file "
                               "(a fatbin), not a bare cubin")
        if KERNEL_BASE_NAME not in name:
            continue
        kernels.append(Kernel(arch, name, res["REG"], res.get("STACK", 0), res.get("LOCAL", 0),
                              res.get("SHARED", 0), bounds.get((arch, name), 0),
                              code.get((arch, name), [])))
    for kernel, readable in zip(kernels, demangle([k.name for k in kernels])):
        kernel.display_name = readable
    return kernels


def list_archs(path, cuobjdump):
    """(architectures with a cubin, architectures with PTX) in the module."""
    elf = re.findall(r"\.(sm_\w+)\.cubin", _run(cuobjdump, "-lelf", path))
    out = subprocess.run([cuobjdump, "-lptx", path], capture_output=True, text=True).stdout
    return sorted(set(elf)), sorted(set(re.findall(r"\.(sm_\w+)\.ptx", out)))


def module_path():
    from fused_ema import _ext
    return _ext._C.__file__


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else module_path()
    tool = find_cuobjdump()
    if tool is None:
        sys.exit("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    cubins, ptx = list_archs(path, tool)
    print(f"{path}: cubins {' '.join(cubins)}; PTX {' '.join(ptx) or 'none'}")
    for kernel in load_kernels(path, tool):
        print(kernel.summary())
