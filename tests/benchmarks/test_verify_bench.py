"""Smoke test of benchmarks/verify.py: it runs end to end and ends with its JSON line.

Not a timing test: the figures only have to be consistent (positive times, a share between 0 and 1).
"""


def test_verify_benchmark_runs_tiny_and_reports_the_classifier_share(tmp_path, run_benchmark):
    report, lines, _ = run_benchmark("verify.py", "--tiny", "--device", "cpu", "--images", "2", "--steps", "1",
                                     "--repeats", "1", "--workdir", tmp_path / "work")
    assert report["benchmark"] == "verify" and report["device"] == "cpu"
    assert (report["steps"], report["images"], report["architecture"]) == (1, 2, "tiny")
    assert report["plain_loop_s"] > 0 and report["verify_loop_s"] > 0 and report["classifier_s"] > 0
    assert 0 < report["classifier_fraction"] <= 1
    assert report["retry_cost"] == 1.0  # --min-score 0: every image kept at its first attempt
    assert lines[0].startswith("classifier pass: ")
    # both runs were real: the verified one holds its attempts journal and verified metadata
    import pandas as pd

    meta = pd.read_parquet(tmp_path / "work" / "runs" / "verify-0" / "metadata.parquet")
    assert meta.verified.tolist() == [True, True] and (meta.attempt == 0).all()
