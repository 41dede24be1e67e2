"""`cxrgen plan` (issue 9): a dry run of generate that counts rows, images and label values, lists truncated and
duplicate prompts, estimates the run time, writes nothing and never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.config import RunConfig
from cxrgen.manifests.plan import (
    CPU_IMAGE_SECONDS,
    CPU_LOAD_SECONDS,
    CPU_STEP_SECONDS,
    estimate,
    plan_run,
)

runner = CliRunner()
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "sd2-tokenizer"
LONG = "Moderate right pleural effusion with adjacent compressive atelectasis " * 8
MANIFEST = (
    "id,prompt,num_images,Edema,view\n"
    "a,Small left pleural effusion.,3,1,PA\n"
    f"b,{LONG},2,0,AP\n"
    "c,Small left pleural effusion.,1,,PA\n"
    "d,Mild cardiomegaly.,0,1,PA\n"
    "e,No acute cardiopulmonary process.,,0,AP\n"
)


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "m.csv"
    path.write_text(MANIFEST)
    return path


def config(path: Path, **settings) -> RunConfig:
    return RunConfig(manifest=str(path), out=str(path.with_suffix("")), **settings)


def test_counts_rows_images_label_values_truncation_and_duplicates(manifest):
    report = plan_run(config(manifest, num_images=4))
    assert (report.rows, report.empty_rows, report.images, report.distinct_prompts) == (5, 1, 10, 3)
    assert report.label_values["Edema"] == [("0", 6), ("1", 3), ("(blank)", 1)]  # row d makes no images
    assert dict(report.label_values["view"]) == {"PA": 4, "AP": 6}
    assert [(row, prompt) for row, _, prompt in report.truncated] == [(2, LONG)]
    assert report.truncated[0][1] > 77 and report.longest == report.truncated[0][1]
    assert report.duplicates == [("Small left pleural effusion.", [1, 3])]
    assert report.out_state == "new folder"


def test_cli_lists_what_matters_and_writes_nothing(manifest, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["plan", str(manifest), "--device", "cpu", "--steps", "20"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    text = result.output
    assert "images:      7 from 3 distinct prompt(s)" in text  # row e: the default --num-images 1
    assert "truncated:   1 prompt(s) over 77 tokens" in text and "  row 2: " in text
    assert "rows 1, 3: Small left pleural effusion." in text
    assert "Edema: (blank): 1, 0: 3, 1: 3" in text
    assert "cpu: ~" in text and "cuda" not in text


def test_estimate_follows_the_benchmark_figures_and_the_device():
    lines = estimate(RunConfig(manifest="m.csv", out="o", steps=50, device="cpu"), 100)
    seconds = 100 * (CPU_STEP_SECONDS * 50 + CPU_IMAGE_SECONDS) + CPU_LOAD_SECONDS
    assert seconds == pytest.approx(100 * 298, rel=0.02)  # ~5 min per image at 50 steps on the 2-core CPU
    assert lines[0].startswith(f"cpu: ~{seconds / 3600:.1f} h for 100 image(s) at 50 steps")
    gpu = estimate(RunConfig(manifest="m.csv", out="o", steps=50, device="cuda:0,cuda:1"), 12000)
    assert len(gpu) == 1 and "~10 min on 2 GPUs" in gpu[0] and "no GPU run is measured yet" in gpu[0]
    assert len(estimate(RunConfig(manifest="m.csv", out="o"), 10)) == 3  # auto: both, and why


def test_tokens_are_counted_with_the_text_encoder_tokenizer(manifest, text_encoder_dir):
    assert plan_run(config(manifest, text_encoder=str(text_encoder_dir))).tokenizer.endswith("tokenizer")
    assert plan_run(config(manifest, text_encoder=str(FIXTURE_TOKENIZER))).longest == \
        plan_run(config(manifest)).longest
    result = runner.invoke(app, ["plan", str(manifest), "--text-encoder", "someone/not-cached"])
    assert result.exit_code == 2 and "--text-encoder someone/not-cached" in result.stderr


def test_bad_manifests_and_options_are_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,num_images\nA,-1\n")
    result = runner.invoke(app, ["plan", str(bad)])
    assert result.exit_code == 2 and "row 1, column num_images" in result.stderr
    result = runner.invoke(app, ["plan", str(bad), "--steps", "0"])
    assert result.exit_code == 2 and "--steps 0" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_plan_accepts_every_generate_option():
    """A generate command line works with plan in its place; a new generate option must be added to plan."""
    command = typer.main.get_command(app)
    options = lambda name: {o for p in command.commands[name].params  # noqa: E731
                            if isinstance(p, click.Option) for o in p.opts}
    assert options("generate") <= options("plan"), options("generate") - options("plan")


def test_plan_never_imports_torch(manifest):
    code = ("import sys; from cxrgen.cli import app; app(['plan', sys.argv[1]], standalone_mode=False); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(manifest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def bundle_folder(root: Path, channels: list, latent: tuple, demo: bool = False) -> Path:
    """Only the two configs plan reads (it never loads weights)."""
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "inference.json").write_text(json.dumps({
        "diffusion_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", "channels": channels},
        "noise": f"$torch.randn((1, {latent[0]}, {latent[1]}, {latent[2]})).to(@device)"}))
    (root / "configs" / "metadata.json").write_text(json.dumps({"cxrgen_demo": demo}))
    return root


def test_the_estimate_says_when_the_bundle_is_not_the_real_architecture(manifest, tmp_path):
    def note(model: str) -> list[str]:
        result = runner.invoke(app, ["plan", str(manifest), "--device", "cpu", "--model", model])
        assert result.exit_code == 0, result.output
        return [line for line in result.stdout.splitlines() if "these times are for" in line]

    assert note("cxr_image_synthesis_latent_diffusion_model") == []  # the default: the figures' own architecture
    assert note(str(bundle_folder(tmp_path / "real", [256, 512, 768], (3, 64, 64)))) == []
    small = note(str(bundle_folder(tmp_path / "small", [16, 32], (3, 8, 8))))
    assert len(small) == 1 and "another architecture" in small[0] and "[16, 32]" in small[0] and "3x8x8" in small[0]
    demo = note(str(bundle_folder(tmp_path / "demo", [16, 32], (3, 16, 16), demo=True)))
    assert len(demo) == 1 and "demo model" in demo[0]
    other = note("some_other_bundle@2.0")
    assert len(other) == 1 and "some_other_bundle@2.0 is another bundle" in other[0]
    # --model is a documented option of plan now, not a hidden one it ignores
    command = typer.main.get_command(app).commands["plan"]
    assert not next(p for p in command.params if "--model" in getattr(p, "opts", [])).hidden


def test_plan_with_a_bundle_folder_never_imports_torch(manifest, tmp_path):
    folder = bundle_folder(tmp_path / "small", [16, 32], (3, 8, 8))
    code = ("import sys; from cxrgen.cli import app; app(['plan', sys.argv[1], '--model', sys.argv[2]], "
            "standalone_mode=False); sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(manifest), str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
