"""`lungbench report`: one self-contained HTML file (images inlined) and a Markdown twin."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from lungbench.cli import main
from lungbench.core.runs import (
    append_record,
    create_run_dir,
    finish_run,
    save_figure,
    write_json,
    write_table,
)
from lungbench.experiments import speedup
from lungbench.report.html import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_store):
    """A real tiny sweep (4 configurations, compute only) plus a telemetry time series."""

    out = tmp_path_factory.mktemp("report")
    saved = speedup.measure_peaks
    speedup.measure_peaks = lambda devices, dtype="auto": {
        d: {"fp32": 1e10} for d in devices
    }  # seconds saved
    try:
        request = speedup.BenchRequest(
            preset="dey2018",
            filters=(2, 4),
            batch_sizes=(1, 2),
            warmup=0,
            repeats=2,
            epoch=False,
            store=tiny_store,
            out=out,
            run_id="bench-tiny",
        )
        run = speedup.run_bench(request).run_dir
    finally:
        speedup.measure_peaks = saved
    (run / "telemetry").mkdir(exist_ok=True)
    pd.DataFrame(
        {
            "t_s": [0.0, 0.5, 1.0],
            "unix_s": [1e9, 1e9 + 0.5, 1e9 + 1],
            "cpu_util_percent": [50.0, 90.0, 70.0],
            "rss_bytes": [1e8, 2e8, 2e8],
        }
    ).to_csv(run / "telemetry" / "cfg_f2_b1.csv", index=False)
    append_record(
        run,
        {
            "key": "x|f8|b64",
            "status": "error",
            "filters": 8,
            "batch_size": 64,
            "error": "<script>alert('x')</script> broke",
        },
    )
    return run


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A training-like run: the LUNGx AUC table, a confusion matrix, a loss plot, metrics."""
    run = create_run_dir(tmp_path_factory.mktemp("report"), "train", "train-tiny")
    auc = pd.DataFrame(
        {"fold 1": [0.6, 0.7], "fold 2": [0.5, 0.8], "fold 3": [0.55, 0.7]},
        index=pd.Index(["w/o pre-training", "w/ pre-training"], name="AUC"),
    )
    auc["average"] = auc.mean(axis=1)
    write_table(run, "auc", auc)
    write_table(
        run,
        "confusion_with_pretraining",
        pd.DataFrame(
            {"Benign": [20, 17, 37], "Malignant": [10, 26, 36]},
            index=["Predictions Benign", "Predictions Malignant", "Total"],
        ),
    )
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [0.7, 0.6, 0.5])
    save_figure(run, "loss_fold1", fig)
    pd.DataFrame(
        {"epoch": [1, 2, 3], "train_loss": [0.7, 0.6, 0.5], "val_loss": [0.72, 0.65, 0.6]}
    ).to_csv(run / "metrics.csv", index=False)
    write_json(run / "config.json", {"epochs": 3, "lr": 1e-3})
    finish_run(run)
    return run


def _images(html: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]+)\"", html)


def test_html_is_one_file_with_every_image_embedded(bench_run, tmp_path):
    files = write_report([bench_run], out=tmp_path / "r", reference=REFERENCE)
    html = files.html.read_text()
    sources = _images(html)
    assert len(sources) >= len(list((bench_run / "plots").glob("*.png"))) + 2  # + memory, telemetry
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", html), "no external assets"
    assert "<link" not in html and "<script" not in html
    assert "&lt;script&gt;alert(" in html and "&lt;/script&gt; broke" in html, "escaped"
    for title in (
        "Environment",
        "Configuration",
        "Speed-up",
        "Step time vs batch size",
        "Memory",
        "Telemetry",
        "Failed configurations",
    ):
        assert f"<h2>{title}" in html
    assert "speedup_b2: published (seed 000" in html and "M100 (1 GPU)" in html
    assert "AMD" in html or "CPU" in html


def test_markdown_twin_links_existing_images(bench_run, tmp_path):
    files = write_report([bench_run], out=tmp_path / "r", reference=REFERENCE)
    text = files.markdown.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((files.markdown.parent / link).is_file() for link in links)
    assert "| Batch size = 2 | Filters = 2 \\| Exec. time (s) |" in text
    assert "## Failed configurations" in text


def test_training_tables_curves_and_published_reference(train_run):
    files = write_report([train_run], reference=REFERENCE)
    assert files.html.parent == train_run, "written into the run folder by default"
    html = files.html.read_text()
    assert "<h2>Training" in html
    assert "auc: published (seed 000" in html and "0.78" in html
    assert "confusion_with_pretraining: published (seed 000" in html
    assert "loss_fold1" in html and len(_images(html)) == 1
    assert "lr" in html and "0.001" in html  # the configuration


def test_several_runs_side_by_side_and_cli(bench_run, train_run, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["report", str(bench_run), str(train_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    html_path = out / "report-side-by-side.html"
    assert f"report:   {html_path}" in printed and "xdg-open" in printed
    html = html_path.read_text()
    overview = html.split("<h2>Overview</h2>")[1].split("</section>")[0]
    assert overview.count('<div class="col">') == 2
    assert "<h3>bench-tiny</h3>" in overview and "<h3>train-tiny</h3>" in overview
    assert (out / "report-side-by-side.md").exists()
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# A quiet, offline, throw-away browser: nothing it does may reach the network or this profile.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
VIEWPORT = (1280, 800)
# Run in the page after load: the layout facts the test judges, written into the DOM.
MEASURE = """<script>
window.addEventListener("load", () => {
  const tables = [...document.querySelectorAll("table")].map((t) => {
    const box = t.parentElement, r = box.getBoundingClientRect();
    return {box: box.className, right: r.right, overflowX: getComputedStyle(box).overflowX,
            table: t.scrollWidth, inside: box.clientWidth};
  });
  const folded = [...document.querySelectorAll("details img")].map((i) => i.checkVisibility());
  const out = document.createElement("pre");
  out.id = "measure";
  out.textContent = JSON.stringify({inner: window.innerWidth, tables, folded,
    page: document.documentElement.scrollWidth, images: document.images.length});
  document.body.appendChild(out);
});
</script>"""


def _browser(page: Path, *args: str, profile: Path) -> subprocess.CompletedProcess:
    width, height = VIEWPORT
    return subprocess.run(
        [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium_and_fits_the_page(bench_run, tmp_path):
    """A real report in a real browser: the first screen drew, the page is no wider than the
    window, and every table fits or scrolls inside its own box (issue 27)."""
    import json
    from html import unescape

    files = write_report([bench_run], out=tmp_path / "r", reference=REFERENCE)
    shot = tmp_path / "shot.png"
    result = _browser(files.html, f"--screenshot={shot}", profile=tmp_path / "profile1")
    assert shot.exists() and shot.read_bytes().startswith(PNG_MAGIC), result.stderr[-500:]
    from PIL import Image

    # The first screen really drew something: text and tables, not a blank page.
    with Image.open(shot) as image:
        assert image.size == VIEWPORT
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, len(colours or [])
    measured = tmp_path / "measured.html"
    html = files.html.read_text()
    measured.write_text(html.replace("</body>", MEASURE + "</body>"))
    dom = _browser(
        measured,
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=10000",
        "--dump-dom",
        profile=tmp_path / "profile2",
    ).stdout
    found = re.search(r'<pre id="measure">(.*?)</pre>', dom, re.S)
    assert found, dom[-500:]
    facts = json.loads(unescape(found[1]))
    assert facts["images"] == len(_images(html))
    assert facts["page"] <= facts["inner"], "the page scrolls sideways"
    assert facts["tables"], "the report shows tables"
    for table in facts["tables"]:
        assert table["box"] == "scroll" and table["right"] <= facts["inner"] + 1, table
        if table["table"] > table["inside"]:  # wider than its box: the box scrolls
            assert table["overflowX"] in ("auto", "scroll"), table
    assert facts["folded"] and not any(facts["folded"]), "telemetry panels start folded"
