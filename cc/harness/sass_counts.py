"""SASS instructions per element of the dense CUDA kernels, by pipe.

For reading the machine code of cc/kernels/bf16_update_kernels.cu.h without a
GPU: build the harness for sm_90 (cc/harness/build.sh OUT gpu, needs only
nvcc), then

    python3 cc/harness/sass_counts.py OUT [--cuobjdump PATH] [--json FILE]

It disassembles every vectorised DenseKernel (cuobjdump -sass), finds its main
loop (the loop with the most 128-bit global loads: the grid-stride loop over
chunks of 8 elements), counts the instructions of that loop by class and
divides by the elements one trip of the loop handles (8 per chunk; the number
of chunks per trip is read off the 128-bit loads). The scalar tail, the
set-up outside the loop and the out-of-line slow paths of IEEE division and
square root (jumped over unless an operand is out of range) are left out:
the counts are of the path every element takes.

Classes (sm_90 issue pipes): int = ALU integer and logic (IADD3, LOP3, SHF,
ISETP, SEL, PRMT, LEA, VIADD, ...), imad = IMAD* (the FMA pipe's integer
multiply-add, also used for moves and shifts), fp32 = FADD/FMUL/FFMA/FSETP/
FSEL/FMNMX/FCHK, conv = F2FP/F2F/I2F/F2I/MUFU (conversions and the special
function unit), mem = LDG/STG, other = branches, moves, uniform-datapath (U*)
and the rest. Figures describe code, not time: the harness measures time.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys

CLASSES = ("int", "imad", "fp32", "conv", "mem", "other")

_INT = {"IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "SEL", "PRMT", "LEA",
        "VIADD", "IMNMX", "VIMNMX", "IABS", "POPC", "FLO", "BMSK", "BREV", "SGXT", "PLOP3",
        "ICMP", "IMNMX", "VIADDMNMX", "BFE", "BFI"}
_FP32 = {"FADD", "FMUL", "FFMA", "FSETP", "FSEL", "FMNMX", "FCHK", "FSET", "FSWZADD"}
_CONV = {"F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND", "MUFU"}
_MEM = {"LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL"}

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?\s*(.*?);")


def classify(opcode):
    if opcode.startswith("IMAD"):
        return "imad"
    if opcode in _INT:
        return "int"
    if opcode in _FP32:
        return "fp32"
    if opcode in _CONV:
        return "conv"
    if opcode in _MEM:
        return "mem"
    return "other"


def functions(sass_text):
    """{mangled name: [(address, opcode, modifiers, operands)]}."""
    result, current = {}, None
    for line in sass_text.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            result[current] = []
            continue
        if current is None:
            continue
        m = _INSTRUCTION.search(line)
        if m:
            result[current].append((int(m.group(1), 16), m.group(3), m.group(4) or "",
                                    m.group(5)))
    return result


def main_loop(instructions):
    """The (first, last) address range of the innermost loop with the most
    128-bit loads (a loop around other loops that load, such as the one over
    2^32-element blocks, does not count)."""
    loops = []
    for address, opcode, _, operands in instructions:
        if opcode != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if not target or int(target.group(1), 16) >= address:
            continue
        first = int(target.group(1), 16)
        loads = sum(1 for a, op, mod, _ in instructions
                    if first <= a <= address and op == "LDG" and ".128" in mod)
        if loads:
            loops.append((first, address, loads))
    innermost = [(f, l, n) for f, l, n in loops
                 if not any(f <= f2 and l2 <= l and (f2, l2) != (f, l) for f2, l2, _ in loops)]
    if not innermost:
        return None
    first, last, _ = max(innermost, key=lambda loop: (loop[2], -(loop[1] - loop[0])))
    return first, last


def slow_paths(instructions, loop):
    """Address ranges (exclusive) that a forward branch inside the loop jumps over
    and that contain a CALL: the out-of-line slow paths of IEEE division and
    square root (taken only for operands out of the fast path's range). They are
    left out of the counts, which describe the path every element takes."""
    calls = [a for a, op, _, _ in instructions if op == "CALL"]
    ranges = []
    for address, opcode, _, operands in instructions:
        if opcode != "BRA" or not loop[0] <= address <= loop[1]:
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if not target:
            continue
        t = int(target.group(1), 16)
        if t > address and any(address < c < t for c in calls):
            ranges.append((address, t))
    return ranges


def demangle(names, cxxfilt):
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


_ROUNDING = {"0": "nearest", "1": "stochastic", "2": "kahan"}


def describe(demangled):
    """(case label, 128-bit loads per chunk) of a DenseKernel<8, Update>, else None."""
    m = re.search(r"DenseKernel<8, (?:(\d+), )?tf_bf16::kernels::(\w+)<?(.*?)>? >\(", demangled)
    if not m:
        return None
    trip = f" K={m.group(1)}" if m.group(1) else ""
    kind, args = m.group(2), [a.strip() for a in m.group(3).split(",")] if m.group(3) else []
    dtype = {"unsigned short": "bf16", "float": "f32"}
    width = {"bf16": 1, "f32": 2}

    def rounding(a):
        return _ROUNDING[re.search(r"\)(\d)", a).group(1)]

    if kind == "StochasticRoundUpdate":
        return "stochastic_round f32->bf16" + trip, 2
    if kind == "AssignAddUpdate":
        r, s, d = rounding(args[0]), dtype[args[1]], dtype[args[2]]
        loads = width[s] + width[d] + (1 if r == "kahan" else 0)
        return f"rounded_assign_add {s}/{d} {r}" + trip, loads
    if kind == "SgdUpdate":
        r, momentum, constant, nesterov, decay = rounding(args[0]), *(a == "true" for a in args[1:5])
        s, g = dtype[args[5]], dtype[args[6]]
        name = "sgd" + ("_nesterov" if nesterov else "_momentum" if momentum else "") + \
            ("_wd" if decay else "")
        loads = width[s] * (2 if momentum else 1) + width[g] + (1 if r == "kahan" else 0)
        return f"{name} {s}/{g} {r}" + trip, loads
    if kind == "AdamUpdate":
        r, amsgrad, constant, decay = rounding(args[0]), *(a == "true" for a in args[1:4])
        s, g = dtype[args[4]], dtype[args[5]]
        name = ("adamw" if decay else "adam") + ("_amsgrad" if amsgrad else "")
        loads = width[s] * (4 if amsgrad else 3) + width[g] + (1 if r == "kahan" else 0)
        return f"{name} {s}/{g} {r}" + trip, loads
    if kind == "LionUpdate":
        r, constant, decay = rounding(args[0]), *(a == "true" for a in args[1:3])
        s, g = dtype[args[3]], dtype[args[4]]
        loads = width[s] * 2 + width[g] + (1 if r == "kahan" else 0)
        return f"lion{'_wd' if decay else ''} {s}/{g} {r}" + trip, loads
    return None


def count(binary, cuobjdump, cxxfilt):
    sass = subprocess.run([cuobjdump, "-sass", binary], capture_output=True, text=True,
                          check=True).stdout
    funcs = functions(sass)
    names = demangle(list(funcs), cxxfilt)
    rows = {}
    for mangled, instructions in funcs.items():
        described = describe(names[mangled])
        if not described:
            continue
        label, loads_per_chunk = described
        loop = main_loop(instructions)
        if loop is None:
            continue
        slow = slow_paths(instructions, loop)
        body = [(op, mod) for a, op, mod, _ in instructions
                if loop[0] <= a <= loop[1] and not any(f < a < t for f, t in slow)]
        wide_loads = sum(1 for op, mod in body if op == "LDG" and ".128" in mod)
        chunks = max(1, wide_loads // loads_per_chunk)
        elements = 8 * chunks
        counts = collections.Counter(classify(op) for op, _ in body)
        row = {c: counts[c] / elements for c in CLASSES}
        row["total"] = len(body) / elements
        row["elements_per_trip"] = elements
        rows.setdefault(label, row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", help="the harness built for sm_90 (cc/harness/build.sh OUT gpu)")
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    parser.add_argument("--cxxfilt", default=shutil.which("c++filt") or "c++filt")
    parser.add_argument("--json", help="also write the table as JSON")
    parser.add_argument("--compare", help="a JSON written by an earlier run: print both")
    args = parser.parse_args(argv)
    rows = count(args.binary, args.cuobjdump, args.cxxfilt)
    before = json.load(open(args.compare)) if args.compare else {}
    header = f"{'kernel (main loop, per element)':44s}" + "".join(f"{c:>7s}" for c in CLASSES) + \
        f"{'total':>7s}"
    print(header + ("   total before" if before else ""))
    for label in sorted(rows):
        row = rows[label]
        line = f"{label:44s}" + "".join(f"{row[c]:7.2f}" for c in CLASSES) + f"{row['total']:7.2f}"
        old = before.get(label) or before.get(label.rsplit(" K=", 1)[0])
        if old:
            line += f"   {old['total']:7.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
