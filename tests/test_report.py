"""`tunesmith report RUN`: one self-contained HTML file with every curve drawn, the data and its token views,
before/after answers once `eval` has run, the config and the doctor's findings; written without touching any
other file of the run folder. A real browser (Debian's chromium, headless) renders it."""
from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.reporting.svg import histogram, line_chart, nice_ticks
from tunesmith.training.run import train

from helpers import fails, invoke, ok

PLOTTED = ("loss", "learning rate", "grad norm", "tokens per second", "peak memory (MiB)")


@pytest.fixture
def trained(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update({"max_steps": 3, "eval_steps": 2})
    return train(load_config(raw), progress=False).output_dir


def _hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "report.html"}


def _plot_titles(html: str) -> list[str]:
    return re.findall(r'<svg class="plot"[^>]*aria-label="([^"]*)"', html)


def test_nice_ticks_are_round_numbers():
    assert nice_ticks(0, 10) == [0, 5, 10]
    assert nice_ticks(0.013, 0.051) == pytest.approx([0.02, 0.03, 0.04, 0.05])
    assert nice_ticks(3, 3) == [3]


def test_a_line_chart_maps_points_into_the_frame():
    svg = line_chart("t", {"a": [(0, 0.0), (10, 1.0)]})
    d = re.search(r'class="series" data-name="a" d="([^"]+)"', svg).group(1)
    # x 0..10 -> 58..508 (left pad 58, right pad 12 of 520); y 0..1 -> 186..26 (bottom pad 34, top pad 26 of 220)
    assert d == "M58.0,186.0 L508.0,26.0"
    assert line_chart("t", {"a": [(1, float("nan"))]}) == ""
    assert 'd="M' in histogram("h", [1, 2, 2, 3])


def test_train_writes_the_report_with_every_curve_and_the_data(trained):
    html = (trained / "report.html").read_text()
    assert _plot_titles(html) == [*PLOTTED, "training example length"]
    assert html.count('class="series"') >= len(PLOTTED) + 2  # loss and eval_loss share a chart
    assert 'data-name="eval_loss"' in html
    assert html.count("<div class='tokens'>") == 2
    assert re.search(r'<span class="tok loss" title="id \d+ · assistant · carries loss">', html)
    assert re.search(r'<span class="tok loss" title="id \d+ · end_of_turn · carries loss">', html)
    assert "keep_best: null" in html and "<h2>Doctor</h2>" in html


def test_the_report_is_self_contained(trained):
    html = (trained / "report.html").read_text()
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert set(re.findall(r"https?://[^\"' ]+", html)) == {"http://www.w3.org/2000/svg"}  # the SVG namespace only


def test_the_report_command_writes_only_report_html(trained, tmp_path):
    (trained / "report.html").unlink()
    before = _hashes(trained)
    out = ok(invoke("report", trained))
    assert f"wrote {trained / 'report.html'}" in out
    assert _hashes(trained) == before
    assert not list(trained.glob(".*.tmp"))
    fails(invoke("report", tmp_path / "nowhere"), "is not a tunesmith run folder")


@pytest.mark.slow
def test_eval_adds_before_and_after_answers(trained):
    ok(invoke("eval", trained, "--json"))
    ok(invoke("eval", trained, "--base", "--json"))
    html = (trained / "report.html").read_text()
    assert "<th>expected</th><th>base</th><th>fine-tuned</th>" in html
    assert html.count("<tr><td>{") >= 4  # the booking answers are JSON objects, one row each


# ---- in a real browser -------------------------------------------------------------------------------

def _png_pixels(path: Path):
    """Decode an 8-bit RGB/RGBA PNG (what chromium writes) into rows of (r, g, b) tuples."""
    data = path.read_bytes()
    pos, idat, width, height, channels = 8, b"", 0, 0, 3
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            p = a + b - c
            pred = (0, a, b, (a + b) // 2, a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c)[kind]
            line[i] = (line[i] + pred) & 0xFF
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        prev = line
    return rows


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it as root: "
                    "apt-get install -y chromium); only this browser check is skipped")
def test_the_report_renders_in_chromium_with_every_plot_drawn(trained, tmp_path):
    page = (trained / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    paths = re.findall(r'<path class="series"[^>]* d="([^"]*)"', rendered)
    assert len(_plot_titles(rendered)) == len(PLOTTED) + 1 and len(paths) >= len(PLOTTED) + 2
    assert all(re.fullmatch(r"M[\d.]+,[\d.]+( L[\d.]+,[\d.]+)+", d) for d in paths)
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1400", page],
                         capture_output=True, text=True, timeout=120)
    for log in (dom.stderr, run.stderr):
        assert ":CONSOLE" not in log and "Uncaught" not in log, log[-2000:]
    pixels = _png_pixels(shot)
    blue = sum(1 for row in pixels for px in row if px == (37, 99, 235))  # the first series' colour, #2563eb
    assert blue > 500, f"only {blue} pixels of the plotted lines were drawn"


def test_a_merge_folder_reports_its_spec_and_task_scores(tiny_model_dir, tmp_path):
    """`tunesmith report` on a real `tunesmith merge` output: the spec, then the per-task scores once a bench
    wrote them; only report.html is written."""
    from tunesmith.merging.run import merge

    folder = merge({"method": "linear", "models": [{"model": str(tiny_model_dir), "weight": 0.5},
                                                   {"model": str(tiny_model_dir), "weight": 0.5}]},
                   tmp_path / "merged", progress=False)
    before = _hashes(folder)
    ok(invoke("report", folder))
    html = (folder / "report.html").read_text()
    assert "<h1>tunesmith merge: merged</h1>" in html and "method: linear" in html
    assert "No task_scores.json" in html
    assert _hashes(folder) == before
    (folder / "task_scores.json").write_text(json.dumps(
        {"booking": {"scorer": "json_match", "score": 0.5, "examples": 8, "alone": 0.875}}))
    ok(invoke("report", folder))
    html = (folder / "report.html").read_text()
    assert "<td>booking</td><td>json_match</td><td>50.0%</td><td>87.5%</td><td>8</td>" in html
