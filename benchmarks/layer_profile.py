"""Per-layer profile of the training step and of scoring: each convolution in the model
against the same convolution isolated.

Runs the real compiled programs (``train_step.make_train_step``, ``detector.make_score_fn``)
under ``jax.profiler`` and reads the per-thunk times of XLA's runtime from the perfetto
trace. Each thunk is tied to its HLO instruction in the optimized module
(``compiled.as_text()``): a convolution (YNNPACK fusion or plain XLA convolution) carries
the Flax module path in its metadata (``.../MaskBlock_4/ConvBNReLU_0/Conv_0/...``) and is
classed as forward, input gradient (``transpose(...)`` with an activation-shaped output)
or weight gradient (kernel-shaped output). Everything else is classed by what it is:
layout copies/transposes that feed a convolution (charged to that layer's ``layout``
column), the remaining elementwise / reduction fusions (BatchNorm, ReLU, losses, Adam) and
the rest.

Then each layer's forward convolution is rebuilt from the jaxpr (same shapes, strides,
padding, dtype) and timed alone: forward, input gradient (vjp w.r.t. the input only) and
weight gradient (vjp w.r.t. the kernel only).

    python benchmarks/layer_profile.py --width 16 --image-size 64 --batch 8
    python benchmarks/layer_profile.py --width 64 --part score

Prints one table per part (ms per step / per scoring batch) and a summary by class.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*)$")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_DIMS = re.compile(r"\[([\d,]*)\]")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Instructions of an optimized HLO module: ``{name: info}`` and the computations'
    instruction lists. info: opcode, shape, operands, called computation, op_name."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and "(" in line:
            current = line.split(" ", 1)[0].lstrip("%")
            if current == "ENTRY":
                current = line.split(" ")[1].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        args = rest.split(")", 1)[0]
        op = _OPNAME.search(rest)
        calls = _CALLS.search(rest)
        dims = _DIMS.search(shape)
        instrs[name] = {
            "opcode": opcode, "shape": tuple(int(d) for d in dims.group(1).split(",") if d)
            if dims else (), "operands": _OPERANDS.findall(args),
            "calls": calls.group(1) if calls else None,
            "op_name": op.group(1) if op else "", "comp": current,
            "window": "lhs_dilate" in rest, "line": line}
        comps[current].append(name)
    return instrs, comps


def _conv_inside(name: str, instrs: dict, comps: dict) -> dict | None:
    """The convolution instruction ``name`` is or contains (a fusion), else None."""
    ins = instrs[name]
    if ins["opcode"] == "convolution":
        return ins
    if ins["opcode"] == "fusion" and ins["calls"]:
        for sub in comps.get(ins["calls"], []):
            if instrs[sub]["opcode"] == "convolution":
                return instrs[sub]
    return None


def _layer_of(op_name: str) -> str:
    """'jit(f)/transpose(jvp(SSMUNet))/MaskBlock_4/ConvBNReLU_0/Conv_0/conv...' ->
    'MaskBlock_4/ConvBNReLU_0/Conv_0'."""
    parts = [p for p in op_name.split("/") if p and "(" not in p and p != "conv_general_dilated"]
    return "/".join(p for p in parts if re.match(r"^[A-Z]\w*_\d+$", p))


def classify(instrs: dict, comps: dict, kernel_shapes: dict) -> dict:
    """{instruction name: (layer, class)} for every top-level instruction."""
    out = {}
    conv_of = {}
    for name, ins in instrs.items():
        if ins["comp"].startswith("fused_computation") or ins["comp"].startswith("%fused"):
            continue
        conv = _conv_inside(name, instrs, comps)
        if conv is None:
            continue
        op_name = conv["op_name"] or ins["op_name"]
        shape = tuple(conv["shape"])
        if not op_name:
            # XLA drops the metadata of weight-gradient convolutions (rewritten with batch
            # and feature swapped: [Cin, H, W, N] * [H', W', N, Cout] -> [Cin, kh, kw, Cout]);
            # layers of one kernel shape are told apart by the input's spatial size only.
            lhs = instrs.get(conv["operands"][0], {}).get("shape", ()) if conv["operands"] \
                else ()
            hw = "x".join(str(d) for d in lhs[1:3]) if len(lhs) == 4 else "?"
            out[name] = (f"wgrad {shape[1]}x{shape[2]} {shape[0]}->{shape[3]} @ {hw}", "wgrad")
            continue
        layer = _layer_of(op_name)
        kind = "dgrad" if "transpose(" in op_name else "fwd"
        out[name] = (layer, kind)
        conv_of[name] = layer
    # Layout copies feeding a convolution are charged to its layer.
    for name, (layer, _kind) in list(out.items()):
        for opnd in instrs[name]["operands"]:
            src = instrs.get(opnd)
            if src and opnd not in out and ("transpose" in opnd or "copy" in opnd
                                            or src["opcode"] in ("transpose", "copy")):
                out[opnd] = (layer, "layout")
    for name, ins in instrs.items():
        if name in out or ins["comp"].startswith("fused_computation"):
            continue
        if "transpose" in name or "copy" in name or ins["opcode"] in ("transpose", "copy"):
            out[name] = ("", "other layout")
        elif ins["opcode"] in ("fusion", "reduce", "add", "multiply", "maximum", "select",
                               "reduce-window", "dot", "custom-call", "sort"):
            out[name] = ("", "elementwise/other")
    return out


def trace_times(run, steps: int) -> dict:
    """Mean milliseconds per call of each XLA thunk over ``steps`` profiled calls."""
    import jax

    d = tempfile.mkdtemp(prefix="layer_profile_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    times = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X":
            times[e["name"]] += e.get("dur", 0.0) / 1e3 / steps
    return times


def _bench(fn, *args, repeats: int = 5) -> float:
    """Best of ``repeats`` timed calls, ms (after one warm-up call)."""
    from components import timeit

    return timeit(fn, *args, repeats=repeats, best=True) * 1e3


def isolated_convs(model, variables, x, m, train: bool) -> dict:
    """{layer: (fwd, dgrad, wgrad ms, GFLOP of the forward)} for each forward conv of the
    model at these input shapes, each timed alone."""
    import jax
    import jax.numpy as jnp

    def apply(v, x, m):
        if train:
            return model.apply(v, x, m, train=True, mutable=["batch_stats"])
        return model.apply(v, x, m)

    jaxpr = jax.make_jaxpr(apply)(variables, x, m)
    found = []

    def walk(eqns):
        for e in eqns:
            if e.primitive.name == "conv_general_dilated":
                found.append(e)
            for p in e.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "eqns", []))
    walk(jaxpr.jaxpr.eqns)
    out = {}
    for e in found:
        layer = _layer_of(str(e.source_info.name_stack) + "/")
        lhs, rhs = (v.aval for v in e.invars)
        params = dict(e.params)
        conv = lambda a, b, params=params: jax.lax.conv_general_dilated_p.bind(a, b, **params)
        key = jax.random.PRNGKey(0)
        a = jax.random.normal(key, lhs.shape, lhs.dtype)
        b = jax.random.normal(key, rhs.shape, rhs.dtype) * 0.1
        y, vjp = jax.vjp(conv, a, b)
        g = jnp.ones_like(y)
        fwd = jax.jit(conv)
        dgrad = jax.jit(lambda a, b, g, conv=conv: jax.vjp(lambda a: conv(a, b), a)[1](g)[0])
        wgrad = jax.jit(lambda a, b, g, conv=conv: jax.vjp(lambda b: conv(a, b), b)[1](g)[0])
        flops = fwd.lower(a, b).compile().cost_analysis()
        flops = (flops[0] if isinstance(flops, list) else flops).get("flops", 0.0)
        out[layer] = (_bench(fwd, a, b), _bench(dgrad, a, b, g), _bench(wgrad, a, b, g),
                      flops / 1e9, tuple(lhs.shape), tuple(rhs.shape))
    return out


def _table(part: str, times: dict, classes: dict, iso: dict, total_ms: float) -> None:
    per_layer = collections.defaultdict(lambda: collections.defaultdict(float))
    by_class = collections.defaultdict(float)
    for name, ms in times.items():
        if name not in classes:
            continue
        layer, kind = classes[name]
        by_class[kind] += ms
        if layer:
            per_layer[layer][kind] += ms
    print(f"\n## {part}: {total_ms:.1f} ms per call (wall, unprofiled)")
    print("| layer | input -> kernel | GFLOP fwd | in model fwd / dgrad / wgrad / layout ms | "
          "isolated fwd / dgrad / wgrad ms | model/isolated | fwd GFLOP/s model / isolated |")
    print("|---|---|---|---|---|---|---|")
    for layer in sorted(per_layer, key=lambda k: -sum(per_layer[k].values())):
        t = per_layer[layer]
        fwd, dg, wg, lay = (t.get(k, 0.0) for k in ("fwd", "dgrad", "wgrad", "layout"))
        i = iso.get(layer)
        if i:
            isum = i[0] + (i[1] + i[2] if part == "train" else 0.0)
            shape = f"{i[4]} x {i[5]}"
            iso_s = f"{i[0]:.1f} / {i[1]:.1f} / {i[2]:.1f}"
            ratio = f"{(fwd + dg + wg + lay) / isum:.2f}" if isum else "-"
            gf = f"{i[3] / (fwd / 1e3):.0f} / {i[3] / (i[0] / 1e3):.0f}" if fwd else "-"
            gflop = f"{i[3]:.2f}"
        else:
            shape, iso_s, ratio, gf, gflop = "-", "-", "-", "-", "-"
        print(f"| {layer} | {shape} | {gflop} | {fwd:.1f} / {dg:.1f} / {wg:.1f} / {lay:.1f} | "
              f"{iso_s} | {ratio} | {gf} |")
    print("\n| class | ms per call | share |")
    print("|---|---|---|")
    acc = sum(by_class.values())
    for kind, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {ms / max(acc, 1e-9):.2f} |")
    print(f"| (sum of thunks) | {acc:.1f} | |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--part", choices=("train", "score", "both"), default="both")
    p.add_argument("--steps", type=int, default=3, help="profiled calls (mean reported)")
    p.add_argument("--no-isolated", action="store_true", help="skip the isolated timings")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from throughput import bench_config

    from ssm_jax.config.defaults import base_config
    from ssm_jax.core import parallel
    from ssm_jax.serving.detector import make_score_fn, scoring_config
    from ssm_jax.training import step as train_step

    ks = tuple(int(k) for k in args.ks.split(","))
    cfg = bench_config(base_config(), args.image_size, args.width, args.batch, args.dtype, ks)
    cfg.eval.refine_passes = 1
    s, c, b = args.image_size, 3, args.batch
    mesh = parallel.data_mesh()
    rng = np.random.default_rng(0)
    host_state = train_step.init_state(cfg, jax.random.PRNGKey(0))
    kernels = collections.defaultdict(list)
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_state.params)[0]:
        keys = [getattr(k, "key", str(k)) for k in path]
        if keys[-1] == "kernel":
            kernels["/".join(keys[:-1])].append(tuple(leaf.shape))
    model = train_step.make_model(cfg)
    variables = {"params": host_state.params, "batch_stats": host_state.batch_stats}
    n_masks = int(cfg.mask.num_masks)
    print(f"# layer profile: {s} px, width {args.width}, batch {b}, k={ks}, {args.dtype}, "
          f"{jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.1f}")

    if args.part in ("train", "both"):
        step = train_step.make_train_step(cfg, mesh)
        holder = {"state": parallel.replicate(mesh, host_state)}
        images = parallel.global_batch(mesh, rng.uniform(size=(b, s, s, c)).astype(np.float32))
        compiled = step.lower(holder["state"], images).compile()

        def run():
            holder["state"], metrics = compiled(holder["state"], images)
            jax.block_until_ready(metrics)

        run()
        wall = _bench(lambda: run() or 0.0, repeats=args.steps)
        instrs, comps = parse_hlo(compiled.as_text())
        classes = classify(instrs, comps, kernels)
        times = trace_times(run, args.steps)
        iso = {} if args.no_isolated else isolated_convs(
            model, variables, jnp.zeros((b * n_masks, s, s, c)), jnp.ones((b * n_masks, s, s)),
            train=True)
        _table("train", times, classes, iso, wall)

    if args.part in ("score", "both"):
        v = parallel.replicate(mesh, variables)
        fn = make_score_fn(cfg, mesh, scoring_config(cfg))
        key = parallel.replicate(mesh, jax.random.PRNGKey(0))
        ev = parallel.global_batch(mesh, rng.uniform(size=(b, s, s, c)).astype(np.float32))
        idx = parallel.global_batch(mesh, np.arange(b, dtype=np.int32))
        sizes = parallel.global_batch(mesh, np.full((b, 2), s, np.int32))
        compiled = fn.lower(v, key, ev, idx, sizes).compile()
        run = lambda: jax.block_until_ready(compiled(v, key, ev, idx, sizes))
        run()
        wall = _bench(lambda: run() or 0.0, repeats=args.steps)
        instrs, comps = parse_hlo(compiled.as_text())
        classes = classify(instrs, comps, kernels)
        times = trace_times(run, args.steps)
        copies = b * n_masks * len(ks)
        iso = {} if args.no_isolated else isolated_convs(
            model, variables, jnp.zeros((copies, s, s, c)), jnp.ones((copies, s, s)),
            train=False)
        _table("score", times, classes, iso, wall)
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f}; wall: best of {args.steps} "
          f"calls; thunk times are means over {args.steps} profiled calls)")


if __name__ == "__main__":
    main()
