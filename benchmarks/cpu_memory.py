"""Peak memory of a CPU workload, measured in a fresh process.

PyTorch keeps no allocator statistics for the CPU, so this runs the workload in a child process,
resets the kernel's peak-resident-set counter once the inputs exist (``/proc/self/clear_refs``),
and reports how far the peak (``VmHWM``) rose above the resident set at that moment. Transient
memory of imports and setup therefore does not hide the workload's own peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHILD = """
import json, torch
torch.set_num_threads({threads})

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

{setup}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
base = status_kib("VmRSS")
{run}
print(json.dumps({{"peak_extra_kib": status_kib("VmHWM") - base}}))
"""


def peak_extra_mib(setup: str, run: str, threads: int = 2) -> float:
    """MiB the peak resident memory grew while ``run`` executed after ``setup`` (Python source)."""
    code = _CHILD.format(setup=textwrap.dedent(setup), run=textwrap.dedent(run), threads=threads)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_kib"] / 1024.0
