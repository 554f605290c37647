"""Scan convcore's compiled kernels for instructions that need an aligned address (x86-64).

    python3 scripts/check_misaligned_reads.py [path/to/_kernels*.so ...]

Why: the server computes on an input tensor where gRPC received it, even when the payload does not start at a
multiple of its item size (`server._codec.INPUT_MISALIGNED`). On x86-64 that is safe as long as no instruction
that demands alignment touches the input: the aligned moves (``vmovaps``, ``vmovapd``, ``vmovdqa*``, ``movaps``...),
non-temporal loads and stores, and legacy-SSE (non-VEX) arithmetic with a memory operand (16-byte alignment). This
lists every such instruction whose address is not on the stack (``%rsp``/``%rbp``) or a constant (``%rip``), per
function, and exits 1 when one falls outside the known ones below (each explained). Run it after changing the
kernels, with ``objdump`` installed; tests/test_misaligned_scan.py runs it on every build the suite tests, and
tests/test_misaligned_inputs.py checks the same behaviourally.
"""
import collections
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ALIGNED_MOVES = re.compile(r"^v?mov(aps|apd|dqa|dqa32|dqa64|ntps|ntpd|ntdq|ntdqa)$")
#: Legacy-SSE instructions whose memory operand may be misaligned (scalar, unaligned moves, partial loads).
_SSE_UNALIGNED_OK = re.compile(r"^(movups|movupd|movdqu|movq|movd|movs[sd]|mov[lh]p[sd]|lddqu|pinsr[bwdq]|pextr[bwdq]|"
                               r"cvt\w+|u?comis[sd]|(add|sub|mul|div|max|min|sqrt)s[sd]|mov[sz]\w*|cvtsi2\w+)$")
_STACK_OR_CONSTANT = re.compile(r"\(%r(sp|bp|ip)\b")
#: (function name pattern, instruction pattern, why it is not an input read).
KNOWN = [
    (r"^cc_dw_nhwc_row_|^__pyx_pf_8convcore_8_kernels_\d+run\._omp_fn", r"^vmovnt",
     "depthwise NHWC output stores, non-temporal only after cc_dw_nhwc_row tested the output address"),
    (r"^cc_dw_nchw_plane_avx2_", r"^vmovdqa",
     "the per-column lane masks (CC_M mk[] on the stack, reached through a register)"),
    (r"^ccg_\w+_port_f(32|64)$", r"^add(ps|pd)$",
     "portable micro-kernels adding the edge tile (a local, aligned stack buffer) into C"),
]


def findings(path):
    """{function: Counter(mnemonic)} of the alignment-demanding memory accesses in `path`."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    found = collections.defaultdict(collections.Counter)
    function = None
    for line in out.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            function = m.group(1)
            continue
        m = re.match(r"^\s+[0-9a-f]+:\s+([a-z0-9]+)\s+(.*)$", line)
        if not m or "(" not in m.group(2) or _STACK_OR_CONSTANT.search(m.group(2)):
            continue
        op, args = m.groups()
        if _ALIGNED_MOVES.match(op) or (not op.startswith("v") and "%xmm" in args
                                        and not _SSE_UNALIGNED_OK.match(op)):
            found[function][op] += 1
    return found


def explained(function, op):
    """Why `op` in `function` is not an input read (a line of KNOWN), or None."""
    return next((w for f, o, w in KNOWN if re.search(f, function) and re.search(o, op)), None)


def main(argv):
    paths = argv or glob.glob(os.path.join(ROOT, "convcore", "_kernels*.so"))
    if not paths:
        print("no convcore/_kernels*.so: build the extensions first", file=sys.stderr)
        return 2
    unknown = 0
    for path in paths:
        print(f"{path}:")
        for function, ops in sorted(findings(path).items()):
            for op, n in sorted(ops.items()):
                why = explained(function, op)
                unknown += why is None
                print(f"  {'known' if why else 'CHECK'}  {function[:70]:70s} {op:10s} x{n}"
                      + (f"  ({why})" if why else ""))
    print("every alignment-demanding access is a known one" if not unknown else
          f"{unknown} unexplained: read the code; if one can touch an input tensor, the server must copy "
          f"misaligned inputs (server._codec.INPUT_MISALIGNED = 'copy')")
    return 1 if unknown else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
