"""Compile every Triton kernel launch the recipes make for A100 (sm_80) and H100 (sm_90), on a CPU.

No GPU has to run a kernel to learn whether it fits one: Triton compiles for any target, and the
shared memory a program needs is known after its LLVM stage (before ptxas). This script

1. captures the launches: a one-layer Llama per method setting (supra, lolcats sliding / sliding +
   sinks / terrace + sinks, t2r, gla, gdn, the token-mix variants), head dim 64 (SmolLM2: 9 heads)
   and 128 (Llama-7B: 32 heads), in a bf16 and a float32 model, runs forward, backward and a decode
   step through backend=triton under the interpreter with every kernel launch recorded instead of
   run. What is compiled is exactly what the layers launch: no second copy of the tile choices;
2. lowers each distinct launch for each target through Triton's own stages to LLVM IR (shared
   memory) and, with --ptxas, on to a cubin through ptxas -v (registers, spill bytes, the
   tensor-core instruction in the PTX), each compile in a worker process with a time bound;
3. writes benchmarks/results/compile/kernels.json (kernel x target x launch) and prints a table.
   Exit status 1 when a launch does not compile, exceeds a target's shared memory per block, or
   (with --ptxas) spills in a bf16 model beyond the documented exceptions in SPILL_EXCEPTIONS.

    python scripts/compile_sweep.py                 # shared memory only, ~1-2 minutes on 2 cores
    python scripts/compile_sweep.py --ptxas         # + registers and spills (ptxas), longer
    python scripts/compile_sweep.py --ptxas-only "triton_hybrid bfloat16"
        # every launch's shared memory; ptxas for the launches whose "module.kernel label" holds every word
        # (each row of the JSON says "ptxas": true or false)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Shared memory per block with the opt-in carve-out (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 166912, 90: 232448}
# One layer's settings per method the recipes use (window 64 and 4 sinks as in the recipes).
SPECS = {
    "supra": {"method": "supra"},
    "t2r": {"method": "t2r"},
    "lolcats-sliding": {"method": "lolcats"},
    "lolcats-sliding-sinks": {"method": "lolcats", "sinks": 4},
    "lolcats-terrace-sinks": {"method": "lolcats", "window_kind": "terrace", "sinks": 4},
    "gla": {"method": "gla"},
    "gla-token-mix": {"method": "gla", "window_mix": "token", "window_kind": "terrace", "sinks": 4},
    "gdn": {"method": "gdn"},
    "gdn-token-mix": {"method": "gdn", "window_mix": "token", "window_kind": "terrace", "sinks": 4},
}
MODELS = {64: 9, 128: 16}  # head dim: heads (SmolLM2-135M has 9; 16 specialises as Llama-7B's 32 does)
# bf16-model launches allowed to spill under ptxas: (kernel, words that its launch label holds) -> the measured
# reason.
SPILL_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("triton_hybrid._dstates_kernel", "bfloat16"): "8 B on sm_80 at 168 registers: ptxas spills a register of the "
    "64 x 64 float32 state accumulator in the backward walk; negligible local-memory traffic",
    ("triton_hybrid._dkv_kernel", "bfloat16 BD=64"): "8-28 B at D = 64: ptxas spills a few registers of the "
    "64 x 32 score tiles beside the dk, dv, dfk accumulators at 8 warps; negligible local-memory traffic",
    ("triton_hybrid._dq_kernel", "bfloat16 BD=64"): "32 B at D = 64 on sm_80 (with sinks): a few registers of the "
    "64 x 32 score tiles beside the dq accumulator and the sink tile at 8 warps; negligible",
    ("triton_hybrid._dsinks_kernel", "bfloat16 BD=128"): "12 B on sm_90 (terrace): a few registers of the BK x D "
    "tiles at 4 warps; negligible",
    ("triton_hybrid._dkv_kernel", "bfloat16 BD=128"): "44-176 B at D = 128, F = 16 only (32 rows x 8 warps; "
    "F = 128 launches do not spill since 32 rows; 64 rows spilled 28-360 B): the dk, dv accumulators (32 x 128 "
    "float32) and two score tiles at 255 registers",
    ("triton_hybrid._dq_kernel", "bfloat16 BD=128"): "40-344 B at D = 128 with 32 rows x 8 warps (64 rows spilled "
    "88-26,438 B, ptxas falling back to 32 registers on one sm_80 launch; 4 warps 760-1,020 B): dq, the dfq "
    "accumulator and the score tiles at 255 registers",
    ("triton_hybrid._forward_kernel", "bfloat16 BD=128"): "432-832 B at D = 128 with sinks, F = 128 (32 rows x 8 "
    "warps; 64 rows spilled ~5.5 KB on sm_80 at 128 registers and 0 on sm_90; 4 warps 1,112-1,392 B): the "
    "32 x 128 numerator, the sink tile and the score tiles at 255 registers",
    ("triton_chunk._states_kernel", "bfloat16 DECAY=0"): "20 B on sm_90 (t2r, undecayed: 255 registers; the "
    "decayed launch of the same tiles takes 136 and does not spill): a register of the 64 x 64 float32 state "
    "accumulator beside the k, v tiles at 4 warps; negligible",
    ("triton_chunk._dv_kernel", "bfloat16 DECAY=0"): "8 B on sm_80 (t2r, undecayed: 255 registers; the decayed "
    "launch takes 192): one register of the dv accumulator beside the two score tiles; negligible",
}
# (kernel, target, start of the launch label) known to exceed the target's shared memory, with the reason
# (none at present). An entry that no longer matches an over-limit launch fails the check too, so the list
# stays true.
SHARED_EXCEPTIONS: dict[tuple[str, int, str], str] = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile")
    parser.add_argument("--ptxas", action="store_true", help="also run ptxas: registers and spills")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per compile")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ptxas-only", default=None, metavar="WORDS",
                        help="run ptxas only for launches whose 'module.kernel label' contains every word; the "
                        "others get the shared-memory pass, and the JSON still holds every launch")
    parser.add_argument("--only", default="", help="compile only launches whose kernel or label contains this "
                        "(e.g. bfloat16 with --ptxas: the spill check of the bf16 paths)")
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)  # the interpreter child
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# 1. Capture (runs in a child process with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------


def describe(value, constexpr: bool):
    """A launch argument as JSON, reduced to what Triton specialises a compile on: a tensor's dtype; for
    a runtime int, whether it is 1 or a multiple of 16 (a representative stands for its class, so
    sequence lengths and head counts that compile alike count once); a constexpr exactly."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if constexpr or value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return 1 if value == 1 else 16 if value % 16 == 0 else 3
    if isinstance(value, float):
        return 0.5
    raise TypeError(f"unexpected launch argument {type(value).__name__}")


def capture() -> list[dict]:
    """Every distinct launch of the wrappers for SPECS x MODELS x (bf16, float32) models."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    from triton.runtime.interpreter import InterpretedFunction

    from supra.layers.cache import cache_kwargs
    from supra.layers.linearize import LinearizeSpec, linearize

    launches: dict[str, dict] = {}
    context: dict = {}

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k not in names}
        # UPCAST is the interpreter's bf16 workaround (triton_common.dot); a GPU launch has it off.
        if "UPCAST" in values:
            values["UPCAST"] = False
        params = inspect.signature(self.fn).parameters
        entry = {"module": self.fn.__module__, "kernel": self.fn.__name__, "options": options,
                 "args": {k: describe(v, "constexpr" in str(params[k].annotation)) for k, v in values.items()}}
        key = json.dumps(entry, sort_keys=True)
        launches.setdefault(key, {**entry, "used_by": []})["used_by"].append(context["name"])

    InterpretedFunction.run = record  # launches are recorded, not run: outputs stay uninitialised
    torch.manual_seed(0)
    for head_dim, heads in MODELS.items():
        for dtype in (torch.bfloat16, torch.float32):
            for name, spec in SPECS.items():
                context["name"] = f"{name} D={head_dim} {str(dtype).removeprefix('torch.')}"
                config = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32,
                                     max_position_embeddings=512)
                model = LlamaForCausalLM(config).to(dtype)
                linearize(model, LinearizeSpec(**{**spec, "backend": "triton"}))
                ids = torch.randint(0, 32, (1, 256))
                model(ids).logits.float().sum().backward()
                with torch.no_grad():  # prefill with a state, then one decode step
                    cache = DynamicCache(config=model.config)
                    model(ids, **cache_kwargs(cache), use_cache=True)
                    model(ids[:, :1], **cache_kwargs(cache), use_cache=True)
    return list(launches.values())


# ----------------------------------------------------------------------------------------------
# 2. Compile one launch for one target (in a worker process, no interpreter)
# ----------------------------------------------------------------------------------------------


def _jit_source(launch: dict, target):
    """Triton's own JIT path (runtime/jit.py) from binding to ASTSource, for `target`."""
    import torch
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module = importlib.import_module(launch["module"])
    fn = getattr(module, launch["kernel"])
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32,
              "int64": torch.int64, "float16": torch.float16}
    args = {k: torch.empty(16, dtype=dtypes[v["tensor"]]) if isinstance(v, dict) else v
            for k, v in launch["args"].items()}
    bound, specialization, _ = binder(**args, **launch["options"])
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch["options"]), bound, specialization,
                                                          None)
    return ASTSource(fn, signature, constexprs, attrs), backend, options


def allocated_shared(module, backend, options, capability: int) -> int:
    """Shared bytes per program from TritonGPU IR: the passes of the nvidia backend's make_llir up to
    and including shared-memory allocation (triton/backends/nvidia/compiler.py, Triton 3.9), without
    the LLVM lowering and optimisation that make up most of a compile. Agrees with the full pipeline's
    metadata["shared"] (checked on every run: `shared_check` in the JSON)."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    pm = ir.pass_manager(module.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm, False)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, get_ptx_version_from_options(options,
                                                                                                   capability))
    pm.run(module, "allocated_shared")
    return module.get_int_attr("ttg.shared")


def lower(launch: dict, capability: int, ptxas: bool, timeout: float) -> dict:
    """Shared bytes after the LLVM stage; with `ptxas`, registers, spills and the tensor-core op."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    start = time.perf_counter()
    target = GPUTarget("cuda", capability, 32)
    src, backend, options = _jit_source(launch, target)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"target": target, **options.__dict__}
    for ext in ("ttir", "ttgir"):
        module = stages[ext](module, metadata)
    if ptxas:
        for ext in ("llir", "ptx"):
            module = stages[ext](module, metadata)
        shared = metadata["shared"]
    else:
        shared = allocated_shared(module, backend, options, capability)
    result = {"shared_bytes": shared, "num_warps": options.num_warps, "num_stages": options.num_stages}
    if ptxas:
        mma = re.search(r"\bmma\.sync", module)
        result["tensor_core_op"] = "wgmma" if "wgmma.mma_async" in module else "mma" if mma else None
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(module)
            cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(capability)}", str(ptx), "-o", str(ptx) + ".o"]
            try:
                log = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stderr
            except subprocess.TimeoutExpired:
                result["ptxas_timeout"] = True
                log = ""
        if log:
            result["registers"] = int(re.search(r"Used (\d+) registers", log).group(1))
            stores = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            result["spill_bytes"] = int(stores.group(1)) + int(stores.group(2))
    result["compile_seconds"] = round(time.perf_counter() - start, 2)
    return result


def compile_job(job: tuple[dict, int, bool, float]) -> dict:
    launch, capability, ptxas, timeout = job
    try:
        return lower(launch, capability, ptxas, timeout)
    except Exception as error:  # a launch that does not compile is a finding, reported per launch
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}


# ----------------------------------------------------------------------------------------------
# 3. Checks, table, JSON
# ----------------------------------------------------------------------------------------------


def launch_label(launch: dict) -> str:
    """The launch's constexprs and options in one short string (what tells two launches apart)."""
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    args = launch["args"]
    parts = [f"{k}={args[k]}" for k in args if k in constexpr]
    dtypes = sorted({v["tensor"] for v in args.values() if isinstance(v, dict)} - {"int32"})
    return " ".join(["/".join(dtypes)] + parts + [f"{k}={v}" for k, v in launch["options"].items()])


def known_over_limit(row: dict) -> tuple[str, int, str] | None:
    """The SHARED_EXCEPTIONS entry that covers this result, if any."""
    return next((key for key in SHARED_EXCEPTIONS
                 if key[:2] == (row["kernel"], row["target"]) and row["launch"].startswith(key[2])), None)


def spill_exception(row: dict) -> tuple[str, str] | None:
    """The SPILL_EXCEPTIONS entry that covers this result, if any."""
    return next((key for key in SPILL_EXCEPTIONS
                 if key[0] == row["kernel"] and all(word in row["launch"] for word in key[1].split())), None)


def problems(row: dict) -> list[str]:
    """Why a (launch, target) result fails the check; empty when it fits."""
    found = []
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    if row["shared_bytes"] > SHARED_LIMIT[row["target"]] and not known_over_limit(row):
        found.append(f"shared memory {row['shared_bytes']} B > {SHARED_LIMIT[row['target']]} B")
    if row.get("ptxas_timeout"):
        found.append("ptxas ran past the time bound")
    bf16 = "bfloat16" in row["launch"]
    if bf16 and row.get("spill_bytes", 0) > 0 and not spill_exception(row):
        found.append(f"spills {row['spill_bytes']} B in a bf16 model")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.capture:
        json.dump(capture(), sys.stdout)
        return 0
    sys.path.insert(0, str(REPO / "scripts"))
    from provenance import provenance

    # The compiles need Triton's JIT functions, which the interpreter replaces; the capture needs it.
    os.environ.pop("TRITON_INTERPRET", None)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.run([sys.executable, __file__, "--capture"], capture_output=True, text=True, env=env)
    if child.returncode:
        sys.stderr.write(child.stderr[-4000:])
        return 2
    launches = [x for x in json.loads(child.stdout)
                if args.only in x["kernel"] or args.only in launch_label(x)]
    targets = [int(x) for x in args.targets.split(",")]

    def wants_ptxas(launch: dict) -> bool:
        if args.ptxas_only is None:
            return args.ptxas
        name = f"{launch['module']}.{launch['kernel']} {launch_label(launch)}"
        return all(word in name for word in args.ptxas_only.split())

    jobs = [(launch, cc, wants_ptxas(launch), args.timeout) for launch in launches for cc in targets]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(compile_job, jobs))
    rows = []
    for (launch, cc, ptxas, _), result in zip(jobs, results):
        rows.append({"kernel": f"{launch['module'].rsplit('.', 1)[-1]}.{launch['kernel']}", "target": cc,
                     "launch": launch_label(launch), "launch_index": launches.index(launch),
                     "used_by": sorted(set(launch["used_by"])), "ptxas": ptxas, **result})
    # The shared-memory pass against the whole pipeline (LLVM, PTX, ptxas) on the launch that needs the most.
    if any(not r["ptxas"] for r in rows):
        top = max((r for r in rows if "shared_bytes" in r and not r["ptxas"]),
                  key=lambda r: (r["shared_bytes"], r["target"]))
        full = compile_job((launches[top["launch_index"]], top["target"], True, args.timeout))
        shared_check = {"kernel": top["kernel"], "target": top["target"], "launch": top["launch"],
                        "allocation_pass_bytes": top["shared_bytes"], "full_pipeline": full,
                        "agrees": full.get("shared_bytes") == top["shared_bytes"]}
        print(f"shared memory check on {top['kernel']} sm_{top['target']}: allocation pass {top['shared_bytes']} B, "
              f"full pipeline {full.get('shared_bytes', full)}")
    else:
        shared_check = None
    for row in rows:
        row["problems"] = problems(row)
    failing = [row for row in rows if row["problems"]]
    over = {known_over_limit(r) for r in rows if r.get("shared_bytes", 0) > SHARED_LIMIT[r["target"]]}
    stale = [key for key in SHARED_EXCEPTIONS if key not in over]
    for key in stale:
        print(f"SHARED_EXCEPTIONS entry {key} no longer exceeds the limit: remove it")
    width = max(len(r["kernel"]) for r in rows)
    print(f"{'kernel':{width}} sm  shared B  regs spill  tc     s  launch")
    for r in sorted(rows, key=lambda r: (r["kernel"], r["launch"], r["target"])):
        print(f"{r['kernel']:{width}} {r['target']} {r.get('shared_bytes', '-'):>9} {r.get('registers', '-'):>5} "
              f"{r.get('spill_bytes', '-'):>5} {str(r.get('tensor_core_op', '-')):>5} "
              f"{r.get('compile_seconds', '-'):>5}"
              f"  {r['launch']}{'  <- ' + '; '.join(r['problems']) if r['problems'] else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "compile_sweep", **provenance(), "limits_shared_bytes": SHARED_LIMIT,
              "spill_exceptions": [{"kernel": k[0], "launch_words": k[1], "reason": v}
                                   for k, v in SPILL_EXCEPTIONS.items()],
              "shared_exceptions": [{"kernel": k[0], "target": k[1], "launch": k[2], "reason": v}
                                    for k, v in SHARED_EXCEPTIONS.items()],
              "launches": len(launches), "compiles": len(rows),
              "ptxas": args.ptxas, "ptxas_only": args.ptxas_only,
              "ptxas_compiles": sum(r["ptxas"] for r in rows), "wall_seconds": round(time.perf_counter() - start, 1),
              "failing": len(failing), "shared_check": shared_check, "results": rows, "launch_records": launches}
    path = args.out / "kernels.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(launches)} launches x {len(targets)} targets in {record['wall_seconds']} s; "
          f"{len(failing)} failing; wrote {path}")
    return 1 if failing or stale or (shared_check and not shared_check["agrees"]) else 0


if __name__ == "__main__":
    sys.exit(main())
