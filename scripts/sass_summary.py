"""Per-kernel register use and key SASS instruction counts of a CUDA binary.

Reads a shared library, executable or cubin with ``cuobjdump -res-usage`` and
``cuobjdump --dump-sass`` and prints, for each kernel of each architecture:
registers, stack, shared and local memory, then counts of the instructions that
tell which path the compiler took: HMMA (mma.sync tensor cores), HGMMA (Hopper
wgmma), LDGSTS (cp.async), LDSM (ldmatrix), UTMALDG (TMA tile loads) and
LDL/STL (local memory: spills or arrays indexed at run time).

    python scripts/sass_summary.py path/to/_C.so [--arch sm_90] [--cuobjdump PATH]

cuobjdump is taken from --cuobjdump, else $CUOBJDUMP, else the copy the triton
package carries, else the PATH; a candidate that fails or finds no kernels is
passed over for the next.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

COLUMNS = ["HMMA", "HGMMA", "LDGSTS", "LDSM", "UTMALDG", "LDL", "STL"]
RESOURCES = ["REG", "STACK", "SHARED", "LOCAL"]

_ARCH = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
_CODE_FOR = re.compile(r"^\s*code for (sm_\w+)")
_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_VALUES = re.compile(r"\b([A-Z]+(?:\[\d+\])?):(\d+)")
# "/*0140*/   @!P0 LDGSTS.E.BYPASS.128 [R7], desc[UR8][R4.64] ;"
_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.\s;]")


@dataclass
class Kernel:
    """One kernel of one architecture."""

    arch: str
    name: str
    resources: dict[str, int] = field(default_factory=dict)
    ops: collections.Counter = field(default_factory=collections.Counter)


def cuobjdump_candidates(explicit: str | None = None) -> list[str]:
    """cuobjdump executables to try, in order of preference."""
    found: list[str] = []
    for path in (explicit, os.environ.get("CUOBJDUMP")):
        if path and not os.access(path, os.X_OK):
            print(f"note: {path} is not an executable; trying the others", file=sys.stderr)
        elif path:
            found.append(path)
    try:
        import triton

        found.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:  # triton missing or broken: the PATH's copy will do
        pass
    on_path = shutil.which("cuobjdump")
    if on_path:
        found.append(on_path)
    seen: set[str] = set()
    return [p for p in found if os.path.isfile(p) and os.access(p, os.X_OK) and not (p in seen or seen.add(p))]


def parse_res_usage(lines: Iterable[str]) -> dict[tuple[str, str], dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {(arch, mangled name): {"REG": n, ...}}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch, func = "?", None
    for line in lines:
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _RES_FUNC.match(line):
            func = m.group(1)
        elif func is not None and "REG:" in line:
            out[(arch, func)] = {k: int(v) for k, v in _RES_VALUES.findall(line)}
            func = None
    return out


def parse_sass(lines: Iterable[str]) -> Iterator[Kernel]:
    """``cuobjdump --dump-sass`` output -> one Kernel per function, with its opcode counts."""
    arch, cur = "?", None
    for line in lines:
        if m := _SASS_FUNC.match(line):
            if cur is not None:
                yield cur
            cur = Kernel(arch, m.group(1))
        elif m := _INSTR.match(line):
            if cur is not None:
                cur.ops[m.group(1)] += 1
        elif (m := _ARCH.match(line)) or (m := _CODE_FOR.match(line)):
            if cur is not None:
                yield cur
                cur = None
            arch = m.group(1)
    if cur is not None:
        yield cur


def _run(cuobjdump: str, flag: str, path: str) -> list[str]:
    res = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{cuobjdump} {flag} failed ({res.returncode}): {res.stderr.strip()[:500]}")
    return res.stdout.splitlines()


def summarize(path: str, cuobjdump: str) -> list[Kernel]:
    """The kernels in ``path``, their resources and opcode counts, using this cuobjdump."""
    kernels = list(parse_sass(_run(cuobjdump, "--dump-sass", path)))
    resources = parse_res_usage(_run(cuobjdump, "-res-usage", path))
    for k in kernels:
        # A bare cubin's -res-usage names no architecture.
        k.resources = resources.get((k.arch, k.name)) or resources.get(("?", k.name), {})
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled names through c++filt where there is one."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    if res.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out, strict=True))


def _collapse(name: str, max_depth: int) -> str:
    """Replaces template arguments nested deeper than ``max_depth`` by an ellipsis."""
    out, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
            if depth <= max_depth:
                out.append(ch)
            elif depth == max_depth + 1:
                out.append("<…")
        elif ch == ">":
            if depth <= max_depth + 1:
                out.append(ch)
            depth -= 1
        elif depth <= max_depth:
            out.append(ch)
    return "".join(out)


def shorten(name: str, width: int) -> str:
    """A kernel's demangled name cut to ``width``: no "void " or parameter list, then less template detail."""
    if name.startswith("void "):
        name = name[5:]
    if name.endswith(")"):
        # Drops the parameter list: kernels differ by their template arguments.
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i] if i > 0 else name
                break
    for max_depth in (99, 3, 2, 1):
        short = _collapse(name, max_depth)
        if len(short) <= width:
            return short
    return short[: width - 1] + "…"


def format_report(kernels: list[Kernel], full_names: bool = False, width: int = 110) -> str:
    """A fixed-width table: one row per kernel, then a note on kernels that use local memory."""
    names = demangle(sorted({k.name for k in kernels}))
    head = f"{'arch':<7}" + "".join(f"{c:>7}" for c in RESOURCES) + " |" + "".join(f"{c:>8}" for c in COLUMNS)
    head += f"{'instrs':>8}  kernel"
    lines = [head]
    local = []
    for k in sorted(kernels, key=lambda k: (k.arch, names[k.name])):
        res = "".join(f"{k.resources.get(c, '?'):>7}" for c in RESOURCES)
        ops = "".join(f"{k.ops.get(c, 0):>8}" for c in COLUMNS)
        name = names[k.name] if full_names else shorten(names[k.name], width)
        lines.append(f"{k.arch:<7}{res} |{ops}{sum(k.ops.values()):>8}  {name}")
        if k.ops.get("LDL", 0) or k.ops.get("STL", 0) or k.resources.get("LOCAL", 0):
            local.append(f"  {k.arch} {shorten(names[k.name], width)}")
    lines.append(f"{len(kernels)} kernels")
    if local:
        lines.append("uses local memory (LDL/STL: spills or arrays indexed at run time):")
        lines.extend(local)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the report; 1 if no cuobjdump could read a kernel out of the file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a .so, executable or .cubin")
    parser.add_argument("--cuobjdump", help="cuobjdump to use first")
    parser.add_argument("--arch", default="", help="only this architecture, e.g. sm_90")
    parser.add_argument("--full-names", action="store_true", help="do not shorten kernel names")
    parser.add_argument("--which", action="store_true", help="print the cuobjdump that would be tried first and exit")
    args = parser.parse_args(argv)
    candidates = cuobjdump_candidates(args.cuobjdump)
    if args.which:
        if not candidates:
            print("no cuobjdump found", file=sys.stderr)
            return 1
        print(candidates[0])
        return 0
    if not args.path:
        parser.error("path is required")
    if not os.path.isfile(args.path):
        print(f"error: no such file: {args.path}", file=sys.stderr)
        return 1
    if not candidates:
        print("error: no cuobjdump (not in triton, not on PATH); pass --cuobjdump", file=sys.stderr)
        return 1
    for cuobjdump in candidates:
        try:
            kernels = summarize(args.path, cuobjdump)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"note: {e}", file=sys.stderr)
            continue
        if args.arch:
            kernels = [k for k in kernels if k.arch == args.arch]
        if kernels:
            print(f"{args.path} (read with {cuobjdump})")
            print(format_report(kernels, args.full_names))
            return 0
        print(f"note: {cuobjdump} found no kernels{' for ' + args.arch if args.arch else ''}", file=sys.stderr)
    print(f"error: no device code found in {args.path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
