"""QC report (`lesionsynth.report`) and one-screen summaries (`lesionsynth.inspect`) on small synthetic data."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lesionsynth import __version__
from lesionsynth.bank import Bank
from lesionsynth.errors import InputError
from lesionsynth.inspect import MAX_LINES, summarize
from lesionsynth.pipeline import GenerateConfig, generate
from lesionsynth.report import choose_sites, component_volumes, read_output, write_report

from .conftest import REPO, blob_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def output(blob_bank, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    generate(blob_bank, out, GenerateConfig(n=6, load="uniform", seed=1), progress=False)
    return out


@pytest.fixture(scope="module")
def report(output) -> Path:
    return write_report(output, n_examples=3, seed=0)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ report

def embedded_pngs(text: str) -> dict[str, bytes]:
    """The pictures of a report page by their names (data-name)."""
    return {name: base64.b64decode(data) for name, data in
            re.findall(r'<img data-name="([^"]+)" src="data:image/png;base64,([^"]+)"', text)}


def test_report_is_one_self_contained_html(report, output):
    assert report == output / "report" / "report.html"
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "data:image/png;base64," in text
    # nothing is fetched from elsewhere: every src is a data URI, no stylesheet links, scripts only inline
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<link\b|<script\b[^>]*\bsrc\b|\bhref\s*=\s*[\"']?(https?:|//|file:)|url\(", text, re.I)
    # the pictures are in the page only, each once
    assert not list((output / "report").glob("*.png"))
    assert len(srcs) == len(embedded_pngs(text))


def test_report_heads_with_the_run_and_lists_every_case(report, output):
    text = report.read_text()
    head = text[:text.index('id="summary"')]
    assert "lesionsynth generate" in head and "--n 6 --load uniform --seed 1" in head
    assert "finished 20" in head and f"lesionsynth {__version__}" in head
    table = text[text.index('<table class="sortable">'):]
    table = table[:table.index("</table>")]
    for rec in _records(output):
        row = re.search(rf'<tr><td data-v="{rec["case_id"]}">.*?</tr>', table).group(0)
        assert f'<td data-v="{rec["base_case"]}">' in row and rec["stop_reason"] in row
        pasted = sum(op["op"] == "paste" for op in rec["ops"])
        assert f'data-v="{rec["target_load_mm3"]:.10g}"' in row and f'<td class="n" data-v="{pasted}">' in row
    assert "<script>" in text and "table.sortable" in text  # the inline sorter
    assert '<h2 id="config">Configuration</h2>' in text and "augment.rotation_deg" in text


def test_report_captions_say_what_each_site_shows(report, output):
    text = report.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text, flags=re.S)
    assert captions and not any(".png" in c for c in captions)
    records = {r["case_id"]: r for r in _records(output)}
    for caption in captions:
        case_id = caption.split(" ", 1)[0]
        assert case_id in records and f"base {records[case_id]['base_case']}" in caption
        assert "<b>paste</b>" in caption or "<b>inpaint</b>" in caption
        if "<b>paste</b>" in caption:
            assert "from donor case" in caption and "scale" in caption


def test_report_sections_and_numbers(report, output):
    text = report.read_text()
    for section in ('id="summary"', 'id="load"', 'id="lesions"', 'id="examples"', 'id="stop"'):
        assert section in text
    for words in ("target vs achieved", "Lesion count and size", "Example sites", "Stop reasons"):
        assert words in text
    records = _records(output)
    ok = sum(abs(r["achieved_load_mm3"] - r["target_load_mm3"]) <= r["tolerance"] * r["target_load_mm3"] + 1e-9
             for r in records)
    assert f"{ok} of {len(records)} cases ({ok / len(records):.0%}) reached their target load within ±10%" in text
    for reason in {r["stop_reason"] for r in records}:
        assert f"<td>{reason}</td>" in text


def test_report_pngs_are_real_pictures(report, output):
    from matplotlib.image import imread

    pictures = embedded_pngs(report.read_text())
    names = set(pictures)
    assert {"loads.png", "lesions.png"} <= names
    sites = sorted(n for n in names if n.startswith("site"))
    n_channels = len(json.loads((output / "dataset.json").read_text())["channel_names"])
    drawn = {n.rsplit("_c", 1)[0] for n in sites}  # one picture per channel of each site
    assert len(sites) == n_channels * len(drawn)
    assert 1 <= len(drawn) <= 2 * 3  # at most one paste and one inpaint site per drawn case
    records = _records(output)
    if any(op["op"] == "paste" for r in records for op in r["ops"]):
        assert any("_paste" in n for n in sites)
    if any(op["op"] == "inpaint" for r in records for op in r["ops"]):
        assert any("_inpaint" in n for n in sites)
    for name, raw in pictures.items():
        assert raw[:8] == PNG_SIGNATURE, name
        assert len(raw) > 5000, name
    for name in ("loads.png", sites[0]):
        pixels = imread(io.BytesIO(pictures[name]), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
        assert float(pixels[..., :3].std()) > 0.02, f"{name} looks blank"
    # the operation's lesion is outlined in its kind's colour (a paste magenta)
    paste = next((n for n in sites if "_paste" in n), None)
    if paste:
        rgb = (imread(io.BytesIO(pictures[paste]), format="png")[..., :3] * 255).round()
        assert (np.abs(rgb - [255, 0x3d, 0xf2]).max(axis=-1) < 2).sum() > 20


def test_report_sites_are_seeded_and_bounded(output):
    records = _records(output)
    a = [(s.record["case_id"], s.op_index) for s in choose_sites(records, 3, seed=5)]
    b = [(s.record["case_id"], s.op_index) for s in choose_sites(records, 3, seed=5)]
    assert a == b
    assert len({case for case, _ in a}) <= 3 and len(a) <= 6
    assert choose_sites(records, 0, seed=5) == []
    kinds = {op["op"] for r in records for op in r["ops"]}
    assert {records_op for case, i in a for records_op in
            [next(r for r in records if r["case_id"] == case)["ops"][i]["op"]]} == kinds


def test_report_survives_a_moved_bank(blob_bank, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(blob_bank, bank)
    out = tmp_path / "out"
    generate(bank, out, GenerateConfig(n=2, load="high", seed=2), progress=False)
    bank.rename(tmp_path / "bank-moved")
    html = write_report(out, n_examples=1).read_text()
    assert "not found" in html  # said plainly
    assert "original cases in the output" in html  # "before" numbers from the copied originals
    assert "data:image/png;base64," in html


def test_report_rejects_a_folder_that_is_not_an_output(tmp_path):
    with pytest.raises(InputError, match="not a lesionsynth generate output"):
        write_report(tmp_path)


def test_component_volumes_use_26_connectivity_and_spacing():
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 1, 1] = label[2, 2, 2] = 1  # diagonal neighbours: one component with 26-connectivity
    label[4:6, 4:6, 4] = 1
    affine = np.diag([1.0, 2.0, 0.5, 1.0])
    assert sorted(component_volumes(label, affine, (1,))) == [2.0, 4.0]
    assert len(component_volumes(label, affine, (1,), connectivity=6)) == 3


def test_package_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import lesionsynth, lesionsynth.report, lesionsynth.inspect, lesionsynth.cli\n"
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------------ inspect

def _check_screen(text: str) -> list[str]:
    lines = text.splitlines()
    assert 5 <= len(lines) <= MAX_LINES
    assert all(len(line) <= 140 for line in lines)
    return lines


def test_inspect_dataset(tmp_path):
    ds = blob_dataset(tmp_path / "ds", n_cases=3)
    text = summarize(ds)
    _check_screen(text)
    assert "nnU-Net v2 raw" in text
    assert "T1, FLAIR" in text
    assert re.search(r"^cases\s+3$", text, re.M)
    assert "48×44×36" in text and "1×1.2×1.5 mm" in text
    import nibabel as nib

    expected = sum(len(component_volumes(np.asarray(nib.load(p).dataobj), np.eye(4), (1,)))
                   for p in (ds / "labelsTr").glob("*.nii.gz"))
    assert f"; {expected} in all" in text


def test_inspect_multiclass_dataset_guesses_the_lesion_label(tmp_path):
    ds = blob_dataset(tmp_path / "ds", n_cases=2, multiclass=True)
    text = summarize(ds)
    assert "label(s) [2]" in text and "1=organ" in text and "2=lesion" in text


def test_inspect_bank(blob_bank):
    bank = Bank(blob_bank)
    text = summarize(blob_bank)
    _check_screen(text)
    assert re.search(rf"^cases\s+{len(bank.cases)}$", text, re.M)
    assert re.search(rf"^lesions\s+{len(bank.lesions)}$", text, re.M)
    loads = bank.real_loads()
    assert f"{loads.min():.3g}" in text
    assert "likelihood" in text and "48×44×36" in text


def test_inspect_output(output):
    records = _records(output)
    text = summarize(output)
    _check_screen(text)
    n_orig = len(read_output(output).bank_index["cases"])
    assert f"{len(records)} synthetic + {n_orig} original = {len(records) + n_orig}" in text
    assert "load uniform" in text
    ok = sum(r["reached"] for r in records)
    assert f"within tolerance  {ok} of {len(records)}" in text
    for reason in {r["stop_reason"] for r in records}:
        assert reason in text


def test_inspect_flags_an_unfinished_output(output, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    lines = (copy / "manifest.jsonl").read_text().splitlines()
    (copy / "manifest.jsonl").write_text("\n".join(lines[:2]) + "\n")
    text = summarize(copy)
    assert "unfinished: 2 of 6" in text


@pytest.mark.parametrize("make", ["empty", "text", "missing", "bad_json"])
def test_inspect_rejects_other_paths(tmp_path, make):
    path = tmp_path / "thing"
    if make == "empty":
        path.mkdir()
    elif make == "text":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif make == "bad_json":
        path.mkdir()
        (path / "bank.json").write_text("{not json")
    with pytest.raises(InputError) as err:
        summarize(path)
    assert "\n" not in str(err.value)


def test_report_shows_progress_on_every_long_step(output, capsys):
    """`report` once printed nothing for minutes: every step over its cases has a bar (pictures, the lesion
    count, the 6-feature audit, the critic)."""
    write_report(output, n_examples=1, seed=0, progress=True)
    err = capsys.readouterr().err
    for bar in ("report pictures", "report lesions", "realism audit", "critic"):
        assert f"{bar}:" in err and "100%" in err.split(f"{bar}:", 1)[1], bar
