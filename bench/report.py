"""The Markdown report of a benchmark run (results JSON -> tables). Nothing here measures anything."""

from __future__ import annotations

import math

GiB, MiB = 2**30, 2**20
NETWORKS = ["text encode", "VAE encode", "U-Net pass"]  # the bare network passes of one image
METHOD = ["fusion", "refinement"]  # + capture overhead: what the method adds on top of the networks
ROWS = ["weight loading", "text encode", "VAE encode", "U-Net pass", "U-Net + capture", "capture overhead",
        "fusion", "refinement", "post-processing", "end to end"]
# the targets of the benchmark issue (ratios measured on this 2-core CPU)
SPEEDUP_FP32, SPEEDUP_BF16, MEMORY_SHARE, OVERHEAD, FLOOR, REFINE_MEMORY = 3.0, 6.0, 1 / 3, 0.05, 1.3, 10.0


def find(results: dict, **fields) -> dict | None:
    """The first finished job whose settings include `fields`."""
    for done in results["jobs"]:
        if "result" in done and all(done["job"].get(k) == v for k, v in fields.items()):
            return done
    return None


def stage(done: dict | None, name: str) -> dict | None:
    if done is None:
        return None
    stages = done["result"]["stages"]
    if name == "capture overhead" and "U-Net + capture" in stages and "U-Net pass" in stages \
            and done["job"]["kind"] == "ours":
        a, b = stages["U-Net + capture"], stages["U-Net pass"]
        return dict(seconds=a["seconds"] - b["seconds"], peak_bytes=None, extra_bytes=a["extra_bytes"] - b["extra_bytes"],
                    flops=(a["flops"] or 0) - (b["flops"] or 0))
    return stages.get(name)


def fmt(x, unit: str = "", digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if unit == "GiB":
        return f"{x / GiB:.2f}"
    if unit == "MiB":
        return f"{x / MiB:.0f}"
    if unit == "x":
        return f"{x:.2f}×"
    if unit == "%":
        return f"{100 * x:.1f} %"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def seconds(done, name):
    s = stage(done, name)
    return s["seconds"] if s else None


def gemm(results: dict, dtype: str) -> float | None:
    done = find(results, kind="gemm")
    return done["result"]["gemm_flops"].get(dtype) if done else None


def network_time(done) -> float | None:
    parts = [seconds(done, n) for n in NETWORKS]
    return sum(parts) if done and None not in parts else None


def network_flops(done) -> float | None:
    parts = [(stage(done, n) or {}).get("flops") for n in NETWORKS]
    return sum(parts) if done and None not in parts else None


def others(done: dict | None) -> str:
    """The share of the CPUs other processes used while `done` ran."""
    return fmt(done.get("others_cpu"), "%") if done else "—"


def one_line(done: dict) -> str:
    """A progress line for the terminal."""
    if "error" in done:
        return f"FAILED after {done['wall_s']:.0f} s: {done['error'].splitlines()[0]}"
    r, kind = done["result"], done["job"]["kind"]
    if kind == "gemm":
        return ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in r["gemm_flops"].items())
    s = r["stages"]["refinement" if kind == "refine" else "end to end"]
    return f"{s['seconds']:.3g} s, peak {s['peak_bytes'] / GiB:.2f} GiB, +{s['extra_bytes'] / MiB:.0f} MiB " \
           f"(process {done['wall_s']:.0f} s)"


def targets(results: dict) -> list[list[str]]:
    rows = []
    heads = [d["job"] for d in results["jobs"] if d["job"].get("section") == "headline" and d["job"]["kind"] == "ours"]
    if not heads:
        return rows
    res, c = heads[0]["resolution"], heads[0]["classes"]
    dtypes = [j["dtype"] for j in heads]
    ours = {d: find(results, kind="ours", section="headline", dtype=d) for d in dtypes}
    base = {d: find(results, kind="baseline", section="headline", dtype=d) for d in dtypes}
    where = f"C={c}, {res}²"

    def row(what, value, goal, ok, shown=None):
        rows.append([what, shown or fmt(value, "x"), goal, "—" if value is None else "yes" if ok(value) else "**no**"])

    first = dtypes[0]
    speed = ratio(seconds(base[first], "end to end"), seconds(ours[first], "end to end"))
    row(f"end to end vs baseline, {first}, {where}", speed, f"≥ {SPEEDUP_FP32:g}×", lambda v: v >= SPEEDUP_FP32)
    if "bf16" in dtypes and first == "fp32":
        fast = ratio(seconds(base["fp32"], "end to end"), seconds(ours["bf16"], "end to end"))
        same = ratio(seconds(base["bf16"], "end to end"), seconds(ours["bf16"], "end to end"))
        row(f"end to end, ours bf16 vs baseline fp32, {where}", fast, f"≥ {SPEEDUP_BF16:g}×",
            lambda v: v >= SPEEDUP_BF16, f"{fmt(fast, 'x')} (vs baseline bf16: {fmt(same, 'x')})")
    for d in dtypes:
        share = ratio((stage(ours[d], "end to end") or {}).get("peak_bytes"),
                      (stage(base[d], "end to end") or {}).get("peak_bytes"))
        row(f"peak memory, ours / baseline, {d}, {where}", share, "≤ 1/3", lambda v: v <= MEMORY_SHARE,
            fmt(share, "%"))
    for d in dtypes:
        above = [(stage(x, "end to end") or {}).get("peak_bytes", 0) - x["result"]["weight_bytes"] if x else None
                 for x in (ours[d], base[d])]
        rows.append([f"(not a target) peak memory above the weights' bytes, ours / baseline, {d}",
                     f"{fmt(ratio(*above), '%')} ({fmt(above[0], 'GiB')} / {fmt(above[1], 'GiB')} GiB)", "—", "—"])
    for d in dtypes:
        extra = [seconds(ours[d], n) for n in ("capture overhead", *METHOD)]
        net = network_time(ours[d])
        share = ratio(sum(extra), net) if None not in extra else None
        row(f"capture + fusion + refinement on top of the network passes, {d}", share, f"≤ {OVERHEAD:.0%}",
            lambda v: v <= OVERHEAD, fmt(share, "%"))
    for d in dtypes:
        rate, flops = gemm(results, d), network_flops(ours[d])
        floor = ratio(flops, rate)
        over = ratio(network_time(ours[d]), floor)
        row(f"network passes (text + VAE + U-Net) vs FLOP floor at the GEMM rate, {d}", over, f"≤ {FLOOR:g}×",
            lambda v: v <= FLOOR)
    naive, fused = (find(results, kind="refine", method=m, resolution=512) for m in ("naive", "fused"))
    if naive and fused:
        less = ratio(stage(naive, "refinement")["extra_bytes"], max(stage(fused, "refinement")["extra_bytes"], MiB))
        row("refinement memory at 512², naive / fused (fused counted as ≥ 1 MiB)", less, f"≥ {REFINE_MEMORY:g}×",
            lambda v: v >= REFINE_MEMORY)
    return rows


def stage_table(results: dict, dtype: str) -> str:
    ours = find(results, kind="ours", section="headline", dtype=dtype)
    base = find(results, kind="baseline", section="headline", dtype=dtype)
    rows = []
    for name in ROWS:
        o, b = stage(ours, name), stage(base, name)
        if o is None and b is None:
            continue
        o, b = o or {}, b or {}
        rows.append([name, fmt(o.get("seconds")), fmt(o.get("peak_bytes"), "GiB"), fmt(o.get("extra_bytes"), "GiB"),
                     fmt(b.get("seconds")), fmt(b.get("peak_bytes"), "GiB"), fmt(b.get("extra_bytes"), "GiB"),
                     fmt(ratio(b.get("seconds"), o.get("seconds")), "x")])
    out = table(["stage", "ours s", "ours peak GiB", "ours +GiB", "baseline s", "baseline peak GiB",
                 "baseline +GiB", "baseline / ours time"], rows)
    faults = [f"{kind} {name} {s['major_faults']}" for kind, done in (("ours", ours), ("baseline", base)) if done
              for name, s in done["result"]["stages"].items() if s.get("major_faults")]
    if faults:
        out += ("\n\nPages read from disk during the measured runs (major page faults: memory-mapped weights "
                "evicted under memory pressure are read again, which slows that stage): " + ", ".join(faults))
    return out


def floor_table(results: dict, dtype: str) -> str:
    rate = gemm(results, dtype)
    rows = []
    for kind in ("ours", "baseline"):
        done = find(results, kind=kind, section="headline", dtype=dtype)
        for name in ("text encode", "VAE encode", "U-Net pass", "U-Net + capture", "refinement", "end to end"):
            s = stage(done, name)
            if not s or not s.get("flops"):
                continue
            achieved = s["flops"] / s["seconds"]
            rows.append([kind, name, fmt(s["flops"] / 1e9, digits=4), fmt(s["seconds"]), fmt(achieved / 1e9, digits=4),
                         fmt(ratio(achieved, rate), "%"), fmt(ratio(s["flops"], rate)),
                         fmt(ratio(s["seconds"], ratio(s["flops"], rate)), "x")])
    return table(["impl.", "stage", "GFLOP", "s", "GFLOP/s", "% of GEMM rate", "floor s", "time / floor"], rows)


def profile_tables(results: dict, dtype: str) -> str:
    done = find(results, kind="ours", section="headline", dtype=dtype)
    if not done or "profile" not in done["result"]:
        return ""
    prof, rate = done["result"]["profile"], gemm(results, dtype)
    flops = done["result"]["flops_by_op"].get("end to end", {})
    by_name = {r["op"]: r for r in prof["ops"]}
    heavy = []
    for op, n in sorted(flops.items(), key=lambda kv: -kv[1]):
        r = by_name.get(op.replace(".", "::", 1))
        if r:
            heavy.append([f"`{r['op']}`", str(r["calls"]), fmt(r["total_s"]), fmt(r["total_s"] / prof["total_s"], "%"),
                          fmt(n / 1e9, digits=4), fmt(n / r["total_s"] / 1e9, digits=4),
                          fmt(ratio(n / r["total_s"], rate), "%")])
    top = [[f"`{r['op']}`", str(r["calls"]), fmt(r["self_s"]), fmt(r["self_s"] / prof["total_s"], "%")]
           for r in prof["ops"][:15]]
    return "\n\n".join([
        f"Ops that do the FLOPs (time including their children), one end-to-end run, {dtype}:",
        table(["op", "calls", "s", "share of op time", "GFLOP", "GFLOP/s", "% of GEMM rate"], heavy),
        f"Top ops by own time (total op time {prof['total_s']:.2f} s):",
        table(["op", "calls", "own s", "share"], top)])


def scaling_tables(results: dict) -> str:
    parts = []
    first = next((d["job"] for d in results["jobs"] if d["job"].get("section") == "headline"), None)
    if first is None:
        return ""

    def e2e(**fields):
        done = find(results, kind="ours", **fields)
        s = stage(done, "end to end")
        return (fmt(s["seconds"]), fmt(s["peak_bytes"], "GiB"), str(len(s["all_seconds"])), others(done)) if s \
            else ("—",) * 4

    dtype, res = first["dtype"], first["resolution"]
    scaled = any(d["job"].get("section") == "scaling" for d in results["jobs"])
    rows = []
    for c in (1, 2, 4, 8) if scaled else ():
        batched = e2e(dtype=dtype, resolution=res, classes=c, mode="batched", threads=first["threads"])
        joint = e2e(dtype=dtype, resolution=res, classes=c, mode="joint", threads=first["threads"]) if c > 1 else batched
        rows.append([str(c), *batched, *joint])
    if scaled:
        parts += [f"Classes, ours end to end, {dtype}, {res}² (batched: C prompt rows in one U-Net call; joint: one "
                  "prompt naming all classes, one row; at C=1 the two are the same run):",
                  table(["C", "batched s", "peak GiB", "n", "others", "joint s", "peak GiB", "n", "others"], rows)]
        rows = [[f"{r}²", *e2e(dtype=dtype, resolution=r, classes=first["classes"], mode="batched",
                               threads=first["threads"])] for r in (256, 512, 768)]
        parts += [f"Input size, ours end to end, {dtype}, C={first['classes']} batched:",
                  table(["input", "s", "peak GiB", "n", "others"], rows)]
    rows = []
    for d in sorted({j["job"]["dtype"] for j in results["jobs"] if j["job"].get("section") == "headline"}):
        o, b = (find(results, kind=k, section="headline", dtype=d) for k in ("ours", "baseline"))
        so, sb = stage(o, "end to end"), stage(b, "end to end")
        rows.append([d, fmt(so and so["seconds"]), fmt(so and so["peak_bytes"], "GiB"),
                     fmt(1 / so["seconds"] if so else None), fmt(sb and sb["seconds"]),
                     fmt(sb and sb["peak_bytes"], "GiB"), fmt(1 / sb["seconds"] if sb else None)])
    parts += [f"dtype, C={first['classes']}, {res}²:",
              table(["dtype", "ours s", "ours peak GiB", "ours images/s", "baseline s", "baseline peak GiB",
                     "baseline images/s"], rows)]
    threads = [d for d in results["jobs"] if d["job"]["kind"] == "ours" and "result" in d
               and d["job"].get("threads") != first["threads"]]
    if threads:
        rows = [[str(d["result"]["threads"]), *e2e(dtype=dtype, resolution=res, classes=1, mode="batched",
                                                   threads=d["job"]["threads"])] for d in threads]
        default = find(results, kind="ours", dtype=dtype, resolution=res, classes=1, mode="batched",
                       threads=first["threads"])
        if default:
            rows.insert(0, [str(default["result"]["threads"]), *e2e(dtype=dtype, resolution=res, classes=1,
                                                                    mode="batched", threads=first["threads"])])
        parts += [f"Threads, ours end to end, {dtype}, {res}², C=1:",
                  table(["threads", "s", "peak GiB", "n", "others"], rows)]
    compiled = [d for d in results["jobs"] if "result" in d and "compiled" in d["result"]]
    for d in compiled:
        rows = [[name, fmt(seconds(d, name))] for name in ["U-Net pass", *d["result"]["compiled"]]]
        parts += [f"GPU, our bare U-Net pass, {d['job']['dtype']}, C={d['job']['classes']}:",
                  table(["variant", "s"], rows)]
    return "\n\n".join(parts)


def refine_table(results: dict) -> str:
    jobs = [d for d in results["jobs"] if d["job"]["kind"] == "refine" and "result" in d]
    rows = []
    for res in sorted({d["job"]["resolution"] for d in jobs}):
        cells, mem = [f"{res}²", str((res // 8) ** 2)], {}
        for method in ("fused", "chunked", "naive"):
            s = stage(find(results, kind="refine", method=method, resolution=res), "refinement")
            mem[method] = s and s["extra_bytes"]
            cells += [fmt(s and s["seconds"]), fmt(s and s["extra_bytes"], "MiB")]
        busy = [d["others_cpu"] for d in jobs if d["job"]["resolution"] == res and "others_cpu" in d]
        rows.append(cells + [fmt(ratio(mem["naive"], max(mem["fused"] or 0, MiB)), "x"), fmt(max(busy, default=None), "%")])
    return table(["input", "HW", "fused s", "fused +MiB", "chunked s", "chunked +MiB", "naive s", "naive +MiB",
                  "naive / fused memory", "others (max)"], rows)


def render(results: dict) -> str:
    meta, m = results["meta"], results["meta"]["machine"]
    device = m.get("gpu") or f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m.get('memory_gib')} GiB"
    if "fast_bf16" in m:  # older results lack it
        device += (f", torch kernels {m['cpu_capability']}, " +
                   ("fast bf16" if m["fast_bf16"] else "no fast bf16: the bf16 rows are skipped (docs/precision.md)"))
    jobs = results["jobs"]
    any_pipeline = find(results, section="headline")
    warm, reps = (any_pipeline["job"]["warmup"], any_pipeline["job"]["repeats"]) if any_pipeline else ("—", "—")
    peaks = all(d["result"].get("per_stage_peaks", True) for d in jobs if "result" in d)
    out = [f"# Benchmark: minidiffseg vs the diffusers recipe{' (quick)' if meta['quick'] else ''}"
           f"{' (tiny models)' if meta['tiny'] else ''}",
           f"Generated by `{meta['command']}` — not edited by hand.",
           "",
           f"- machine: {device}; torch {m['torch']} ({m['torch_threads']} threads), diffusers {m['diffusers']}, "
           f"transformers {m['transformers']}, Python {m['python']}; {m['date']}",
           f"- weights: {meta['weights']}; code: commit {meta.get('source', 'unknown')}",
           f"- other work on the machine: load average (1/5/15 min) {meta['load_average_start']} at the start, "
           f"{meta.get('load_average_end')} at the end; other processes took up to "
           f"{fmt(max((d['others_cpu'] for d in jobs if 'others_cpu' in d), default=None), '%')} of the CPUs "
           "during a configuration "
           "(\"others\" below; anything above a few % slows the timings)",
           f"- each configuration in a fresh process; {warm} warm-up run(s) (the first counts FLOPs), then the median "
           f"of {reps} (n in the scaling tables); peak memory: "
           + ("max_memory_allocated" if m.get("gpu") else
              "peak resident set (VmHWM" + (", reset before each stage)" if peaks else ", cumulative: not resettable here)"))
           + "; +GiB: above the memory in use when the stage began",
           f"- baseline loading: diffusers {'with' if meta['accelerate'] else 'without'} accelerate"
           + ("" if meta["accelerate"] else " (low_cpu_mem_usage=False: random init, then the weights copied in)")]
    failed = [d for d in jobs if "error" in d]
    if failed:
        out += ["", "**Failed configurations:**", ""] + [f"- {d['job']['kind']} {d['job'].get('dtype', '')}: "
                                                         f"`{d['error'].splitlines()[0]}`" for d in failed]
    rows = targets(results)
    if rows:
        out += ["", "## Targets", "", table(["target", "measured", "goal", "met"], rows)]
    dtypes = [d["job"]["dtype"] for d in jobs if d["job"].get("section") == "headline" and d["job"]["kind"] == "ours"]
    for d in dtypes:
        head = find(results, kind="ours", section="headline", dtype=d)["job"]
        out += ["", f"## Per stage: C={head['classes']}, {head['resolution']}², {d}", "",
                "Ours: batched (all classes in one U-Net call, conditional rows only). Baseline: per class a U-Net "
                "pass of batch [unconditional, conditional] storing every probability map, then averaging and the "
                "naive S·A. Baseline \"U-Net pass\" = diffusers' U-Net on our work (batch C, fused attention, "
                "nothing stored), not part of its end to end. capture overhead = U-Net + capture − U-Net pass. "
                f"Others: {others(find(results, kind='ours', section='headline', dtype=d))} of the CPUs during ours, "
                f"{others(find(results, kind='baseline', section='headline', dtype=d))} during the baseline.", "",
                stage_table(results, d)]
    if dtypes:
        rates = ", ".join(f"{d} {gemm(results, d) / 1e9:.0f} GFLOP/s" for d in dict.fromkeys(["fp32", *dtypes])
                          if gemm(results, d))
        out += ["", "## Against the floor", "",
                f"GEMM rate measured in this run (square matmul, best size, best of 5): {rates or '—'}. "
                "FLOPs by torch.utils.flop_counter (2 per multiply-add). floor = FLOPs / GEMM rate. The rate is "
                "torch.mm's on square matrices; oneDNN's convolutions can run slightly faster (above 100 %), so the "
                "floor is approximate."]
        for d in dtypes:
            out += ["", f"{d}:", "", floor_table(results, d)]
        prof = profile_tables(results, dtypes[0])
        if prof:
            out += ["", "## Where the seconds go (torch.profiler)", "", prof]
    scaling = scaling_tables(results)
    if scaling:
        out += ["", "## Scaling", "", scaling]
    if any(d["job"]["kind"] == "refine" for d in jobs):
        shape = next(d["job"] for d in jobs if d["job"]["kind"] == "refine")  # SD1.5: 8 heads of 40; SD2.x: 5 of 64
        out += ["", "## Refinement alone", "",
                f"M = S·A for one class (batch 1, 5 layers × {shape.get('heads', 8)} heads, head dim "
                f"{shape.get('head_dim', 40)}, random Q/K), fresh process each: "
                "fused = SDPA with the maps zero-padded to the head dim (library default), chunked = row blocks of "
                "1024, naive = S built in full (the official way).", "", refine_table(results)]
    return "\n".join(out) + "\n"
