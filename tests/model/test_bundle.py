"""Bundle configs of both generations, checkpoint layouts and checks, the download cache, the text encoder."""
from __future__ import annotations

import gc
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cxrgen.config import default_cache_dir
from cxrgen.errors import InputError
from cxrgen.model import demo
from cxrgen.model.bundle import load_bundle, read_spec, resolve_model
from cxrgen.model.checkpoint import load_into, old_key, old_layout, to_old_layout
from cxrgen.model.engine import Engine, EngineOptions
from cxrgen.model.text_encoder import MAX_TOKENS, TokenInfo, load_text_encoder

FIXTURE_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "old_checkpoint_keys.json"

# The real architecture (docs/algorithm.md) as the benchmark builds it; the full-size test below checks it
# against the real checkpoints' key list, which keeps the benchmark honest too.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fake_model import REAL_AUTOENCODER, REAL_UNET  # noqa: E402


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def state_of(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def load_error(root: Path) -> str:
    with pytest.raises(InputError) as info:
        load_bundle(read_spec(root))
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- both config generations


def test_both_config_generations_give_identical_networks(tmp_path):
    old = demo.build_bundle(tmp_path / "v100", generation="1.0.0", seed=3)
    new = demo.build_bundle(tmp_path / "v101", generation="1.0.1", seed=3)
    config_old = json.loads((old / "configs" / "inference.json").read_text())
    config_new = json.loads((new / "configs" / "inference.json").read_text())
    assert "num_channels" in config_old["diffusion_def"]
    assert config_old["diffusion_def"]["_target_"].startswith("generative.")
    assert "channels" in config_new["diffusion_def"] and config_new["load_old"] == 1

    spec_old, spec_new = read_spec(old), read_spec(new)
    assert spec_old.autoencoder_args == spec_new.autoencoder_args == demo.TINY_AUTOENCODER
    assert spec_old.unet_args == spec_new.unet_args == demo.TINY_UNET
    assert spec_old.scheduler_args == spec_new.scheduler_args
    assert spec_old.latent_shape == spec_new.latent_shape == demo.LATENT
    assert spec_old.image_size == spec_new.image_size == (32, 32)
    assert (spec_old.version, spec_new.version) == ("1.0.0", "1.0.1")

    a, b = load_bundle(spec_old), load_bundle(spec_new)
    assert_same_state(a.unet.state_dict(), b.unet.state_dict())
    assert_same_state(a.autoencoder.state_dict(), b.autoencoder.state_dict())
    # and they are the networks that were saved, not fresh initialisations
    ae, unet = demo.build_networks(3)
    assert_same_state(a.unet.state_dict(), unet.state_dict())
    assert_same_state(a.autoencoder.state_dict(), ae.state_dict())
    assert not a.unet.training and not any(p.requires_grad for p in a.unet.parameters())
    assert a.md5 == {"autoencoder.pth": md5(old / "models" / "autoencoder.pth"),
                     "diffusion_model.pth": md5(old / "models" / "diffusion_model.pth")}


def test_old_and_new_checkpoint_layouts_both_load(tmp_path):
    old = demo.build_bundle(tmp_path / "old", layout="old", seed=4)
    new = demo.build_bundle(tmp_path / "new", layout="new", seed=4)
    old_keys = set(torch.load(old / "models" / "diffusion_model.pth", weights_only=True))
    new_keys = set(torch.load(new / "models" / "diffusion_model.pth", weights_only=True))
    assert old_keys != new_keys  # the two files really use different parameter names
    a, b = load_bundle(read_spec(old)), load_bundle(read_spec(new))
    assert_same_state(a.unet.state_dict(), b.unet.state_dict())
    assert_same_state(a.autoencoder.state_dict(), b.autoencoder.state_dict())
    _, unet = demo.build_networks(4)
    assert_same_state(a.unet.state_dict(), unet.state_dict())


def test_load_into_reports_layout_and_leaves_the_callers_dict_alone(tmp_path):
    _, unet = demo.build_networks(5)
    _, target = demo.build_networks(6)
    state = to_old_layout(unet.state_dict())
    keys = set(state)
    assert load_into(target, state, tmp_path / "x.pth") == "old"
    assert set(state) == keys  # MONAI's old-layout loader empties the dict it gets; ours must not
    assert_same_state(target.state_dict(), unet.state_dict())
    _, target = demo.build_networks(7)
    assert load_into(target, dict(unet.state_dict()), tmp_path / "x.pth") == "new"
    assert_same_state(target.state_dict(), unet.state_dict())


def test_checkpoint_wrapped_in_state_dict_key_loads(tmp_path, bundle_dir):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    path = root / "models" / "autoencoder.pth"
    torch.save({"state_dict": torch.load(path, weights_only=True), "epoch": 3}, path)
    loaded = load_bundle(read_spec(root))
    reference = load_bundle(read_spec(bundle_dir))
    assert_same_state(loaded.autoencoder.state_dict(), reference.autoencoder.state_dict())


@pytest.mark.parametrize("layout", ["old", "new"])
def test_safetensors_preferred_when_present(tmp_path, layout):
    from safetensors.torch import save_file

    root = demo.build_bundle(tmp_path / "b", layout=layout, seed=0)
    ae, unet = demo.build_networks(seed=10)  # different weights than the .pth files
    convert = to_old_layout if layout == "old" else dict
    for stem, model in (("autoencoder", ae), ("diffusion_model", unet)):
        save_file({k: v.contiguous() for k, v in convert(model.state_dict()).items()},
                  str(root / "models" / f"{stem}.safetensors"))
    spec = read_spec(root)
    assert spec.checkpoints["diffusion_model"].name == "diffusion_model.safetensors"
    loaded = load_bundle(spec)
    assert_same_state(loaded.unet.state_dict(), unet.state_dict())
    assert_same_state(loaded.autoencoder.state_dict(), ae.state_dict())
    assert set(loaded.md5) == {"autoencoder.safetensors", "diffusion_model.safetensors"}
    assert loaded.md5["diffusion_model.safetensors"] == md5(root / "models" / "diffusion_model.safetensors")


# --------------------------------------------------------------------------- damaged checkpoints

DROP_UNET = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # same name in both layouts
DROP_UNET_OLD_ONLY = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
DROP_AE = "decoder.blocks.0.conv.weight"


def _rewrite(root: Path, file: str, change) -> Path:
    path = root / "models" / file
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("layout", ["old", "new"])
@pytest.mark.parametrize("file, key", [("diffusion_model.pth", DROP_UNET), ("autoencoder.pth", DROP_AE)])
def test_checkpoint_missing_key_names_file_and_key(tmp_path, layout, file, key):
    root = demo.build_bundle(tmp_path / "b", layout=layout)
    path = _rewrite(root, file, lambda s: s.pop(key))
    message = load_error(root)
    assert str(path) in message and repr(key) in message and "1 missing key" in message


def test_checkpoint_missing_renamed_key_is_named_in_the_old_spelling(tmp_path, bundle_dir):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    path = _rewrite(root, "diffusion_model.pth", lambda s: s.pop(DROP_UNET_OLD_ONLY))
    message = load_error(root)
    assert str(path) in message and repr(DROP_UNET_OLD_ONLY) in message and "1 missing key" in message
    assert "unexpected" not in message


@pytest.mark.parametrize("layout", ["old", "new"])
def test_checkpoint_unexpected_key_names_file_and_key(tmp_path, layout):
    root = demo.build_bundle(tmp_path / "b", layout=layout)
    path = _rewrite(root, "diffusion_model.pth", lambda s: s.__setitem__("extra_head.weight", torch.zeros(3)))
    message = load_error(root)
    assert str(path) in message and "'extra_head.weight'" in message and "1 unexpected key" in message


@pytest.mark.parametrize("layout", ["old", "new"])
@pytest.mark.parametrize("file, key", [("diffusion_model.pth", "out.2.conv.weight"), ("autoencoder.pth", DROP_AE)])
def test_checkpoint_wrong_shape_names_file_key_and_shapes(tmp_path, layout, file, key):
    root = demo.build_bundle(tmp_path / "b", layout=layout)
    path = _rewrite(root, file, lambda s: s.__setitem__(key, torch.zeros(*s[key].shape[:-1], s[key].shape[-1] + 1)))
    message = load_error(root)
    assert str(path) in message and repr(key) in message and "shape" in message


def test_foreign_checkpoint_is_refused_not_silently_loaded(tmp_path, bundle_dir):
    # an autoencoder file where the UNet should be: MONAI's old loader would "load" it and keep random weights
    root = copy_bundle(bundle_dir, tmp_path / "b")
    shutil.copy(root / "models" / "autoencoder.pth", root / "models" / "diffusion_model.pth")
    message = load_error(root)
    assert "diffusion_model.pth" in message and "missing key" in message and "unexpected key" in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_unreadable_checkpoint_names_file(tmp_path, bundle_dir, content):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    (root / "models" / "diffusion_model.pth").write_bytes(content)
    message = load_error(root)
    assert str(root / "models" / "diffusion_model.pth") in message and "cannot be read" in message


class NotAllowed:  # a pickled object that weights_only=True must refuse to build
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path, bundle_dir):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    torch.save({"payload": NotAllowed()}, root / "models" / "autoencoder.pth")
    message = load_error(root)
    assert "autoencoder.pth" in message and "cannot be read" in message


def test_checkpoint_that_is_not_a_dict(tmp_path, bundle_dir):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    torch.save([torch.zeros(1)], root / "models" / "autoencoder.pth")
    message = load_error(root)
    assert "autoencoder.pth" in message and "not a state_dict" in message


# --------------------------------------------------------------------------- damaged bundle folders


@pytest.mark.parametrize("missing", ["configs/inference.json", "models/diffusion_model.pth", "models/autoencoder.pth"])
def test_missing_bundle_file_names_it(tmp_path, bundle_dir, missing):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    (root / missing).unlink()
    with pytest.raises(InputError) as info:
        read_spec(root)
    assert str(root / missing) in str(info.value)


def test_metadata_json_is_optional(tmp_path, bundle_dir):
    root = copy_bundle(bundle_dir, tmp_path / "my_bundle")
    (root / "configs" / "metadata.json").unlink()
    spec = read_spec(root)
    assert spec.name == "my_bundle" and spec.version == "unknown"


@pytest.mark.parametrize("edit, words", [
    (lambda c: "{ not json", "not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "diffusion_def"}, "'diffusion_def'"),
    (lambda c: {k: v for k, v in c.items() if k != "scheduler"}, "'scheduler'"),
    (lambda c: {**c, "autoencoder_def": {**c["autoencoder_def"], "latent_channels": "three"}}, "AutoencoderKL"),
    (lambda c: {**c, "diffusion_def": {**c["diffusion_def"], "not_an_argument": 1}}, "DiffusionModelUNet"),
])
def test_broken_inference_json_names_the_file(tmp_path, bundle_dir, edit, words):
    root = copy_bundle(bundle_dir, tmp_path / "b")
    path = root / "configs" / "inference.json"
    config = edit(json.loads(path.read_text()))
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(InputError) as info:
        load_bundle(read_spec(root))
    assert str(path) in str(info.value) and words in str(info.value)


def test_text_width_must_equal_cross_attention_dim(tmp_path, bundle_dir):
    narrow = demo.build_text_encoder(tmp_path / "narrow", width=16)
    bundle = load_bundle(read_spec(bundle_dir))
    text = load_text_encoder(str(narrow))
    options = EngineOptions(device=torch.device("cpu"), dtype="float32", scheduler="ddim", steps=1)
    with pytest.raises(InputError) as info:
        Engine(bundle, text, options)
    message = str(info.value)
    assert "16" in message and "cross_attention_dim" in message and str(bundle_dir) in message
    assert "inference.json" in message


def test_text_width_matching_builds_an_engine(bundle_dir, text_encoder_dir):
    bundle = load_bundle(read_spec(bundle_dir))
    text = load_text_encoder(str(text_encoder_dir))
    engine = Engine(bundle, text, EngineOptions(device=torch.device("cpu"), dtype="float32", scheduler="ddim", steps=1))
    assert engine.text.width == demo.TINY_UNET["cross_attention_dim"]


# --------------------------------------------------------------------------- the full-size architecture


def _real_bundle_configs(root: Path) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = demo.inference_config("1.0.1", REAL_AUTOENCODER, REAL_UNET, (3, 64, 64))
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps(
        {"name": "cxr_image_synthesis_latent_diffusion_model", "version": "1.0.1"}))
    return root


def test_full_size_fake_checkpoint_loads_every_parameter(tmp_path):
    """Every key and shape of the published checkpoints, each tensor a distinct constant, through load_bundle."""
    fixture = json.loads(FIXTURE_KEYS.read_text())
    root = _real_bundle_configs(tmp_path / "real")
    constants = {}
    for offset, (file, stem) in enumerate((("autoencoder.pth", "autoencoder"),
                                            ("diffusion_model.pth", "diffusion_model"))):
        state = {}
        for i, (key, shape) in enumerate(fixture[file].items()):
            value = float(offset * 1000 + i + 1)
            state[key] = torch.full(tuple(shape), value, dtype=torch.float32)
            constants[(stem, key)] = value
        torch.save(state, root / "models" / file)
        del state
        gc.collect()
    assert len(fixture["diffusion_model.pth"]) == 496 and len(fixture["autoencoder.pth"]) == 162

    spec = read_spec(root)
    assert spec.unet_args == REAL_UNET and spec.autoencoder_args == REAL_AUTOENCODER
    assert spec.latent_shape == (3, 64, 64) and spec.image_size == (512, 512)
    bundle = load_bundle(spec)
    try:
        for stem, model, file in (("autoencoder", bundle.autoencoder, "autoencoder.pth"),
                                  ("diffusion_model", bundle.unet, "diffusion_model.pth")):
            # the architecture built from inference.json has exactly the checkpoint's keys and shapes
            assert old_layout(model) == {k: tuple(v) for k, v in fixture[file].items()}
            seen = set()
            for name, tensor in model.state_dict().items():
                expected = constants[(stem, old_key(name))]
                low, high = torch.aminmax(tensor)
                assert float(low) == float(high) == expected, name
                seen.add(expected)
            assert len(seen) == len(fixture[file])  # every checkpoint tensor landed in a parameter
        n_params = sum(p.numel() for p in bundle.unet.parameters())
        assert 263_000_000 < n_params < 264_500_000
        assert 4_500_000 < sum(p.numel() for p in bundle.autoencoder.parameters()) < 4_700_000
    finally:
        del bundle
        gc.collect()


def test_full_size_autoencoder_checkpoint_missing_one_key_is_refused(tmp_path):
    # the real autoencoder's key set minus one weight: the message names exactly that weight
    fixture = json.loads(FIXTURE_KEYS.read_text())["autoencoder.pth"]
    root = _real_bundle_configs(tmp_path / "real")
    dropped = sorted(fixture)[40]
    torch.save({k: torch.zeros(tuple(v)) for k, v in fixture.items() if k != dropped},
               root / "models" / "autoencoder.pth")
    torch.save({}, root / "models" / "diffusion_model.pth")  # never reached: the autoencoder loads first
    with pytest.raises(InputError) as info:
        load_bundle(read_spec(root))
    message = str(info.value)
    assert str(root / "models" / "autoencoder.pth") in message and repr(dropped) in message
    assert "1 missing key" in message and "unexpected" not in message


# --------------------------------------------------------------------------- named bundles (staging: test_download.py)


class NoDownload:
    """A source that fails the test if anything is listed or fetched."""

    def listing(self, *args):
        pytest.fail("must not download")

    open = listing


def test_model_path_that_does_not_exist(tmp_path):
    for model in (str(tmp_path / "no_bundle"), "./no_bundle", "some/where"):
        with pytest.raises(InputError) as info:
            resolve_model(model, tmp_path / "cache", NoDownload())
        assert "--model" in str(info.value) and model in str(info.value)


def test_model_folder_is_used_in_place(tmp_path, bundle_dir):
    assert resolve_model(str(bundle_dir), tmp_path / "cache", NoDownload()) == bundle_dir
    assert not (tmp_path / "cache").exists()


def test_cache_dir_default():
    assert default_cache_dir({"CXRGEN_HOME": "/data/cxr"}) == "/data/cxr"
    assert default_cache_dir({}).endswith(".cache/cxrgen")


# --------------------------------------------------------------------------- text encoder


@pytest.mark.parametrize("where", ["/definitely/not/here", "./not_here", "~/not_here_either_cxrgen"])
def test_text_encoder_missing_local_folder(where):
    with pytest.raises(InputError) as info:
        load_text_encoder(where)
    assert "--text-encoder" in str(info.value)


def test_text_encoder_unreachable_repo_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as info:
        load_text_encoder("cxrgen-tests/no-such-text-encoder")
    message = str(info.value)
    assert "cxrgen-tests/no-such-text-encoder" in message and "--text-encoder" in message
    assert "tokenizer/" in message and "\n" not in message


def test_text_encoder_folder_without_model(tmp_path):
    (tmp_path / "empty" / "tokenizer").mkdir(parents=True)
    with pytest.raises(InputError) as info:
        load_text_encoder(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value) and "--text-encoder" in str(info.value)


def test_text_encoder_flat_folder_layout(tmp_path, text_encoder_dir):
    flat = tmp_path / "flat"
    shutil.copytree(text_encoder_dir / "tokenizer", flat)
    shutil.copytree(text_encoder_dir / "text_encoder", flat, dirs_exist_ok=True)
    split = load_text_encoder(str(text_encoder_dir))
    text = load_text_encoder(str(flat))
    a = split.encode(["Left basilar opacity"], torch.device("cpu"))
    b = text.encode(["Left basilar opacity"], torch.device("cpu"))
    assert torch.equal(a, b)


def test_tokenizer_quirks_and_token_info(text_encoder_dir):
    text = load_text_encoder(str(text_encoder_dir))
    tok = text.tokenizer
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    ids = tok("Effusion!")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and 0 in ids
    assert (text.token_info("").token_count, text.token_info("").truncated) == (2, False)
    assert text.token_info("Effusion!").token_count == len(ids)
    assert text.token_info(" ".join(["lung"] * 75)) == TokenInfo(77, False)
    assert text.token_info(" ".join(["lung"] * 76)) == TokenInfo(78, True)
    assert text.token_info(" ".join(["lung"] * 200)).truncated


def test_encode_shapes_and_batch_independence(text_encoder_dir):
    text = load_text_encoder(str(text_encoder_dir))
    cpu = torch.device("cpu")
    long_prompt = " ".join(["lung"] * 200)
    together = text.encode(["a", "", long_prompt, "a"], cpu)
    assert together.shape == (4, MAX_TOKENS, demo.WIDTH) and together.dtype == torch.float32
    text._cache.clear()
    alone = torch.cat([text.encode([p], cpu) for p in ["a", "", long_prompt, "a"]])
    assert torch.equal(together, alone)
    assert torch.equal(together[0], together[3])
    assert together[1].abs().sum() > 0  # the unconditional embedding encodes "", it is not zeros
