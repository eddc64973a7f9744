"""Static sm_90a report of the CUDA relative-attention kernels (RMHA-k and time intervals), without
a GPU: registers, spills and SASS from ``nvcc -arch=sm_90a -Xptxas -v`` (the machinery of
static_report.py), the dynamic shared memory each kernel asks for at a shape (the kernels' own
layout code, compiled for the host), and the occupancy and waves these allow on an H200::

    python3 benchmarks/cuda_relattn_static.py --out DIR [--csrc OLD_CSRC_DIR --label before]

Shapes: S1 = B512 h2 L50 dh32, S2 = B256 h2 L200 dh64, S3 = B128 h1 L75 dh90, each with RMHA-4
(R = 9 buckets) and time intervals with K = 256 (R = 257). ``--csrc`` reports another copy of
the sources (e.g. ``git archive`` of an older commit) for a before/after comparison; sources
without the time-interval kernels report RMHA only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import static_report as sr  # noqa: E402

SOURCES = ("relative_attention_fwd.cu", "relative_attention_bwd.cu")
DTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
BUCKETS = {"rmha-4": 9, "tisas K=256": 257}

# Prints "dtype kind R dh fwd_bytes bwd_bytes fwd_rows_per_block kv_keys_per_block dq_rows_per_block"
# from the kernels' own layouts (attention.cuh), compiled for the host with the CPU emulation headers.
PROBE = r"""
#include <cstdio>
#include "attention.cuh"
using namespace fastpe;
using namespace fastpe::attn;
template <typename T, bool kTime> void show(const char* name, int R, int dh) {
  RmhaParams p; p.dh = dh; p.dv = dh; p.NB = R;
  const Dims d = make_dims(p);
#ifdef FASTPE_NEW_LAYOUT
  using Ti = Tiles<T, kTime>;
  const long long f = FwdLayout<T, Ti::kFwdQ, Ti::kFwdK, kTime>(d).total;
  const long long a = BwdLayout<T, Ti::kKvQ, Ti::kKvK, Role::kKv, kTime>(d).total;
  const long long b = BwdLayout<T, Ti::kDqQ, Ti::kDqK, Role::kDq, kTime>(d).total;
#else
  using Ti = Tiles<T>;  // before the time-interval kernels
  const long long f = FwdLayout<T, Ti::kFwdQ, Ti::kFwdK>(d).total;
  const long long a = BwdLayout<T, Ti::kKvQ, Ti::kKvK, Role::kKv>(d).total;
  const long long b = BwdLayout<T, Ti::kDqQ, Ti::kDqK, Role::kDq>(d).total;
#endif
  std::printf("%s %d %d %d %lld %lld %d %d %d\n", name, kTime ? 1 : 0, R, dh, f, a > b ? a : b, Ti::kFwdQ, Ti::kKvK, Ti::kDqQ);
}
int main() {
  const int Rs[] = {%RS%};
  const int dhs[] = {32, 64, 90};
  for (int R : Rs) for (int dh : dhs) {
    if (R > 9) {  // the time-interval kernels (K = 256)
      show<__nv_bfloat16, true>("bf16", R, dh); show<__half, true>("fp16", R, dh); show<float, true>("fp32", R, dh); }
    else { show<__nv_bfloat16, false>("bf16", R, dh); show<__half, false>("fp16", R, dh); show<float, false>("fp32", R, dh); }
  }
}
"""


def _cuda_include() -> pathlib.Path:
    import os

    nvcc = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 str(pathlib.Path(nvcc).resolve().parent.parent)):
        if root and (pathlib.Path(root) / "include" / "cuda_fp16.h").is_file():
            return pathlib.Path(root) / "include"
    raise SystemExit("cuda_fp16.h not found (set CUDA_HOME)")


def layouts(csrc: pathlib.Path, new_layout: bool) -> dict:
    rs = ", ".join(str(r) for r in (BUCKETS.values() if new_layout else (9,)))
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "probe.cpp"
        src.write_text(PROBE.replace("%RS%", rs))
        exe = pathlib.Path(tmp) / "probe"
        cmd = ["g++", "-std=c++17", "-O0", "-DFASTPE_EMULATION=1", "-w", f"-I{csrc}", f"-I{_cuda_include()}",
               str(src), "-o", str(exe)]
        if new_layout:
            cmd.insert(3, "-DFASTPE_NEW_LAYOUT=1")
        subprocess.run(cmd, check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        name, kind, r, dh, fwd, bwd, fq, kvk, dqq = line.split()
        table[(name, int(r), int(dh))] = tuple(int(x) for x in (fwd, bwd, fq, kvk, dqq))
    return table


def kernels(csrc: pathlib.Path) -> dict:
    """{(direction, kind, dtype): ptxas/SASS record} for the attention kernels of ``csrc``."""
    old_root = sr.ROOT
    sr.ROOT = csrc.parent
    try:
        records = [r for s in SOURCES for r in sr.compile_cuda(s)]
    finally:
        sr.ROOT = old_root
    out = {}
    for r in records:
        kind = "tisas K=256" if "TimeBuckets" in r["kernel"] else "rmha-4"
        out[(r["direction"], kind, r["dtype"])] = r
    return out


def report(csrc: pathlib.Path, label: str) -> list[dict]:
    new_layout = "TimeBuckets" in (csrc / "attention.cuh").read_text()
    mem = layouts(csrc, new_layout)
    ks = kernels(csrc)
    rows = []
    for shape, (b, h, L, dh) in sr.SHAPES.items():
        for kind, R in BUCKETS.items():
            for dtype in DTYPES:
                if (dtype, R, dh) not in mem:
                    continue
                fwd_b, bwd_b, fwd_q, kv_k, dq_q = mem[(dtype, R, dh)]
                for direction, smem in (("fwd", fwd_b), ("bwd", bwd_b)):
                    k = ks.get((direction, kind, dtype))
                    if k is None:
                        continue
                    ctas = sr.occupancy(k["registers"], smem, 4)
                    # time-interval dq blocks own a whole sequence (csrc/README.md)
                    dq_blocks = b * h if kind != "rmha-4" and new_layout else b * h * -(-L // dq_q)
                    blocks = b * h * (-(-L // fwd_q)) if direction == "fwd" else b * h * -(-L // kv_k) + dq_blocks
                    rows.append(dict(label=label, shape=shape, dims=[b, h, L, dh], buckets=kind, dtype=dtype,
                                     direction=direction, kernel=k["kernel"], registers=k["registers"],
                                     spill_bytes=k["spill_bytes"], stack_bytes=k["stack_bytes"], shared_bytes=smem,
                                     ctas_per_sm=ctas, blocks=blocks,
                                     waves=round(blocks / (ctas * sr.MACHINE["sms"]), 2) if ctas else None,
                                     sass_instructions=k["sass_instructions"],
                                     tensor_core_instructions=k["tensor_core_instructions"]))
    return rows


def markdown(rows: list[dict], label: str) -> str:
    lines = [f"# CUDA relative-attention kernels, static sm_90a report ({label})", "",
             "`python3 benchmarks/cuda_relattn_static.py` (nvcc -arch=sm_90a -Xptxas -v; dynamic shared memory from the "
             "kernels' layouts; CTAs/SM and waves on an H200, 132 SMs, 4 warps per CTA). S1 = B512 h2 L50 dh32, "
             "S2 = B256 h2 L200 dh64, S3 = B128 h1 L75 dh90; `rmha-4`: R = 9 buckets, `tisas K=256`: R = 257. "
             "smem: the dynamic shared memory of one block; blocks: the grid (backward: kv + dq blocks); SASS and "
             "TC: instructions and tensor-core instructions of the whole kernel.", ""]
    lines += ["| sources | shape | buckets | dtype | dir | kernel | regs | spill B | stack B | smem KiB | CTAs/SM | "
             "blocks | waves | SASS | TC |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['shape']} | {r['buckets']} | {r['dtype']} | {r['direction']} | "
                     f"`{r['kernel']}` | {r['registers']} | {r['spill_bytes']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} | {r['blocks']} | {r['waves']} | "
                     f"{r['sass_instructions']} | {r['tensor_core_instructions']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder for cuda_relattn_sm90.{md,json}")
    parser.add_argument("--csrc", type=pathlib.Path, default=sr.ROOT / "csrc", help="the csrc/ folder to report")
    parser.add_argument("--label", default="this commit", help="name of these sources in the table")
    args = parser.parse_args(argv)
    if shutil.which("nvcc") is None or shutil.which("g++") is None:
        parser.error("nvcc and g++ must be on PATH")
    if not (args.csrc / "attention.cuh").is_file():
        parser.error(f"--csrc {args.csrc}: no attention.cuh there")
    rows = report(args.csrc.resolve(), args.label)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cuda_relattn_sm90" if args.label == "this commit" else f"cuda_relattn_sm90_{args.label}"
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(rows, args.label))
    print(markdown(rows, args.label))


if __name__ == "__main__":
    main()
