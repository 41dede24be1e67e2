"""Smoke tests of benchmarks/bookkeeping.py and benchmarks/object_store.py: each runs end to end with toy sizes
and ends with its JSON line. Not timing tests: the figures only have to be there and be positive; the merge row
must have merged every planned image, across more hard-link source files than one (ext4 allows 65,000 links)."""


def test_bookkeeping_runs_tiny_with_its_streamed_merge_row(run_benchmark):
    report, _, _ = run_benchmark("bookkeeping.py", "--images", "200", "--write-images", "8", "--merge-images", "61000",
                 "--skip-model")
    assert report["planned_images"] == 200 and report["write_images_per_s"] > 0
    assert report["merge_rows"] == 61000  # two hard-link sources: past one file's 60,000 links
    assert report["merge_only_s"] > 0 and report["merge_peak_memory_bytes"] > 0


def test_object_store_runs_tiny_against_its_own_server(run_benchmark):
    report, _, _ = run_benchmark("object_store.py", "--write-images", "6", "--records", "160")
    assert report["write_images"] == 6 and report["records"] == 160
    for key in ("local_images_per_s", "s3_images_per_s", "s3_done_items_s", "local_done_items_s"):
        assert report[key] > 0, key
