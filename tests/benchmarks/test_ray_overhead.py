"""Smoke test of benchmarks/ray_overhead.py: it runs end to end with toy sizes and ends with its JSON line.

Not a timing test: the times only have to be positive numbers; both engines must have made the same files.
"""


def test_ray_overhead_script_runs_tiny_and_prints_both_times(tmp_path, run_benchmark):
    report, lines, _ = run_benchmark("ray_overhead.py", "--tiny", "--images", "4", "--steps", "1", "--repeats", "1",
                                     "--workers", "2", "--workdir", tmp_path / "work")
    assert report["device"] == "cpu" and report["workers"] == 2 and report["images"] == 4 and report["repeats"] == 1
    for key in ("local_s", "ray_s", "ray_start_s", "local_images_per_s", "ray_images_per_s"):
        assert report[key] > 0, key
    # the times are printed rounded to 0.01 s, the overhead from the unrounded ones
    slack = 0.01 * (1 + report["ray_s"] / report["local_s"]) / report["local_s"]
    assert abs(report["overhead"] - (report["ray_s"] / report["local_s"] - 1)) <= slack + 1e-4
    assert report["identical_files"] is True  # equal work: the same plan, batches and pixels
    assert lines[0].startswith("local engine ")  # the human summary comes before the JSON line
    for engine in ("local", "ray"):
        assert len(list((tmp_path / "work" / "runs" / f"{engine}-0" / "images").rglob("*.png"))) == 4
