"""`cxrgen manifest from-reports` (issue 9): FINDINGS/IMPRESSION sections of MIMIC-CXR and IU X-ray style reports,
placeholders, the 5-sentence and 77-token limits, prompts per report, carried columns, same bytes for the same seed,
and bad input."""
from __future__ import annotations

import random

import pandas as pd
import pytest
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.manifests.from_reports import pick_windows, sections, sentences, windows
from cxrgen.manifests.reader import read_manifest
from cxrgen.manifests.tokens import MAX_TOKENS, load_counter

runner = CliRunner()

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough and fever  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is a small left pleural effusion with adjacent atelectasis.  The heart
 size is mildly enlarged.  No pneumothorax is seen.  Findings were discussed with
 Dr. ___ at 10:30 on ___.

 IMPRESSION:

 1. Small left pleural effusion.
 2. Mild cardiomegaly.
"""
IU = ("FINDINGS: The heart is normal in size. The mediastinum is unremarkable. XXXX opacity in the right lung base. "
      "IMPRESSION: No acute disease. XXXX.")
PLAIN = "Lungs are clear. No pleural effusion. Heart size normal."


@pytest.fixture(scope="module")
def counter():
    return load_counter()


def write_reports(path, reports: list[str], **columns) -> None:
    pd.DataFrame({"report": reports, **columns}).to_csv(path, index=False)


def make(*args):
    return runner.invoke(app, ["manifest", "from-reports", *map(str, args)])


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.stderr)
    return result


def test_mimic_report_gives_findings_and_impression_without_headers_or_placeholders():
    found = sentences(sections(MIMIC))
    assert found == ["There is a small left pleural effusion with adjacent atelectasis.",
                     "The heart size is mildly enlarged.", "No pneumothorax is seen.",
                     "Findings were discussed with Dr. at 10:30 on.", "Small left pleural effusion.",
                     "Mild cardiomegaly."]
    text = " ".join(found)
    for gone in ("FINAL REPORT", "INDICATION", "cough", "TECHNIQUE", "COMPARISON", "FINDINGS", "IMPRESSION", "___"):
        assert gone not in text


def test_iu_report_on_one_line_with_xxxx_placeholders():
    assert sentences(sections(IU)) == ["The heart is normal in size.", "The mediastinum is unremarkable.",
                                       "opacity in the right lung base.", "No acute disease."]


def test_report_without_sections_is_used_whole():
    assert sentences(sections(PLAIN)) == ["Lungs are clear.", "No pleural effusion.", "Heart size normal."]
    assert sentences(sections("Impression: No acute process.  Indication: fever.")) == ["No acute process."]


def test_windows_hold_at_most_max_sentences_and_77_tokens():
    counts = [10, 10, 10, 10, 10, 10, 10, 10]  # 8 tokens each without start/end
    spans = windows(counts, 5)
    assert spans[0] == 5 and spans[6] == 8  # 5 sentences at most; the end of the report cuts the last ones
    long = [40, 40, 40, 80]  # 38 + 38 would be 78 with start and end: one sentence per window; 80 never fits
    assert windows(long, 5) == {0: 1, 1: 2, 2: 3}
    rng = random.Random(0)
    chosen = pick_windows(windows([10] * 10, 5), 2, rng)
    assert len(chosen) == 2 and chosen[0][1] <= chosen[1][0]  # two windows that share no sentence


def test_prompts_follow_the_limits_and_the_per_report_count(tmp_path, counter):
    many = " ".join(f"Finding number {i} is stable." for i in range(1, 13))
    wordy = " ".join(["The left lower lobe shows a rounded density that has not changed in size or shape "
                      "compared with the prior examination from last year and needs no follow-up at all."] * 3)
    too_long = "word " * 90 + "."
    write_reports(tmp_path / "reports.csv", [many, wordy, too_long, "", MIMIC])
    out = tmp_path / "prompts.csv"
    result = ok(make(tmp_path / "reports.csv", "--per-report", "2", "-o", out))
    frame = pd.read_csv(out, keep_default_na=False)
    assert frame["report_row"].tolist() == [1, 1, 2, 2, 5, 5]
    assert "rows 3, 4" in result.output  # too long and blank reports give no prompt, and are named
    for record in frame.to_dict("records"):
        assert counter.count(record["prompt"]) <= MAX_TOKENS
        first, last = map(int, record["sentences"].split("-"))
        assert 1 <= last - first + 1 <= 5
    many_rows = frame[frame["report_row"] == 1]
    spans = [tuple(map(int, s.split("-"))) for s in many_rows["sentences"]]
    assert spans[0][1] < spans[1][0]  # two windows that share no sentence, in report order
    assert [f"Finding number {i} is stable." for i in range(spans[0][0], spans[0][1] + 1)] == \
        many_rows["prompt"].iloc[0].replace(". ", ".|").split("|")
    assert frame["id"].tolist() == ["report000001-1", "report000001-2", "report000002-1", "report000002-2",
                                    "report000005-1", "report000005-2"]
    # --max-sentences 2
    ok(make(tmp_path / "reports.csv", "--max-sentences", "2", "-o", tmp_path / "two.csv"))
    two = pd.read_csv(tmp_path / "two.csv", keep_default_na=False)
    assert [last - first + 1 <= 2 for first, last in (map(int, s.split("-")) for s in two["sentences"])] == \
        [True] * len(two)


def test_other_columns_ride_along_and_never_become_settings(tmp_path):
    write_reports(tmp_path / "reports.csv", [IU, PLAIN], id=["s1", "s2"], seed=[5, 6], Edema=["1.0", ""],
                  num_images=["3", "4"])
    out = tmp_path / "prompts.csv"
    ok(make(tmp_path / "reports.csv", "--num-images", "2", "-o", out))
    frame = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(frame.columns) == ["id", "prompt", "num_images", "report_row", "sentences", "report_id",
                                   "report_seed", "Edema", "report_num_images"]
    assert frame["report_id"].tolist() == ["s1", "s2"] and frame["Edema"].tolist() == ["1.0", ""]
    assert frame["num_images"].tolist() == ["2", "2"]
    manifest = read_manifest(out)
    assert [r.seed for r in manifest.rows] == [None, None] and [r.num_images for r in manifest.rows] == [2, 2]


def test_several_text_columns_are_joined(tmp_path):
    pd.DataFrame({"findings": ["The heart is normal in size. XXXX."], "impression": ["No acute disease."],
                  "uid": ["CXR1"]}).to_csv(tmp_path / "indiana.csv", index=False)
    out = tmp_path / "p.csv"
    ok(make(tmp_path / "indiana.csv", "--text-column", "findings,impression", "-o", out))
    frame = pd.read_csv(out, keep_default_na=False)
    assert frame["prompt"].tolist() == ["The heart is normal in size. No acute disease."]
    assert list(frame.columns)[-1] == "uid"


def test_parquet_in_and_out_keeps_the_column_types(tmp_path):
    pd.DataFrame({"report": [IU, PLAIN], "study": [10, 11], "Edema": [1.0, None]}).to_parquet(tmp_path / "r.parquet")
    ok(make(tmp_path / "r.parquet", "-o", tmp_path / "p.parquet"))
    manifest = read_manifest(tmp_path / "p.parquet")
    types = {f.name: str(f.type) for f in manifest.labels.schema}
    assert types["study"] == "int64" and types["Edema"] == "double" and types["report_row"] == "int64"
    # a CSV input gives Parquet columns the types generate would give the CSV's cells
    write_reports(tmp_path / "r.csv", [IU], Edema=["1"])
    ok(make(tmp_path / "r.csv", "-o", tmp_path / "q.parquet"))
    assert str(read_manifest(tmp_path / "q.parquet").labels.schema.field("Edema").type) == "int64"


def test_same_input_and_seed_give_the_same_bytes(tmp_path):
    reports = [" ".join(f"Finding {i} of report {r} is stable." for i in range(12)) for r in range(20)]
    write_reports(tmp_path / "reports.csv", reports)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ok(make(tmp_path / "reports.csv", "--per-report", "2", "--seed", seed, "-o", tmp_path / f"{name}.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def refused(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrgen: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_input_is_refused_and_nothing_written(tmp_path):
    write_reports(tmp_path / "reports.csv", [IU])
    out = tmp_path / "p.csv"
    refused(make(tmp_path / "reports.csv", "--text-column", "text", "-o", out), "reports.csv has no column 'text'",
            "--text-column")
    refused(make(tmp_path / "reports.csv", "--max-sentences", "0", "-o", out), "--max-sentences 0")
    refused(make(tmp_path / "reports.csv", "--per-report", "0", "-o", out), "--per-report 0")
    (tmp_path / "empty.csv").write_text("report\n")
    refused(make(tmp_path / "empty.csv", "-o", out), "empty.csv", "no data rows")
    write_reports(tmp_path / "blank.csv", ["", "___ XXXX"])
    refused(make(tmp_path / "blank.csv", "-o", out), "blank.csv, column report", "no report gave a sentence")
    assert not out.exists()


# ------------------------------------------------------------------ issue 19: item 3 and the 77-token boundary

def test_mimic_recommendations_header_in_any_spelling_ends_the_kept_section():
    report = ("FINDINGS: Small left effusion. IMPRESSION: Small effusion. "
              "RECOMMENDATION(S): Chest CT in 3 months.")
    assert sentences(sections(report)) == ["Small left effusion.", "Small effusion."]
    for header in ("RECOMMENDATION(S)", "Recommendations", "recommendation", "Wet read", "CLINICAL INDICATION",
                   "Comparison film", "Reference exam", "Patient history", "INDICATION(S)"):
        assert sentences(sections(f"FINDINGS: Clear lungs. {header}: Follow up in 3 months.")) == ["Clear lungs."]
    for header in ("IMPRESSION(S)", "Impressions", "CONCLUSION(S)", "Findings/ Impression", "FINDING"):
        assert sentences(sections(f"INDICATION: Cough. {header}: No acute process.")) == ["No acute process."]


def test_a_sentence_starting_in_lower_case_is_a_sentence_of_its_own(tmp_path):
    iu = ("FINDINGS: No pleural effusions or pneumothoraces. cardiomegaly. Degenerative changes of the spine. "
          "Heart size is enlarged. Lungs are clear. No focal airspace disease. IMPRESSION: Cardiomegaly.")
    found = sentences(sections(iu))
    assert found[:3] == ["No pleural effusions or pneumothoraces.", "cardiomegaly.",
                         "Degenerative changes of the spine."]
    assert len(found) == 7
    assert sentences("Seen at 10 a.m. on the film. e.g. edema is seen with Dr. smith.") == \
        ["Seen at 10 a.m. on the film.", "e.g. edema is seen with Dr. smith."]  # abbreviations do not end one
    write_reports(tmp_path / "reports.csv", [iu])
    ok(make(tmp_path / "reports.csv", "--max-sentences", "5", "-o", tmp_path / "p.csv"))
    prompt = pd.read_csv(tmp_path / "p.csv")["prompt"].iloc[0]
    assert len(sentences(prompt)) <= 5 and prompt.count(".") <= 5


def _words(n: int) -> str:
    return " ".join(["Left"] + ["left"] * (n - 1)) + "."  # one token each (CLIP lower-cases): n + 3 with start, end


def test_windows_take_sentences_up_to_exactly_77_tokens():
    assert windows([77], 5) == {0: 1} and windows([78], 5) == {}
    assert windows([40, 39], 5) == {0: 2, 1: 2}  # 2 + 38 + 37 = 77 tokens: both fit
    assert windows([40, 40], 5) == {0: 1, 1: 2}  # 78: only one at a time


@pytest.mark.parametrize("report, prompts", [
    (_words(74), [_words(74)]),  # a sentence of exactly 77 tokens fits
    (_words(75), []),  # 78 tokens: no window
    (f"{_words(37)} {_words(36)}", [f"{_words(37)} {_words(36)}"]),  # two sentences summing to 77 fit together
    (f"{_words(37)} {_words(37)}", [_words(37)]),  # 78 together: the first window takes one
])
def test_from_reports_keeps_prompts_of_exactly_77_tokens(report, prompts, counter, tmp_path):
    assert counter.count(_words(74)) == MAX_TOKENS == 77 and counter.count(f"{_words(37)} {_words(36)}") == 77
    write_reports(tmp_path / "reports.csv", [report, "Lungs are clear."])
    ok(make(tmp_path / "reports.csv", "-o", tmp_path / "p.csv"))
    frame = pd.read_csv(tmp_path / "p.csv")
    assert frame.loc[frame["report_row"] == 1, "prompt"].tolist() == prompts
