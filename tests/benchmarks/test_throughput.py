"""Smoke test of benchmarks/throughput.py: it runs end to end and ends with its JSON line.

Not a timing test: the rates only have to be positive numbers.
"""


def test_throughput_script_runs_tiny_and_prints_both_rates(tmp_path, run_benchmark):
    report, lines, _ = run_benchmark("throughput.py", "--tiny", "--device", "cpu", "--images", "2", "--steps", "1",
                                     "--repeats", "1", "--workdir", tmp_path / "work", timeout=600)
    for key in ("device", "steps", "images", "reference_images_per_s", "cxrgen_images_per_s", "ratio",
                "bundle_cli_images_per_s", "peak_memory_bytes"):
        assert key in report, key
    assert report["device"] == "cpu" and report["steps"] == 1 and report["images"] == 2
    assert report["reference_images_per_s"] > 0
    assert report["cxrgen_images_per_s"] > 0
    assert report["bundle_cli_images_per_s"] > 0
    assert report["peak_memory_bytes"] > 0
    # Same seeds, same model, float32 on both sides: the benchmark compares like with like.
    assert report["reference_vs_cxrgen"]["compared"] == 2
    assert report["reference_vs_cxrgen"]["max_gray_diff"] <= 8  # JPEG can spread a 1-level difference
    # The human summary comes before the JSON line.
    assert any(line.startswith("cxrgen ") for line in lines[:-1])
    # The real JPEGs were written.
    assert len(list((tmp_path / "work" / "runs" / "cxrgen-0" / "images").rglob("*.jpg"))) == 2
