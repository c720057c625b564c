"""Read SASS text (``cuobjdump -sass`` or ``nvdisasm``) and count what one thread executes.

Everything here is static: it reads the instructions of ONE function and weights each by the trip counts of
the loops around it, which the caller supplies (a target knows its loops' trip counts for a case; the SASS
alone does not). Conventions, applied by every counter below:

- *Executed code* is what can be reached from the function's entry by falling through, by branches other
  than ``BRA.DIV`` and by ``CALL`` (out-of-line subroutines are counted once, where they sit, not once per
  call). Code reached only through ``BRA.DIV`` (the fallback a warp takes when it is diverged at a
  warp-synchronous instruction) and the padding after the final EXIT are not executed code.
- A *loop* is a natural loop of the executed code's control-flow graph: a branch back to a block that
  dominates it (every path from the entry to the branch passes through that block, the loop header). Back
  branches to one header make one loop. Out-of-line cold code that jumps back into the main path is not a
  loop (its target does not dominate it). Loops are listed by header address; nesting follows the bodies.
- The *weight* of an instruction is the product of the trip counts of the loops holding it. Both sides of a
  forward branch count fully (a role-specialised function should leave only its own path).
"""

from __future__ import annotations

import math
import numbers
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Instr",
    "Loop",
    "GlobalAccess",
    "LoadGroup",
    "InFlight",
    "parse",
    "split_functions",
    "executed",
    "find_loops",
    "instruction_weights",
    "weighted_instruction_count",
    "global_accesses",
    "barrier_count",
    "load_groups",
    "loads_before_first_use",
    "access_bits",
    "loop_summary",
    "disassemble",
    "resource_usage",
    "triton_bin_dir",
]

# One instruction line of either tool: "/*01a0*/  @!P0 BRA `(.L_x_3) ;" or "/*01a0*/  BRA 0x2b30 ;  /* 0x... */".
_INSTR_LINE = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
# A label line of nvdisasm: ".L_x_12:" or "$__internal_1_$__cuda_sm20_div_s64:" or the function name.
_LABEL_LINE = re.compile(r"^\s*([.$A-Za-z_][\w.$]*):\s*$")
_PREDICATE = re.compile(r"^@(!?U?P(?:[0-7]|T))\s+")
_OPERAND_PREDICATE = re.compile(r"^!?U?P(?:[0-7]|T)$")
_LABEL_TARGET = re.compile(r"`\(([^)]+)\)")
_HEX_TARGET = re.compile(r"(?:^|[\s,])0x([0-9a-fA-F]+)\s*$")
# A general register operand: R12, -R12, |R12|, R12.reuse, R12.64 (a pair); not UR12, RZ or SR_*.
_REGISTER = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(?:\.(64|128))?")

_BRANCHES = ("BRA", "JMP", "BRX", "JMX")
_ENDS = ("EXIT", "RET", "KILL")
_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "32": 32, "64": 64, "128": 128, "256": 256}
_GLOBAL_LOADS = ("LDG", "LD", "LDGSTS")
_GLOBAL_STORES = ("STG", "ST")
_GLOBAL_ATOMICS = ("ATOMG", "ATOM", "RED", "REDG")
_TMA = ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAREDG")


@dataclass(frozen=True)
class Instr:
    """One SASS instruction.

    ``opcode`` is the mnemonic with its modifiers ("LDG.E.128"), ``text`` the whole instruction without the
    address and encoding ("@P0 LDG.E.128 R4, desc[UR6][R2.64]"), ``predicate`` "" or "P0", "!P0", "UP1"...,
    ``operands`` the comma-separated operands and ``target`` the resolved address of a branch or call.
    """

    addr: int
    opcode: str
    text: str
    predicate: str = ""
    operands: Tuple[str, ...] = ()
    target: Optional[int] = None

    @property
    def base(self) -> str:
        """The mnemonic without modifiers: "LDG" for "LDG.E.128"."""
        return self.opcode.split(".", 1)[0]

    @property
    def modifiers(self) -> Tuple[str, ...]:
        """The dot-separated modifiers: ("E", "128") for "LDG.E.128"."""
        return tuple(self.opcode.split(".")[1:])

    @property
    def unconditional(self) -> bool:
        """No guard predicate (or the always-true one), and for a branch no condition operand either
        (``BRA !P5, target`` branches only when its operand predicate holds)."""
        if self.predicate not in ("", "PT", "UPT"):
            return False
        if self.base in _BRANCHES and len(self.operands) > 1:
            return not _OPERAND_PREDICATE.match(self.operands[0]) or self.operands[0] in ("PT", "UPT")
        return True


@dataclass(frozen=True)
class Loop:
    """A natural loop: ``start`` is its header's address, ``end`` the highest address in its body and
    ``body`` the addresses of every instruction in it (nested loops' bodies included)."""

    start: int
    end: int
    body: frozenset = frozenset()

    def holds(self, addr: int) -> bool:
        """True when the instruction at ``addr`` is in the body."""
        return addr in self.body


@dataclass(frozen=True)
class GlobalAccess:
    """One global-memory instruction: kind "load" | "store" | "atomic" | "tma", width in bits per thread,
    weight (executions per thread) and the instruction itself."""

    kind: str
    bits: int
    weight: float
    instr: Instr


@dataclass(frozen=True)
class LoadGroup:
    """Global loads a thread issues back to back in one basic block before any of them is used."""

    addr: int
    loads: int
    bytes: int
    weight: float


@dataclass(frozen=True)
class InFlight:
    """Load bytes one thread keeps in flight: the largest group, and the mean over the bytes loaded."""

    max_bytes: int
    mean_bytes: float
    groups: Tuple[LoadGroup, ...]


def split_functions(text: str) -> Dict[str, str]:
    """The SASS text of each function in a multi-function dump, by (mangled) name, in order.

    Recognises cuobjdump's "Function : NAME" headers and nvdisasm's ".text.NAME:" section labels. A text
    with neither is returned as one function named "".
    """
    header = re.compile(r"^\s*(?:Function\s*:\s*(\S+)|\.text\.(\S+?):)\s*$")
    functions: Dict[str, List[str]] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        found = header.match(line)
        if found:
            current = found.group(1) or found.group(2)
            functions[current] = []
        elif current is not None:
            functions[current].append(line)
    if not functions:
        return {"": text}
    return {name: "\n".join(lines) for name, lines in functions.items()}


def _split_operands(rest: str) -> Tuple[str, ...]:
    """Top-level comma-separated operands (commas inside [] or `() never split)."""
    parts, depth, current = [], 0, []
    for ch in rest:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    tail = "".join(current).strip()
    if tail:
        parts.append(tail)
    return tuple(parts)


def parse(text: str) -> List[Instr]:
    """The instructions of one function's SASS, in address order, with branch and call targets resolved.

    Accepts cuobjdump -sass (hex targets, encoding comments) and nvdisasm (label targets) output. Raises
    ValueError when the text holds no instruction, several functions (addresses that go backwards: split
    them with :func:`split_functions`) or a branch to a label it does not define.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be SASS text (str), got {type(text).__name__}")
    raw: List[Tuple[int, str]] = []
    labels: Dict[str, int] = {}
    pending_labels: List[str] = []
    for line in text.splitlines():
        label = _LABEL_LINE.match(line)
        if label and "/*" not in line:
            pending_labels.append(label.group(1))
            continue
        found = _INSTR_LINE.search(line)
        if not found:
            continue
        addr = int(found.group(1), 16)
        if raw and addr <= raw[-1][0]:
            raise ValueError(
                f"text: address 0x{addr:x} follows 0x{raw[-1][0]:x}; it holds several functions "
                "(use split_functions)"
            )
        for name in pending_labels:
            labels[name] = addr
        pending_labels = []
        raw.append((addr, found.group(2).strip()))
    if not raw:
        raise ValueError("text holds no SASS instruction (expected lines like '/*0010*/ LDC R1, c[0x0][0x28] ;')")
    instrs = []
    for addr, body in raw:
        predicate = ""
        pred = _PREDICATE.match(body)
        if pred:
            predicate = pred.group(1)
            body_wo = body[pred.end():]
        else:
            body_wo = body
        opcode, _, rest = body_wo.partition(" ")
        operands = _split_operands(rest)
        target = None
        base = opcode.split(".", 1)[0]
        if base in _BRANCHES + ("CALL",):
            by_label = _LABEL_TARGET.search(rest)
            by_hex = _HEX_TARGET.search(rest)
            if by_label:
                name = by_label.group(1)
                if name not in labels:
                    raise ValueError(f"text: {base} at 0x{addr:x} targets undefined label {name!r}")
                target = labels[name]
            elif by_hex:
                target = int(by_hex.group(1), 16)
        instrs.append(Instr(addr, opcode, body, predicate, operands, target))
    return instrs


def _falls_through(ins: Instr) -> bool:
    """False after an unconditional jump or end of thread/subroutine."""
    if not ins.unconditional:
        return True
    return not (ins.base in _ENDS or (ins.base in _BRANCHES and not ins.opcode.startswith("BRA.DIV")))


def _jumps(ins: Instr) -> bool:
    """A branch or call whose target the counters follow (BRA.DIV's divergence path is not followed)."""
    return ins.base in _BRANCHES + ("CALL",) and not ins.opcode.startswith("BRA.DIV") and ins.target is not None


@dataclass
class _Graph:
    """Basic blocks of a function: block i holds instrs[starts[i]:starts[i + 1]]."""

    instrs: Sequence[Instr]
    starts: List[int]
    succ: List[List[int]]
    reachable: List[int]  # blocks reachable from the entry, in reverse postorder

    def block_instrs(self, block: int) -> Sequence[Instr]:
        end = self.starts[block + 1] if block + 1 < len(self.starts) else len(self.instrs)
        return self.instrs[self.starts[block]:end]


def _graph(instrs: Sequence[Instr]) -> _Graph:
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if _jumps(ins) and ins.target in index:
            leaders.add(index[ins.target])
        if ins.base in _BRANCHES + _ENDS + ("CALL",) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    block_of = {start: block for block, start in enumerate(starts)}
    succ: List[List[int]] = []
    for block, start in enumerate(starts):
        end = starts[block + 1] if block + 1 < len(starts) else len(instrs)
        last = instrs[end - 1]
        out = []
        if _jumps(last) and last.target in index and index[last.target] in block_of:
            out.append(block_of[index[last.target]])
        if _falls_through(last) and end < len(instrs):
            out.append(block + 1)
        succ.append(out)
    # Reverse postorder of the blocks reachable from the entry (iterative depth-first search).
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:
        block, children = stack[-1]
        for child in children:
            if child not in seen:
                seen.add(child)
                stack.append((child, iter(succ[child])))
                break
        else:
            order.append(block)
            stack.pop()
    return _Graph(instrs, starts, succ, order[::-1])


def _dominators(graph: _Graph) -> Dict[int, int]:
    """Immediate dominator of every reachable block (Cooper, Harvey and Kennedy's iteration)."""
    rank = {block: i for i, block in enumerate(graph.reachable)}
    preds: Dict[int, List[int]] = {block: [] for block in graph.reachable}
    for block in graph.reachable:
        for child in graph.succ[block]:
            preds[child].append(block)
    idom = {graph.reachable[0]: graph.reachable[0]}

    def intersect(a: int, b: int) -> int:
        while a != b:
            while rank[a] > rank[b]:
                a = idom[a]
            while rank[b] > rank[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for block in graph.reachable[1:]:
            known = [p for p in preds[block] if p in idom]
            new = known[0]
            for other in known[1:]:
                new = intersect(new, other)
            if idom.get(block) != new:
                idom[block] = new
                changed = True
    return idom


def _dominates(idom: Dict[int, int], a: int, b: int) -> bool:
    while True:
        if a == b:
            return True
        if idom[b] == b:
            return False
        b = idom[b]


def _natural_loops(graph: _Graph) -> List[Tuple[int, set]]:
    """(header block, body blocks) per loop header, sorted by header address; back edges to one header merge."""
    idom = _dominators(graph)
    reachable = set(graph.reachable)
    preds: Dict[int, List[int]] = {block: [] for block in reachable}
    for block in reachable:
        for child in graph.succ[block]:
            preds[child].append(block)
    bodies: Dict[int, set] = {}
    for block in reachable:
        for header in graph.succ[block]:
            if not _dominates(idom, header, block):
                continue
            body = bodies.setdefault(header, {header})
            work = [block]
            while work:
                node = work.pop()
                if node not in body:
                    body.add(node)
                    work.extend(preds[node])
    return sorted(bodies.items(), key=lambda item: graph.starts[item[0]])


def executed(instrs: Sequence[Instr]) -> List[Instr]:
    """The executed code (see the module docstring): reachable from the entry without taking a BRA.DIV."""
    if not instrs:
        return []
    graph = _graph(instrs)
    blocks = sorted(graph.reachable)
    return [ins for block in blocks for ins in graph.block_instrs(block)]


def _loops_with_blocks(instrs: Sequence[Instr]) -> Tuple[_Graph, List[Tuple["Loop", set]]]:
    graph = _graph(instrs)
    loops = []
    for header, body in _natural_loops(graph):
        addrs = frozenset(ins.addr for block in body for ins in graph.block_instrs(block))
        loops.append((Loop(instrs[graph.starts[header]].addr, max(addrs), addrs), body))
    return graph, loops


def find_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """The loops of the executed code, sorted by start (header) address."""
    if not instrs:
        return []
    return [loop for loop, _ in _loops_with_blocks(instrs)[1]]


def _check_trips(loops: Sequence[Loop], loop_trips: Sequence[float]) -> List[float]:
    trips = list(loop_trips)
    if len(trips) != len(loops):
        spans = ", ".join(f"0x{loop.start:x}-0x{loop.end:x}" for loop in loops)
        raise ValueError(f"loop_trips must give one trip count per loop: {len(loops)} loops ({spans}), "
                         f"got {len(trips)} trip counts")
    for trip in trips:
        if isinstance(trip, bool) or not isinstance(trip, numbers.Real):
            raise TypeError(f"loop_trips must hold numbers, got {type(trip).__name__} {trip!r}")
        if not (math.isfinite(trip) and trip >= 0):
            raise ValueError(f"loop_trips must be finite numbers >= 0, got {trip!r}")
    return [float(trip) for trip in trips]


def instruction_weights(instrs: Sequence[Instr], loop_trips: Sequence[float]) -> List[Tuple[Instr, float]]:
    """(instruction, executions per thread) for the executed code, in address order."""
    if not instrs:
        _check_trips([], loop_trips)
        return []
    graph, loops = _loops_with_blocks(instrs)
    trips = _check_trips([loop for loop, _ in loops], loop_trips)
    weighted = []
    for block in sorted(graph.reachable):
        weight = 1.0
        for (_, body), trip in zip(loops, trips):
            if block in body:
                weight *= trip
        weighted.extend((ins, weight) for ins in graph.block_instrs(block))
    return weighted


def weighted_instruction_count(instrs: Sequence[Instr], loop_trips: Sequence[float]) -> float:
    """SASS instructions one thread issues: each executed instruction times the trips of its loops."""
    return sum(weight for _, weight in instruction_weights(instrs, loop_trips))


def _access_kind(ins: Instr) -> Optional[str]:
    if ins.base in _GLOBAL_LOADS:
        return "load"
    if ins.base in _GLOBAL_STORES:
        return "store"
    if ins.base in _GLOBAL_ATOMICS:
        return "atomic"
    if ins.base in _TMA:
        return "tma"
    return None


def access_bits(ins: Instr) -> int:
    """Bits one thread moves with a memory instruction: its width modifier (.U16, .64, .128...), else 32."""
    for token in ins.modifiers:
        if token in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[token]
    return 32


def global_accesses(instrs: Sequence[Instr], loop_trips: Sequence[float]) -> List[GlobalAccess]:
    """The global-memory instructions of the executed code (LDG/STG, generic LD/ST, cp.async LDGSTS,
    atomics, TMA) with their widths and weights. TMA instructions move a whole box: their bits are 0."""
    found = []
    for ins, weight in instruction_weights(instrs, loop_trips):
        kind = _access_kind(ins)
        if kind is not None:
            found.append(GlobalAccess(kind, 0 if kind == "tma" else access_bits(ins), weight, ins))
    return found


def barrier_count(instrs: Sequence[Instr], loop_trips: Sequence[float]) -> float:
    """Block-wide barriers one thread waits at (BAR.SYNC, BAR.RED; not BAR.ARV), weighted by loops."""
    return sum(
        weight for ins, weight in instruction_weights(instrs, loop_trips)
        if ins.base == "BAR" and "ARV" not in ins.modifiers
    )


def _registers(text: str) -> set:
    regs = set()
    for found in _REGISTER.finditer(text):
        first = int(found.group(1))
        width = {None: 1, "64": 2, "128": 4}[found.group(2)]
        regs.update(range(first, first + width))
    return regs


def _load_destinations(ins: Instr) -> set:
    """Registers a global load writes (LDGSTS writes shared memory: none)."""
    if ins.base == "LDGSTS" or not ins.operands:
        return set()
    found = _REGISTER.match(ins.operands[0].lstrip("-|~"))
    if not found:
        return set()
    first = int(found.group(1))
    return set(range(first, first + max(1, access_bits(ins) // 32)))


def load_groups(instrs: Sequence[Instr], loop_trips: Sequence[float]) -> List[LoadGroup]:
    """Groups of global loads issued back to back before any of their results is touched.

    Walking each basic block of the executed code, a group collects global loads (LDG, LD, LDGSTS) until an
    instruction mentions a register one of them writes (for LDGSTS: until a DEPBAR wait), or the block ends
    (a branch, a branch target, EXIT/RET/CALL). A group's bytes are the bits of its loads / 8 for one
    thread; predicated loads count as issued.
    """
    weighted = instruction_weights(instrs, loop_trips)
    targets = {ins.target for ins, _ in weighted if ins.target is not None}
    groups: List[LoadGroup] = []
    current: List[Tuple[Instr, float]] = []
    pending: set = set()

    def close():
        nonlocal current, pending
        if current:
            groups.append(LoadGroup(current[0][0].addr, len(current),
                                    sum(access_bits(ins) for ins, _ in current) // 8, current[0][1]))
        current, pending = [], set()

    for ins, weight in weighted:
        if ins.addr in targets:
            close()
        if current and (ins.base == "DEPBAR" or (pending & _registers(ins.text))):
            close()
        if ins.base in _GLOBAL_LOADS:
            current.append((ins, weight))
            pending |= _load_destinations(ins)
        if ins.base in _BRANCHES + _ENDS + ("CALL",):
            close()
    close()
    return groups


def loads_before_first_use(instrs: Sequence[Instr], loop_trips: Sequence[float]) -> InFlight:
    """Load bytes one thread has in flight: the largest :func:`load_groups` group (of executed weight > 0)
    and the mean group size seen by a loaded byte (groups weighted by weight x bytes)."""
    groups = tuple(group for group in load_groups(instrs, loop_trips) if group.weight > 0)
    if not groups:
        return InFlight(0, 0.0, ())
    loaded = sum(group.weight * group.bytes for group in groups)
    mean = sum(group.weight * group.bytes * group.bytes for group in groups) / loaded if loaded else 0.0
    return InFlight(max(group.bytes for group in groups), mean, groups)


def loop_summary(instrs: Sequence[Instr]) -> str:
    """One line per loop (index, address range, instructions, global loads/stores, barriers, first
    instructions): what a target author reads to assign trip counts."""
    code = executed(instrs)
    lines = []
    for index, loop in enumerate(find_loops(instrs)):
        body = [ins for ins in code if loop.holds(ins.addr)]
        kinds = [_access_kind(ins) for ins in body]
        bars = sum(1 for ins in body if ins.base == "BAR")
        head = "; ".join(ins.text for ins in body[:3])
        lines.append(f"loop {index}: 0x{loop.start:x}-0x{loop.end:x} {len(body)} instrs, "
                     f"{kinds.count('load')} loads, {kinds.count('store')} stores, {bars} barriers | {head}")
    return "\n".join(lines)


def triton_bin_dir() -> Optional[Path]:
    """The folder of the ptxas / cuobjdump / nvdisasm that Triton's wheel ships, when Triton is installed."""
    try:
        import triton
    except ImportError:
        return None
    folder = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"
    return folder if folder.is_dir() else None


def _tool(name: str) -> str:
    import shutil

    folder = triton_bin_dir()
    if folder is not None and (folder / name).exists():
        return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (neither in Triton's wheel nor on PATH)")
    return found


def disassemble(cubin: Path) -> Dict[str, str]:
    """SASS of every function of a cubin (``nvdisasm -c``), by mangled name."""
    result = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True)
    return split_functions(result.stdout)


def resource_usage(cubin: Path) -> Dict[str, Dict[str, int]]:
    """``cuobjdump -res-usage``: {function: {"REG", "STACK", "SHARED", "LOCAL", ...}} for every function."""
    result = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                            check=True)
    usage: Dict[str, Dict[str, int]] = {}
    name = None
    for line in result.stdout.splitlines():
        header = re.match(r"\s*Function\s+(\S+?):\s*$", line)
        if header:
            name = header.group(1)
            continue
        if name is not None and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"([A-Z_]+)(?:\[\d+\])?:(\d+)", line)}
            name = None
    return usage
