"""The object-store implementation against a real S3-compatible server on the loopback (moto, tests/s3_server.py).

Library level: the server's conditional writes, create-once under races, claims (race, duplicate, lapse,
take-over), retries on injected 5xx/throttling, one-line errors that never carry credentials, and URL checks.
End-to-end runs are in tests/runs/test_object_store.py.
"""
from __future__ import annotations

import json

import threading
import time

import boto3
import botocore.exceptions
import pytest
from s3_server import CREDENTIALS

from cxrgen.errors import InputError, RunError
from cxrgen.storage.base import WHOLE, shares_overlap
from cxrgen.storage.claims import ClaimBook
from cxrgen.storage.local import LocalStore
from cxrgen.storage.objects import ObjectStore, classify
from cxrgen.storage.open import open_store, parse_url


@pytest.fixture
def store(s3) -> ObjectStore:
    return open_store(f"s3://{s3.bucket()}/run")


def _client(s3):
    return boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def _keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in _client(s3).list_objects_v2(Bucket=bucket).get("Contents", []))


# ------------------------------------------------------------------ the server really decides conditional writes


def test_the_server_refuses_a_second_create_of_an_existing_key(s3):
    """What every create-once in cxrgen rests on: PUT If-None-Match: * fails with 412 when the key exists."""
    bucket, client = s3.bucket(), _client(s3)
    client.put_object(Bucket=bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"


def test_racing_creates_have_exactly_one_winner(store):
    payloads = [f"writer {i}".encode() for i in range(16)]
    results, start = [None] * 16, threading.Barrier(16)

    def create(i):
        start.wait()
        results[i] = store.create_bytes("run.json", payloads[i])
    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert store.read_bytes("run.json") == payloads[results.index(True)]


def test_a_create_whose_answer_was_lost_is_recognised_as_its_own(store, s3):
    s3.gate.fail("PUT", "/run/run.json", 503, "SlowDown", 1, after=True)  # stored, but the client hears 503
    assert store.create_bytes("run.json", b"mine")  # the retry finds its own bytes: won
    assert not store.create_bytes("run.json", b"mine")  # no retry: equal bytes of another writer are not ours


def test_a_big_commit_goes_in_parts_and_is_still_create_once(store, tmp_path, monkeypatch):
    import cxrgen.storage.objects as objects

    monkeypatch.setattr(objects, "_MULTIPART_FROM", 6 * 2**20)
    monkeypatch.setattr(objects, "_PART", 5 * 2**20)  # S3's smallest part
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * (48 * 2**10))  # 12 MiB: three parts
    assert store.commit("metadata.parquet", big)
    other = tmp_path / "other"
    other.write_bytes(b"x" * (7 * 2**20))
    assert not store.commit("metadata.parquet", other)  # the completion is conditional: the first stays
    assert store.read_bytes("metadata.parquet") == big.read_bytes()


# ------------------------------------------------------------------ claims


def test_shares_overlap_exactly_when_they_hold_a_common_index():
    for a in [(0, 1), (0, 2), (1, 2), (1, 3), (2, 6), (5, 6)]:
        for b in [(0, 1), (0, 2), (1, 2), (1, 3), (2, 6), (5, 6)]:
            brute = any(i % a[1] == a[0] and i % b[1] == b[0] for i in range(36))
            assert shares_overlap(a, b) == brute, (a, b)


def test_racing_claims_of_one_share_have_exactly_one_winner(store):
    won, refused, start = [], [], threading.Barrier(8)

    def claim():
        start.wait()
        try:
            won.append(store.claims.acquire((0, 2), "all"))
        except InputError as exc:
            refused.append(str(exc))
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(won) == 1 and len(refused) == 7
        assert all("rank 0 is already running in " + store.url in line for line in refused), refused
        store.claims.acquire((1, 2), "all").release()  # the other rank of the launch is welcome
        with pytest.raises(InputError, match="a launch of 2 ranks is still writing"):
            store.claims.acquire((2, 4), "all")  # rank 2 of 4 (2, 6, 10, ...) overlaps rank 0 of 2
        store.claims.acquire((1, 4), "all").release()  # rank 1 of 4 (1, 5, 9, ...) does not
    finally:
        for claim in won:
            claim.release()
    store.claims.acquire((2, 4), "all").release()  # once released, any size may write


def test_a_lapsed_claim_is_taken_over_and_its_holder_stops_before_its_next_record(s3):
    url = f"s3://{s3.bucket()}/run"
    first, second = open_store(url), open_store(url)
    first.claims.timeout = second.claims.timeout = 5.0
    held = first.claims.acquire(WHOLE, "all")
    held._stop.set()  # a frozen machine: its heartbeat stops, its process does not know
    held._thread.join()
    # the holder looks alive on this host (its pid exists): only the lapse of its heartbeat frees the share
    with pytest.raises(InputError, match="another cxrgen process .* is writing"):
        second.claims.acquire(WHOLE, "all")
    time.sleep(5.5)
    taker = second.claims.acquire(WHOLE, "all")
    try:
        held.beat()  # the frozen machine wakes up: its next heartbeat finds the later claim
        with pytest.raises(RunError, match="took over this writer's share"):
            first.record_writer("main", WHOLE).write(b'{"image_id": "x"}\n')
    finally:
        taker.release()


def test_a_dead_holder_on_this_host_frees_its_share_at_once(store):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    book = ClaimBook(store, 600.0)
    held = book.acquire(WHOLE, "all")
    held._stop.set()
    held._thread.join()
    # rewrite the holder as a process of this host that no longer exists
    entry = [e for e in book.scan() if e.number == held.number][0]
    store.write_bytes(entry.name, f'{{"host": "{__import__("socket").gethostname()}", "pid": {gone.pid}}}'.encode())
    book.acquire(WHOLE, "all").release()


def test_start_up_lists_and_reads_only_the_records_of_overlapping_shares(store, s3):
    for share in [(0, 3), (1, 3), (2, 3), (0, 1), (1, 2)]:
        store.record_writer(f"w{share[0]}of{share[1]}", share).write(f'{{"image_id": "{share}"}}\n'.encode())
    s3.gate.requests.clear()
    parts = store.record_parts((1, 3))
    data = b"".join(part.read() for part in parts)
    # rank 1 of 3 (1, 4, 7, ...) meets the plain run's records and rank 1 of 2's (1, 3, 5, ...), not 0/3 or 2/3
    assert sorted(data.decode().splitlines()) == sorted(['{"image_id": "(0, 1)"}', '{"image_id": "(1, 2)"}',
                                                         '{"image_id": "(1, 3)"}'])
    touched = " ".join(path + "?" + query for _, path, _, query in s3.gate.requests)  # a listing's prefix: query
    assert "w3-r1" in touched and "w3-r0" not in touched and "w3-r2" not in touched
    assert len(b"".join(part.read() for part in store.record_parts())) == len(data) + 2 * len(b'{"image_id": "(0, 3)"}\n')


# ------------------------------------------------------------------ retries and errors


def test_throttling_and_server_errors_are_retried(store, s3):
    s3.gate.requests.clear()
    s3.gate.fail("PUT", "/images/", 503, "SlowDown", 3)
    s3.gate.fail("GET", "/images/", 500, "InternalError", 2)
    store.write_bytes("images/00000/00000001.jpg", b"pixels")
    assert store.read_bytes("images/00000/00000001.jpg") == b"pixels"
    puts = [p for m, p, _, _ in s3.gate.requests if m == "PUT" and p.endswith("/images/00000/00000001.jpg")]
    gets = [p for m, p, _, _ in s3.gate.requests if m == "GET" and p.endswith("/images/00000/00000001.jpg")]
    assert len(puts) == 4 and len(gets) == 3


def test_a_conditional_write_that_raced_another_operation_is_retried_and_decided_as_a_first_try(store, s3):
    # S3 answers a create-if-absent that races another operation on the key with 409 ConditionalRequestConflict
    s3.gate.fail("PUT", "/run.json", 409, "ConditionalRequestConflict", 1)
    assert store.create_json("run.json", {"config": {}, "settings": {}}) is True  # retried: the key was free
    s3.gate.fail("PUT", "/run.json", 409, "ConditionalRequestConflict", 1)
    assert store.create_json("run.json", {"config": {"other": 1}, "settings": {}}) is False  # retried: taken
    assert json.loads(store.read_bytes("run.json")) == {"config": {}, "settings": {}}


def test_a_failure_that_outlasts_the_retries_is_one_resumable_line(s3):
    url = f"s3://{s3.bucket()}/run"
    store = ObjectStore(url, *parse_url(url), attempts=3, backoff_s=0.01)
    fault = s3.gate.fail("PUT", "/images/", 503, "SlowDown", -1)
    try:
        with pytest.raises(RunError) as failed:
            store.write_bytes("images/00000/00000001.jpg", b"pixels")
    finally:
        s3.gate.faults.remove(fault)
    message = str(failed.value)
    assert "\n" not in message and f"{url}/images/00000/00000001.jpg" in message and "503 SlowDown" in message
    assert f"cxrgen resume {url}" in message and "3 attempts" in message


@pytest.mark.parametrize("status, code, kind", [(503, "SlowDown", "transient"), (500, "InternalError", "transient"),
                                                 (429, "TooManyRequests", "transient"), (403, "AccessDenied",
                                                                                          "permission"),
                                                 (404, "NoSuchBucket", "bucket"), (404, "NoSuchKey", "absent"),
                                                 (412, "PreconditionFailed", "exists"),
                                                 (403, "InvalidAccessKeyId", "credentials"),
                                                 (409, "ConditionalRequestConflict", "transient"),
                                                 (409, "OperationAborted", "transient"),
                                                 (403, "RequestTimeTooSkewed", "transient")])
def test_errors_are_classified_by_status_and_code(status, code, kind):
    error = botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    wrapped = OSError(5, "translated by s3fs")
    wrapped.__cause__ = error
    assert classify(error) == kind and classify(wrapped) == kind


def test_messages_never_carry_credentials(s3, monkeypatch):
    secret, key_id = CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"]
    url = f"s3://{s3.bucket()}/run"
    store = ObjectStore(url, *parse_url(url), attempts=1)
    leaky = RuntimeError(f"server said: credential {key_id} with secret {secret} rejected")
    message = str(store.error("other", leaky, "write", "run.json"))
    assert secret not in message and key_id not in message and "***" in message
    refused = pytest.raises(InputError, parse_url, f"s3://{key_id}:{secret}@bucket/run")
    assert secret not in str(refused.value) and key_id not in str(refused.value)


# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize("url, words", [
    ("foo://bucket/run", ["foo://bucket/run", "no storage for the scheme foo://", "s3://"]),
    ("gs://bucket/run", ["gs://bucket/run", "does not write runs to gs://", "AWS_ENDPOINT_URL"]),
    ("s3://bucket/run?versionId=1", ["takes no ?query"]),
    ("s3:///run", ["no bucket"]),
    ("s3://bucket/a/../b", ["'..'"]),
])
def test_unusable_urls_are_refused_with_one_line(url, words):
    with pytest.raises(InputError) as refused:
        open_store(url)
    assert "\n" not in str(refused.value)
    for word in words:
        assert word in str(refused.value), (word, str(refused.value))


def test_a_missing_fsspec_package_is_named_with_its_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs now fails, as when it is not installed
    with pytest.raises(InputError, match=r"needs the package s3fs; install it with `pip install \"cxrgen\[s3\]\"`"):
        open_store("s3://bucket/run")


def test_a_local_path_stays_a_local_store(tmp_path):
    store = open_store(tmp_path / "run")
    assert isinstance(store, LocalStore) and store.local == tmp_path / "run"
    assert open_store(store) is store
