"""Errors raised by the compiled ops must reach Python as exceptions, never crash the process.

Each case runs in a fresh interpreter (a crash must not take the check with it): a C++
TORCH_CHECK failure of a CPU op, of the CUDA binding called directly, and of the op through the
dispatcher on a CUDA tensor. A case that dies of a signal is re-run under cuda-gdb (or gdb), when
one is installed, to print the native stack. Part of tools/gpu_check.sh; runs without a GPU too
(the CUDA cases then report "skipped")."""
from __future__ import annotations

import shutil
import subprocess
import sys

CASES = {
    "cpu op": "torch.ops.localsgd_comm.quantize(torch.randn(100), 'int8', 100, None, 0)",
    "cuda binding, cpu tensor": "localsgd_comm._C.cuda_quantize(torch.randn(100), 'int8', 100, None, 0)",
    "cuda op, cuda tensor": "torch.ops.localsgd_comm.quantize(torch.randn(100, device='cuda'), 'int8', 100, None, 0)",
}
PRELUDE = ("import sys, torch, localsgd_comm\n"
           "if {needs_cuda} and not (torch.cuda.is_available() and getattr(localsgd_comm._C, 'with_cuda', False)):\n"
           "    print('skipped: no CUDA build or no GPU'); sys.exit(0)\n"
           "try:\n    {call}\nexcept RuntimeError as e:\n    print('RuntimeError:', str(e).splitlines()[0]); sys.exit(0)\n"
           "print('no error raised'); sys.exit(3)\n")


def main() -> int:
    bad = 0
    for name, call in CASES.items():
        code = PRELUDE.format(needs_cuda="cuda" in name, call=call)
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           timeout=120)
        out = (r.stdout + r.stderr).strip().splitlines()
        print(f"error check [{name}]: exit {r.returncode}: {out[-1] if out else ''}")
        if r.returncode != 0:
            bad += 1
            print("\n".join(out[-30:]))
            dbg = shutil.which("cuda-gdb") or shutil.which("gdb")
            if r.returncode < 0 and dbg:
                g = subprocess.run([dbg, "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c",
                                    code], capture_output=True, text=True, timeout=300)
                print(f"--- native stack ({dbg}) ---\n" + "\n".join((g.stdout + g.stderr).splitlines()[-60:]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
