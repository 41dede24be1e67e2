import os
import sys
from pathlib import Path

# No test may reach the network, even by accident. huggingface_hub reads these once, at import, so they
# are set here, before anything imports it; subprocesses inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from cxrgen.model import demo  # noqa: E402


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """A tiny bundle (v1.0.1 config, old checkpoint layout) shared by the session; never modify it."""
    return demo.build_bundle(tmp_path_factory.mktemp("bundle") / "tiny_bundle")


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP text encoder with the real SD 2.x tokenizer files."""
    return demo.build_text_encoder(tmp_path_factory.mktemp("text") / "clip")


@pytest.fixture(scope="session")
def verifier_file(tmp_path_factory) -> Path:
    """A random-weight DenseNet in torchxrayvision's release format, named as the default verifier's release file."""
    import tiny_eval

    return tiny_eval.save_verifier(tmp_path_factory.mktemp("verifier"))


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Belt and braces: the value huggingface_hub consults, in case it was imported before this file."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def loopback_hub(tmp_path, monkeypatch):
    """A hub on 127.0.0.1 (tests/fake_hub.py) that huggingface_hub may reach: online for this test only, with an
    empty Hugging Face cache of its own and no proxy in the way. Files are added with add_repo / add_url."""
    import huggingface_hub.constants
    from fake_hub import LoopbackHub

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub = LoopbackHub(tmp_path / "hub")
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared CI cores: one intra-op thread is several times faster than two contended."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1 for this module, with its variables set in this process only.

    Yields the server: .endpoint, .gate (faults, request log) and .bucket() (a new empty bucket's name).
    """
    import secrets

    import s3_server

    server = s3_server.GatedMotoServer()
    server.start()

    def bucket() -> str:
        # moto keeps its buckets in this process for the whole session, across servers: never reuse a name
        name = f"cxrgen-test-{secrets.token_hex(6)}"
        s3_server.make_bucket(server.endpoint, name)
        return name
    server.bucket = bucket
    server.env = s3_server.environment(server.endpoint)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        yield server
    server.stop()
