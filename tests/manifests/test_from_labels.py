"""`cxrgen manifest from-labels` (issue 9): counting and balancing, labels that agree with the prompt, co-occurrence,
byte-identical output, the shipped templates and tokenizer, and every bad input.

Results are checked through the written manifest and the library; output text only where the message is the subject.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import NEGATION, check_labels_match_prompts, table_with, write_table
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.manifests.labels import read_labels
from cxrgen.manifests.reader import read_manifest
from cxrgen.manifests.tables import read_table
from cxrgen.manifests.templates import (
    SHIPPED_TEMPLATES,
    keyword_pattern,
    load_templates,
)
from cxrgen.manifests.tokens import MAX_TOKENS, SHIPPED_TOKENIZER, load_counter

runner = CliRunner()
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "sd2-tokenizer"
CHEXPERT = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]


@pytest.fixture(scope="module")
def counter():
    return load_counter()


@pytest.fixture(scope="module")
def templates(counter):
    return load_templates(None, counter)






def chexpert_like(path: Path, rows: int, seed: int = 1) -> Path:
    """A CheXpert-style table: realistic prevalences, cardiomegaly with edema, edema with effusion, -1 and blanks."""
    rng = random.Random(seed)
    prevalence = {"Enlarged Cardiomediastinum": .05, "Cardiomegaly": .12, "Lung Opacity": .35, "Lung Lesion": .04,
                  "Edema": .2, "Consolidation": .07, "Pneumonia": .025, "Atelectasis": .15, "Pneumothorax": .03,
                  "Pleural Effusion": .3, "Pleural Other": .012, "Fracture": .02, "Support Devices": .4}
    table = []
    for i in range(rows):
        positive = {f for f, p in prevalence.items() if rng.random() < p}
        if "Cardiomegaly" in positive and rng.random() < .5:
            positive.add("Edema")
        cells = ["1.0" if f in positive else rng.choice(["", "0.0", "-1.0"]) for f in CHEXPERT[1:]]
        table.append([f"train/patient{i:05d}/study1/view1_frontal.jpg", rng.randint(18, 90),
                      "" if positive - {"Support Devices"} else "1.0"] + cells)
    return write_table(path, ["Path", "Age", "No Finding"] + CHEXPERT[1:], table)


def build(*args: str):
    return runner.invoke(app, ["manifest", "from-labels", *map(str, args)])


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.stderr)
    return result


def manifest_frame(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


def synthetic_positives(frame: pd.DataFrame, column: str) -> int:
    return int(frame.loc[frame[column] == 1, "num_images"].sum())




# ------------------------------------------------------------------------------------------------ counting

def test_counts_of_1_0_minus1_blank_and_true_false(tmp_path, templates):
    path = write_table(tmp_path / "labels.csv", ["Path", "Edema", "pleural_effusion", "CARDIOMEGALY"], [
        ["a.jpg", "1.0", "1", "true"], ["b.jpg", "0.0", "-1", "FALSE"], ["c.jpg", "-1.0", "", "1"],
        ["d.jpg", "", "0", "nan"], ["e.jpg", "1", " 1.0 ", ""]])
    labels = read_labels(read_table(path, "label table"), templates.names)
    counts = {c.finding: (c.column, c.positive, c.negative, c.uncertain, c.blank) for c in labels.findings}
    assert counts == {"Edema": ("Edema", 2, 1, 1, 1), "Pleural Effusion": ("pleural_effusion", 2, 1, 1, 1),
                      "Cardiomegaly": ("CARDIOMEGALY", 2, 1, 0, 2)}
    assert labels.ignored == ["Path"]
    assert labels.rows == 5
    # each row's positive findings, for the co-occurrence: -1 is not positive by default
    names = [c.finding for c in labels.findings]
    assert [tuple(names[i] for i in s) for s in labels.positive_sets][:3] == [
        ("Edema", "Pleural Effusion", "Cardiomegaly"), (), ("Cardiomegaly",)]
    ones = read_labels(read_table(path, "label table"), templates.names, uncertain="positive")
    assert [tuple(names[i] for i in s) for s in ones.positive_sets][1] == ("Pleural Effusion",)


def test_counts_table_is_printed_with_the_ignored_columns(tmp_path):
    path = table_with(tmp_path / "labels.csv", {("Edema",): 3, ("Pneumothorax",): 1}, ["Edema", "Pneumothorax"])
    result = ok(build(path, "--target", "4", "-o", tmp_path / "m.csv"))
    lines = result.output.splitlines()
    assert "Path, Sex" in lines[0]
    header = lines[1].split()
    assert header[:2] == ["finding", "real"]
    edema = next(line for line in lines if line.startswith("Edema")).split()
    assert edema[1:] == ["3", "0", "0", "1", "1", "4"]  # real 1, 0, -1, blank, synthetic 1, total 1


# ------------------------------------------------------------------------------------------------ balancing

def test_target_brings_every_finding_to_n_exactly_with_single_finding_prompts(tmp_path):
    findings = ["Edema", "Pneumothorax", "Fracture", "Cardiomegaly"]
    path = table_with(tmp_path / "labels.csv", {("Edema",): 7, ("Pneumothorax",): 2, ("Cardiomegaly",): 12,
                                                ("Edema", "Fracture"): 1}, findings)
    out = tmp_path / "m.csv"
    ok(build(path, "--target", "10", "--max-findings", "1", "-o", out))
    frame = manifest_frame(out)
    real = {"Edema": 8, "Pneumothorax": 2, "Fracture": 1, "Cardiomegaly": 12}
    assert {f: synthetic_positives(frame, f) for f in findings} == {f: max(0, 10 - n) for f, n in real.items()}
    assert (frame[findings].sum(axis=1) == 1).all()


def test_target_with_co_occurrence_reaches_n_for_every_finding(tmp_path):
    out = tmp_path / "m.csv"
    ok(build(chexpert_like(tmp_path / "labels.csv", 1500), "--target", "200", "-o", out))
    frame = manifest_frame(out)
    real = pd.read_csv(tmp_path / "labels.csv", keep_default_na=False)
    for finding in CHEXPERT[1:]:
        total = int((real[finding] == "1.0").sum()) + synthetic_positives(frame, finding)
        assert total >= 200, finding
    assert (frame[CHEXPERT[1:]].sum(axis=1) > 1).any()  # combinations were drawn
    assert (frame[CHEXPERT[1:]].sum(axis=1) <= 3).all()


def test_needed_co_occurrence_gives_each_finding_exactly_what_it_needs(tmp_path):
    out = tmp_path / "m.csv"
    ok(build(chexpert_like(tmp_path / "labels.csv", 1500), "--target", "200", "--co-occurrence", "needed", "-o", out))
    frame = manifest_frame(out)
    real = pd.read_csv(tmp_path / "labels.csv", keep_default_na=False)
    for finding in CHEXPERT[1:]:
        assert synthetic_positives(frame, finding) == max(0, 200 - int((real[finding] == "1.0").sum())), finding


def test_total_fills_the_rarest_findings_first(tmp_path):
    findings = ["Pneumothorax", "Fracture", "Edema"]
    path = table_with(tmp_path / "labels.csv", {("Pneumothorax",): 1, ("Fracture",): 5, ("Edema",): 20}, findings)
    out = tmp_path / "m.csv"
    ok(build(path, "--total", "6", "--max-findings", "1", "-o", out))
    frame = manifest_frame(out)
    # 1 -> 5 (4 images), then the tie at 5 goes to the rarer real finding (6), then Fracture (6); Edema none
    assert {f: synthetic_positives(frame, f) for f in findings} == {"Pneumothorax": 5, "Fracture": 1, "Edema": 0}
    assert frame["num_images"].sum() == 6


def test_total_and_cap_stop_early_and_say_so(tmp_path):
    findings = ["Pneumothorax", "Fracture"]
    path = table_with(tmp_path / "labels.csv", {("Pneumothorax",): 1, ("Fracture",): 2}, findings)
    out = tmp_path / "m.csv"
    result = ok(build(path, "--total", "100", "--max-per-finding", "3", "-o", out))
    frame = manifest_frame(out)
    assert {f: synthetic_positives(frame, f) for f in findings} == {"Pneumothorax": 3, "Fracture": 3}
    assert "every finding reached --max-per-finding after 6 image(s)" in result.output


def test_caps_hold_for_companions_too(tmp_path):
    out = tmp_path / "m.csv"
    ok(build(chexpert_like(tmp_path / "labels.csv", 1500), "--target", "400", "--max-per-finding", "60", "-o", out))
    frame = manifest_frame(out)
    made = {f: synthetic_positives(frame, f) for f in CHEXPERT[1:]}
    assert max(made.values()) <= 60
    assert made["Pneumothorax"] == made["Fracture"] == 60  # rare ones stop at the cap


def test_ratio_makes_r_synthetic_per_real_positive(tmp_path):
    findings = ["Edema", "Pneumothorax", "Fracture"]
    path = table_with(tmp_path / "labels.csv", {("Edema",): 4, ("Pneumothorax",): 3, ("Fracture",): 0}, findings)
    out = tmp_path / "m.csv"
    result = ok(build(path, "--ratio", "1.5", "--max-findings", "1", "-o", out))
    frame = manifest_frame(out)
    # 1.5 x 3 = 4.5 rounds half up to 5
    assert {f: synthetic_positives(frame, f) for f in findings if f in frame} == {"Edema": 6, "Pneumothorax": 5,
                                                                                 "Fracture": 0}
    assert "Fracture: no real positives" in result.output


def test_normals_are_no_finding_rows_with_every_other_label_0(tmp_path, templates):
    path = table_with(tmp_path / "labels.csv", {("Edema",): 2}, ["Edema", "Pneumothorax"])
    out = tmp_path / "m.csv"
    ok(build(path, "--target", "3", "--normals", "5", "-o", out))
    frame = manifest_frame(out)
    # the table had no No Finding column: it is added for the normal rows
    normal = frame[frame["No Finding"] == 1]
    assert normal["num_images"].sum() == 5
    assert (normal[["Edema", "Pneumothorax"]] == 0).all().all()
    assert set(normal["prompt"]) <= {s.text for s in templates.normals}
    assert all(i.startswith("no-finding-") for i in normal["id"])
    assert list(frame.columns)[-1] == "template_id"


def test_normals_alone_need_no_balancing_option(tmp_path):
    path = table_with(tmp_path / "labels.csv", {("Edema",): 2}, ["Edema", "No Finding"])
    out = tmp_path / "m.csv"
    ok(build(path, "--normals", "4", "-o", out))
    assert manifest_frame(out)["No Finding"].tolist() == [1] * len(manifest_frame(out))


def test_table_of_counts_gives_single_finding_prompts(tmp_path):
    path = write_table(tmp_path / "counts.csv", ["finding", "positive", "negative"],
                       [["Pneumothorax", "2", "10"], ["edema", "9", ""], ["No Finding", "0", "0"]])
    out = tmp_path / "m.csv"
    result = ok(build(path, "--counts", "--target", "5", "--normals", "2", "-o", out))
    frame = manifest_frame(out)
    assert {f: synthetic_positives(frame, f) for f in ("Pneumothorax", "edema", "No Finding")} == \
        {"Pneumothorax": 3, "edema": 0, "No Finding": 2}
    assert "table of counts" in result.output


# ------------------------------------------------------------------------------------------------ labels and prompts

def test_every_label_agrees_with_its_prompt_on_a_large_draw(tmp_path, templates, counter):
    out = tmp_path / "m.csv"
    ok(build(chexpert_like(tmp_path / "labels.csv", 3000), "--target", "600", "--normals", "300", "-o", out))
    frame = manifest_frame(out)
    assert frame["num_images"].sum() > 3000
    check_labels_match_prompts(frame, templates, {f: f for f in CHEXPERT})
    # template_id names the positive templates of exactly the findings labelled 1, in reading order
    slugs = {f: f.lower().replace(" ", "-") for f in CHEXPERT}
    for record in frame.to_dict("records"):
        asserted = [f for f in templates.findings if record[f] == 1]
        parts = record["template_id"].split("+")
        positive = [p for p in parts if not p.startswith(("negative-", "normal-"))]
        assert [p.rsplit("-", 1)[0] for p in positive] == [slugs[f] for f in asserted], record
        assert len(re.findall(r"(?<=\.)(\s|$)", record["prompt"])) <= 5  # at most 5 sentences
    assert max(counter.counts(frame["prompt"].tolist())) <= MAX_TOKENS


def test_co_occurrence_follows_the_real_pairs_on_a_large_draw(tmp_path):
    """Images drawn for Edema carry Cardiomegaly / Effusion as often as Edema's real positives do."""
    findings = ["Edema", "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Fracture"]
    # Cardiomegaly, Effusion and Fracture are common enough already: every image is drawn for Edema or Pneumothorax
    path = table_with(tmp_path / "labels.csv", {("Edema",): 100, ("Edema", "Cardiomegaly"): 60,
                                                ("Edema", "Pleural Effusion"): 30,
                                                ("Edema", "Cardiomegaly", "Pleural Effusion"): 10,
                                                ("Pneumothorax", "Fracture"): 5, ("Cardiomegaly",): 5000,
                                                ("Pleural Effusion",): 5000, ("Fracture",): 5000}, findings,
                      extra=False)
    out = tmp_path / "m.csv"
    ok(build(path, "--target", "4000", "-o", out))
    frame = manifest_frame(out)
    edema = frame[frame["id"].str.startswith("edema-")]  # ids name the finding an image was drawn for
    weights = edema["num_images"]
    n = weights.sum()
    assert n == 3800
    share = lambda mask: float(weights[mask].sum()) / n  # noqa: E731
    card, eff = edema["Cardiomegaly"] == 1, edema["Pleural Effusion"] == 1
    assert share(card) == pytest.approx(70 / 200, abs=0.03)
    assert share(eff) == pytest.approx(40 / 200, abs=0.03)
    assert share(card & eff) == pytest.approx(10 / 200, abs=0.015)
    assert share(~card & ~eff) == pytest.approx(100 / 200, abs=0.03)
    assert (edema["Pneumothorax"] == 0).all() and (edema["Fracture"] == 0).all()  # never seen with Edema
    # every real Pneumothorax positive has a Fracture: so does every image drawn for Pneumothorax
    pneumothorax = frame[frame["id"].str.startswith("pneumothorax-")]
    assert pneumothorax["num_images"].sum() == 3995 and (pneumothorax["Fracture"] == 1).all()


def test_max_findings_limits_the_findings_per_prompt(tmp_path):
    out = tmp_path / "m.csv"
    ok(build(chexpert_like(tmp_path / "labels.csv", 800), "--target", "100", "--max-findings", "2", "-o", out))
    counts = manifest_frame(out)[CHEXPERT[1:]].sum(axis=1)
    assert counts.max() == 2 and counts.min() == 1


def test_the_manifest_is_an_ordinary_manifest_for_generate(tmp_path):
    out = tmp_path / "aug.parquet"
    ok(build(chexpert_like(tmp_path / "labels.csv", 300), "--target", "40", "--normals", "3", "-o", out))
    manifest = read_manifest(out)
    assert [r.row_id for r in manifest.rows] == manifest_frame(out)["id"].tolist()
    assert manifest.labels.column_names == CHEXPERT + ["template_id"]
    schema = pq.read_schema(out)
    assert str(schema.field("num_images").type) == "int64" and str(schema.field("Edema").type) == "int64"
    # same content as the CSV made from the same input and seed
    ok(build(tmp_path / "labels.csv", "--target", "40", "--normals", "3", "-o", tmp_path / "aug.csv"))
    assert manifest_frame(out).equals(manifest_frame(tmp_path / "aug.csv"))
    # ids are file-name safe, unique, and never start like a dataset split name
    ids = manifest_frame(out)["id"]
    assert ids.is_unique and ids.str.fullmatch(r"[a-z0-9-]+").all()
    assert not ids.str.match(r"(train|test|val|valid|eval|dev)").any()


def test_same_input_and_seed_give_the_same_bytes(tmp_path):
    labels = chexpert_like(tmp_path / "labels.csv", 600)
    args = ["--target", "80", "--normals", "10"]
    ok(build(labels, *args, "-o", tmp_path / "a.csv"))
    ok(build(labels, *args, "-o", tmp_path / "b.csv"))
    ok(build(labels, *args, "--seed", "1", "-o", tmp_path / "c.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    # another process with another hash seed (set and dict order) writes the same bytes too
    code = ("import sys; from cxrgen.cli import app; app(['manifest', 'from-labels', sys.argv[1], '--target', '80', "
            "'--normals', '10', '-o', sys.argv[2]], standalone_mode=False)")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(labels), str(tmp_path / "d.csv")], check=True, env=env,
                   capture_output=True)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "d.csv").read_bytes()


def test_manifest_and_plan_commands_never_import_torch(tmp_path):
    labels = chexpert_like(tmp_path / "labels.csv", 200)
    pd.DataFrame({"report": ["FINDINGS: Small effusion. IMPRESSION: Effusion."]}).to_csv(tmp_path / "r.csv")
    code = ("import sys; from cxrgen.cli import app\n"
            "app(['manifest', 'from-labels', sys.argv[1], '--target', '30', '-o', sys.argv[2]],\n"
            "    standalone_mode=False)\n"
            "app(['manifest', 'from-reports', sys.argv[3], '-o', sys.argv[4]], standalone_mode=False)\n"
            "app(['plan', sys.argv[2]], standalone_mode=False)\n"
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(labels), str(tmp_path / "m.csv"), str(tmp_path / "r.csv"),
                           str(tmp_path / "p.csv")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.csv").is_file() and (tmp_path / "p.csv").is_file()


# ------------------------------------------------------------------------------------------------ shipped files

def test_shipped_templates_fit_77_tokens_with_every_slot_value(templates, counter):
    import itertools

    from cxrgen.manifests.templates import fill, slots_of

    sentences = [s for f in templates.findings for s in templates.positive[f]] + list(templates.negatives) + \
        list(templates.normals)
    checked = 0
    for sentence in sentences:
        names = slots_of(sentence.text)
        for values in itertools.product(*(templates.slots[n] for n in names)):
            text = fill(sentence.text, dict(zip(names, values)))
            assert counter.count(text) <= MAX_TOKENS, text
            checked += 1
    assert checked > 250  # every filled-in variant of every sentence
    assert templates.names == [*(f for f in templates.findings), "No Finding"]
    assert sorted(templates.names) == sorted(CHEXPERT)


def test_shipped_templates_assert_only_their_own_finding_and_negatives_deny(templates):
    patterns = {f: keyword_pattern(templates.keywords[f]) for f in templates.findings}
    for finding in templates.findings:
        assert len(templates.positive[finding]) >= 4, finding
        for sentence in templates.positive[finding]:
            assert not NEGATION.search(sentence.text), sentence.text  # positives never deny
            assert [f for f, p in patterns.items() if p.search(sentence.text)] == [finding], sentence.text
    for sentence in list(templates.negatives) + list(templates.normals):
        assert NEGATION.search(sentence.text), sentence.text
    # variations radiologists write: size or severity, side, location
    texts = " ".join(s.text for f in templates.findings for s in templates.positive[f])
    for slot in ("{size}", "{severity}", "{side}", "{lobe}", "{base}"):
        assert slot in texts
    assert any(s.text == "No pneumothorax." for s in templates.negatives)
    assert any(s.text == "No acute cardiopulmonary process." for s in templates.normals)


def test_shipped_tokenizer_is_the_real_sd2_tokenizer():
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
        assert digest(SHIPPED_TOKENIZER / name) == digest(FIXTURE_TOKENIZER / name), name
    import cxrgen.model.text_encoder

    assert MAX_TOKENS == cxrgen.model.text_encoder.MAX_TOKENS


def test_tokenizer_option_takes_a_tokenizer_or_text_encoder_folder(tmp_path):
    labels = table_with(tmp_path / "labels.csv", {("Edema",): 1}, ["Edema"])
    ok(build(labels, "--target", "2", "--tokenizer", FIXTURE_TOKENIZER, "-o", tmp_path / "a.csv"))
    encoder = tmp_path / "encoder"
    (encoder / "tokenizer").mkdir(parents=True)
    for f in FIXTURE_TOKENIZER.iterdir():
        (encoder / "tokenizer" / f.name).write_bytes(f.read_bytes())
    ok(build(labels, "--target", "2", "--tokenizer", encoder, "-o", tmp_path / "b.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_templates_file_replaces_the_shipped_set(tmp_path):
    spec = {"cxrgen_templates": 1, "slots": {"side": ["left", "right"]},
            "findings": {"Hernia": {"keywords": ["hernia"], "positive": ["Small hiatal hernia.", "{side} hernia."]},
                         "Edema": {"positive": ["Mild edema."]}},
            "negatives": [{"text": "No hernia.", "negates": ["Hernia"]}],
            "conflicts": [["Hernia", "Edema"]]}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    labels = table_with(tmp_path / "labels.csv", {("hernia",): 2, ("Edema", "hernia"): 3}, ["hernia", "Edema"])
    out = tmp_path / "m.csv"
    ok(build(labels, "--templates", tmp_path / "t.json", "--target", "20", "-o", out))
    frame = manifest_frame(out)
    assert set(frame.columns) == {"id", "prompt", "num_images", "hernia", "Edema", "template_id"}
    assert not ((frame["hernia"] == 1) & (frame["Edema"] == 1)).any()  # the conflict keeps them apart
    assert set(frame.loc[frame["hernia"] == 1, "prompt"].str.split(".").str[0]) <= \
        {"Small hiatal hernia", "Left hernia", "Right hernia"}


# ------------------------------------------------------------------------------------------------ bad input

def refused(result, *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr naming what is wrong; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrgen: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_bad_cell_names_file_row_and_column_and_writes_nothing(tmp_path):
    path = write_table(tmp_path / "labels.csv", ["Path", "Edema"], [["a", "1"], ["b", "0"], ["c", "2"]])
    out = tmp_path / "m.csv"
    line = refused(build(path, "--target", "5", "-o", out), "labels.csv row 3, column Edema", "'2'", "fix the cell")
    assert "is not 1, 0, -1 or blank" in line
    assert not out.exists()


@pytest.mark.parametrize("content,needle", [
    ("", "labels.csv"),  # empty file
    ("Path,Edema\n", "no data rows"),  # header only
    ("Path,Age\na,3\n", "no finding column"),
])
def test_empty_or_findingless_tables_are_refused(tmp_path, content, needle):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    refused(build(path, "--target", "5", "-o", tmp_path / "m.csv"), needle)
    assert not (tmp_path / "m.csv").exists()


def test_unreadable_tables_are_refused(tmp_path):
    bad = tmp_path / "labels.parquet"
    bad.write_bytes(b"not a parquet file at all")
    refused(build(bad, "--target", "5", "-o", tmp_path / "m.csv"), "labels.parquet cannot be read as parquet")
    refused(build(tmp_path / "missing.csv", "--target", "5", "-o", tmp_path / "m.csv"), "missing.csv does not exist")
    (tmp_path / "labels.xlsx").write_bytes(b"PK")
    refused(build(tmp_path / "labels.xlsx", "--target", "5", "-o", tmp_path / "m.csv"), "unknown format '.xlsx'")
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("args,needle", [
    (["--target", "-1"], "--target -1"),
    (["--target", "3", "--ratio", "1"], "give only one of"),
    ([], "--target N, --ratio R or --total T"),
    (["--ratio", "-0.5"], "--ratio -0.5"),
    (["--total", "-3"], "--total -3"),
    (["--target", "3", "--max-per-finding", "-1"], "--max-per-finding -1"),
    (["--target", "3", "--max-findings", "4"], "--max-findings 4"),
    (["--target", "3", "--normals", "-2"], "--normals -2"),
    (["--target", "3", "--uncertain", "maybe"], "--uncertain 'maybe'"),
    (["--target", "3", "--co-occurrence", "some"], "--co-occurrence 'some'"),
    (["--target", "3", "--findings", "Edema,Hernia"], "--findings 'Hernia'"),
    (["--target", "3", "--findings", "Path"], "no finding of that name"),
    (["--target", "3", "--tokenizer", "/no/such/folder"], "--tokenizer /no/such/folder"),
    (["--target", "3", "--tokenizer", "someone/not-cached"], "not in the local cache"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, args, needle):
    path = table_with(tmp_path / "labels.csv", {("Edema",): 2}, ["Edema"])
    refused(build(path, *args, "-o", tmp_path / "m.csv"), needle)
    assert not (tmp_path / "m.csv").exists()


def test_output_must_be_a_new_csv_or_parquet_file(tmp_path):
    path = table_with(tmp_path / "labels.csv", {("Edema",): 2}, ["Edema"])
    before = path.read_bytes()
    refused(build(path, "--target", "3", "-o", path), "is the input file")
    assert path.read_bytes() == before
    refused(build(path, "--target", "3", "-o", tmp_path / "m.txt"), "-o", ".csv or .parquet")
    refused(build(path, "--target", "3", "-o", tmp_path), "is a folder")


def test_nothing_to_make_is_refused(tmp_path):
    path = table_with(tmp_path / "labels.csv", {("Edema",): 5}, ["Edema"])
    refused(build(path, "--target", "3", "-o", tmp_path / "m.csv"), "nothing to make")
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("mutate,needle", [
    # bad JSON: a missing comma
    (lambda s: s.replace('"cxrgen_templates": 1,', '"cxrgen_templates": 1'), "line 3, column 3: Expecting"),
    (lambda s: s.replace('"cxrgen_templates": 1', '"cxrgen_templates": 7'), "not a cxrgen template file"),
    (lambda s: s.replace('"{size} {side} pneumothorax."', '"{size} {side} pneumothorax. ' + "Very " * 80 + '."'),
     "over 77; shorten it"),
    (lambda s: s.replace('"Multifocal pneumonia."', '"Multifocal pneumonia with consolidation."'),
     "mentions Consolidation"),
    (lambda s: s.replace('"Multifocal pneumonia."', '"Multifocal {kind} pneumonia."'), "slot {kind} is not defined"),
    (lambda s: s.replace('"Multifocal pneumonia."', '"Multifocal infiltrates."'), "names none of the keywords"),
    (lambda s: s.replace('{"text": "No pneumothorax.", "negates": ["Pneumothorax"]}',
                         '{"text": "No pneumothorax or effusion.", "negates": ["Pneumothorax"]}'),
     "does not list it in negates"),
    (lambda s: s.replace('"negates": ["Fracture"]', '"negates": ["Fractures"]'), "'Fractures' is not under findings"),
    (lambda s: s.replace('"conflicts": []', '"conflicts": [["Edema"]]'), "conflicts[0]"),
])
def test_bad_template_files_are_refused(tmp_path, mutate, needle):
    text = SHIPPED_TEMPLATES.read_text()
    changed = mutate(text)
    assert changed != text
    (tmp_path / "t.json").write_text(changed)
    labels = table_with(tmp_path / "labels.csv", {("Edema",): 2}, ["Edema"])
    refused(build(labels, "--templates", tmp_path / "t.json", "--target", "3", "-o", tmp_path / "m.csv"),
            "t.json", needle)
    assert not (tmp_path / "m.csv").exists()


def test_shipped_chexpert14_is_what_its_documented_command_writes(tmp_path, templates):
    root = Path(__file__).resolve().parents[2] / "manifests"
    command = next(line for line in (root / "README.md").read_text().splitlines()
                   if line.startswith("cxrgen manifest from-labels manifests/chexpert14-counts.csv"))
    args = command.split()[3:]
    args[args.index("-o") + 1] = str(tmp_path / "chexpert14.csv")
    ok(runner.invoke(app, ["manifest", "from-labels", str(root / "chexpert14-counts.csv"), *args[1:]]))
    assert (tmp_path / "chexpert14.csv").read_bytes() == (root / "chexpert14.csv").read_bytes()
    frame = manifest_frame(root / "chexpert14.csv")
    assert {f: synthetic_positives(frame, f) for f in CHEXPERT} == {f: 8 for f in CHEXPERT}
    check_labels_match_prompts(frame, templates, {f: f for f in CHEXPERT})
    assert read_manifest(root / "chexpert14.csv").labels.column_names == sorted(CHEXPERT) + ["template_id"]


# ------------------------------------------------------------------------------------------------ issue 19, item 2

U_ONES = [["a.jpg", "-1", "0"], ["b.jpg", "-1.0", ""], ["c.jpg", "-1", "0"], ["d.jpg", "", "1"]]  # Pneumothorax, Edema


@pytest.mark.parametrize("policy, pneumothorax", [("positive", 0), ("ignore", 3)])
def test_uncertain_positive_counts_minus_one_towards_the_target(tmp_path, policy, pneumothorax):
    path = write_table(tmp_path / "labels.csv", ["Path", "Pneumothorax", "Edema"], U_ONES)
    out = tmp_path / "m.csv"
    ok(build(path, "--target", "3", "--uncertain", policy, "-o", out))
    frame = pd.read_csv(out)
    made = lambda column: int((frame[column] * frame["num_images"]).sum())  # noqa: E731
    assert made("Pneumothorax") == pneumothorax  # three U-Ones already reach the target of 3
    assert made("Edema") == 2


@pytest.mark.parametrize("policy, anchor", [("positive", "Edema"), ("ignore", "Pneumothorax")])
def test_uncertain_positive_ranks_findings_by_their_u_ones_too(tmp_path, policy, anchor):
    # rarest first: under U-Ones Pneumothorax has 3 positives and Edema 1, so Edema is the rarer one
    path = write_table(tmp_path / "labels.csv", ["Path", "Pneumothorax", "Edema"], U_ONES)
    out = tmp_path / "m.csv"
    ok(build(path, "--total", "2", "--uncertain", policy, "-o", out))
    frame = pd.read_csv(out)
    assert int(frame["num_images"].sum()) == 2
    assert set(frame.loc[frame[anchor] == 1, "num_images"].index) == set(frame.index)


def test_uncertain_positive_counts_minus_one_in_ratio_and_in_a_table_of_counts(tmp_path):
    path = write_table(tmp_path / "labels.csv", ["Path", "Pneumothorax", "Edema"], U_ONES)
    ok(build(path, "--ratio", "1", "--uncertain", "positive", "-o", tmp_path / "ratio.csv"))
    frame = pd.read_csv(tmp_path / "ratio.csv")
    assert int((frame["Pneumothorax"] * frame["num_images"]).sum()) == 3  # one per real positive, U-Ones included
    counts = write_table(tmp_path / "counts.csv", ["finding", "positive", "uncertain"],
                         [["Pneumothorax", "0", "3"], ["Edema", "1", "0"]])
    ok(build(counts, "--counts", "--target", "3", "--uncertain", "positive", "-o", tmp_path / "counts_m.csv"))
    frame = pd.read_csv(tmp_path / "counts_m.csv")
    assert "Pneumothorax" not in frame.columns or int((frame["Pneumothorax"] * frame["num_images"]).sum()) == 0
    assert int((frame["Edema"] * frame["num_images"]).sum()) == 2
