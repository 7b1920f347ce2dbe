"""The benchmark scripts that device sessions run still run against today's API (a script
broken by a signature change is found here, not on a lent GPU)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_measures_every_part(capsys):
    """benchmarks/throughput.py (tools/gpu_check.sh runs it): training, scoring with
    one and with two passes, FLOPs; tiny settings, peak skipped."""
    result = _script("throughput").main([
        "--image-size", "32", "--width", "4", "--batch", "2", "--ks", "8", "--grayscale",
        "--refine-passes", "2", "--repeats", "1", "--iters", "1", "--skip", "peak"])
    for part in ("train", "eval", "eval_refined"):
        assert result[f"{part}_img_per_s"] > 0, part
    assert result["model_flops_per_image"] > result["forward_flops_per_masked_image"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("RESULT ")


def test_layer_profile_times_every_class(capsys):
    """benchmarks/layer_profile.py reads the training step's thunk times from the profiler
    trace and ties them to forward, input-gradient and weight-gradient convolutions of
    named layers (tiny settings, isolated timings skipped)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    _script("layer_profile").main(["--image-size", "32", "--width", "4", "--batch", "2",
                                   "--ks", "8", "--steps", "1", "--part", "train",
                                   "--no-isolated"])
    out = capsys.readouterr().out
    classes = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("fwd", "dgrad", "wgrad", "layout"):
            classes[cells[0]] = float(cells[1])
    assert {"fwd", "dgrad", "wgrad"} <= set(classes), out
    assert all(classes[k] > 0 for k in ("fwd", "dgrad", "wgrad")), classes
    # Forward and input-gradient convolutions are tied to their Flax layers by name.
    assert "| UpBlock_0/ConvBNReLU_0/Conv_0 |" in out
    assert "| wgrad 3x3 " in out
