"""benchmarks/gpu_check.py --tiny: the prepared GPU check runs end to end on the CPU with toy models, so it
cannot rot before a GPU runs it, and prints its one JSON line with every check passed.

Not a timing test: the rates only have to be positive; the other figures are the checks' invariants.
"""
import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_check_tiny_runs_every_check_on_the_cpu(tmp_path, run_benchmark):
    report, _, proc = run_benchmark("gpu_check.py", "--tiny", "--workdir", tmp_path, check=False)
    assert proc.returncode == 0 and report["ok"] and report["failed"] == [], json.dumps(report, indent=1)[-3000:]
    assert report["device"] == "cpu" and report["tiny"] is True and report["gpus"] == 0
    # the CUDA-only tests exist and skip cleanly without a GPU
    tests = report["cuda_tests"]
    assert tests["skipped"] >= 6 and tests["passed"] == 0 and tests["failed"] == 0
    for steps in ("20", "50"):
        entry = report["throughput"][steps]
        assert entry["images_per_s"] > 0 and entry["reference_images_per_s"] > 0 and entry["ratio_to_reference"] > 0
    assert report["throughput"]["20"]["channels_last_ratio"] > 0
    # float32 ran without TF32; bfloat16 and float16 made finite, comparable images
    assert report["bf16_vs_fp32"]["float32_tf32"] == {"matmul": False, "cudnn": False}
    assert 0 <= report["bf16_vs_fp32"]["mean_gray_diff"] <= report["bf16_vs_fp32"]["max_gray_diff"] <= 255
    assert report["fp16"]["finite"] and report["fp16"]["not_blank"] and report["fp16"]["attention_blocks_folded"] == 8
    # no host read of device data inside the denoising loop; the finiteness check reads once per batch
    assert report["syncs"]["host_reads_per_step"] == 0 and report["syncs"]["host_reads_per_batch"] >= 1
    assert report["prompt_encoding"]["calls"] == 1 and report["prompt_encoding"]["bit_identical"]
    oom = report["oom_backoff"]
    assert oom["settled_batch"] == oom["expected_batch"] == 5 and oom["first_attempts"][:3] == [12, 6, 3]
    for kind in ("workers", "ranks"):
        entry = report["multi_device"][kind]
        assert [p["device"] for p in entry["placement"]] == ["cpu", "cpu"]
        assert entry["equal_to_one_device"]["images"] == 4 and entry["equal_to_one_device"]["within_1_level"] >= 0.999


def test_peak_table_tells_pcie_and_nvl_cards_from_sxm():
    spec = importlib.util.spec_from_file_location("throughput_under_test", BENCHMARKS / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(throughput)
    finally:
        sys.path.remove(str(BENCHMARKS))
    peak = throughput.default_peak
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak("NVIDIA H100 NVL") == 835.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA A10G") == 70.0 and peak("NVIDIA L40S") == 362.0
    assert peak("Tesla T4") == 65.0 and peak("some CPU") is None
