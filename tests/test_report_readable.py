"""Reports a reader can use: the busy mark on every table and plot, the step's own memory,
one label per configuration, plain ticks and units, one Speed-up convention (issue 27).

Planted records only: nothing here depends on how busy or fast this machine is."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from lungbench.core.runs import append_record, create_run_dir, finish_run
from lungbench.measure.memory import high_water, step_peak_bytes
from lungbench.report import figures
from lungbench.report.bench_outputs import write_bench_outputs
from lungbench.report.bench_tables import format_speedup_markdown, speedup_table, summary_table
from lungbench.report.busy import busy_line
from lungbench.report.html import write_report
from lungbench.report.labels import config_label, fields_from_key

KEY = "dualpath3d|default|f{f}|b{b}|cpu|tNone|auto|auto|auto"


def _record(filters: int, batch: int, busy: bool = False, **extra) -> dict:
    """A measured configuration as the sweep writes it (the fields the reports read)."""
    step = 0.01 * batch * filters
    return {
        "key": KEY.format(f=filters, b=batch),
        "model": "dualpath3d",
        "preset": "default",
        "filters": filters,
        "batch_size": batch,
        "device": "cpu",
        "platform": "cpu (2 threads)",
        "threads": None,
        "threads_used": 2,
        "dtype": "auto",
        "dtype_used": "bf16",
        "memory_format_used": "contiguous",
        "compile_used": "off",
        "world_size": 1,
        "status": "ok",
        "step_s_median": step,
        "step_s_iqr": step / 10,
        "samples_per_s": batch / step,
        "epoch_s": 10 * step,
        "epoch_samples": 8,
        "peak_memory_bytes": 1_250_000_000 + batch,  # RSS: hardly moves
        "peak_memory_kind": "process_peak_rss",
        "step_peak_memory_mib": 20.0 * batch,
        "step_peak_memory_kind": "cpu_profiler_memory_events",
        "busy": busy,
        "busy_reason": (
            f"other processes kept 1.{batch} of 2 cores busy while it was measured"
            if busy
            else None
        ),
        "others_cpu_cores": 1.0 + batch / 10 if busy else 0.0,
        "steal_share": 0.0,
        "cores": 2,
        **extra,
    }


RECORDS = [_record(8, 2), _record(8, 4, busy=True), _record(8, 8), _record(16, 2, busy=True)]


# ----------------------------------------------------------------------------- labels


def test_one_label_in_words_from_a_record_or_a_key():
    assert config_label(_record(8, 2)) == "f8 b2, 2 threads, bf16"
    # what ran beats what was asked; a non-default switch and model are named
    r = _record(16, 4, memory_format_used="channels_last_3d", compile_used="on")
    assert config_label(r) == "f16 b4, 2 threads, bf16, channels_last_3d, compiled"
    assert config_label({**_record(8, 2), "model": "resnet3d"}).startswith("resnet3d f8 b2")
    cuda = {**_record(8, 2), "device": "cuda:0", "world_size": 4}
    assert config_label(cuda) == "f8 b2, cuda:0, 4 ranks, bf16"
    # a key alone (an old run, a failed configuration): no pipes, no tNone
    label = config_label({"key": KEY.format(f=8, b=2)})
    assert label == "f8 b2, default threads, dtype auto" and "|" not in label
    assert fields_from_key("not a key") == {} and config_label({"key": "x"}) == "x"


def test_summary_keeps_the_key_and_leads_with_the_label():
    table = summary_table(RECORDS)
    assert table.columns[0] == "configuration" and table.columns[-1] == "key"
    assert list(table["configuration"])[0] == "f8 b2, 2 threads, bf16"
    assert {"busy", "busy_reason", "step_peak_memory_mib"} <= set(table.columns)


# ----------------------------------------------------------------------------- busy


def test_busy_line_is_one_sentence_not_one_fragment_per_record():
    line = busy_line(RECORDS)
    assert line is not None and "\n" not in line
    assert "2 of 4 configurations" in line and "up to 1.4 of 2 cores" in line
    assert "1.2 of 2" not in line  # the near-identical reasons are folded into one phrase
    assert busy_line([_record(8, 2)]) is None


def test_speedup_table_csv_and_markdown_mark_the_busy_cells():
    table = speedup_table(RECORDS, 2, time_column="epoch_s")
    assert list(table[("busy", "")]) == [True]  # f16 b2 was busy
    text = format_speedup_markdown(table)
    row = next(line for line in text.splitlines() if line.startswith("| cpu"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # f8 quiet, f16 busy: only the busy cells are starred, speed-ups have two decimals
    assert cells[1:] == ["1.60s", "1.00", "3.20s*", "1.00*"]
    assert "* measured while the machine was busy" in text
    quiet = format_speedup_markdown(speedup_table([_record(8, 2)], 2, time_column="epoch_s"))
    assert "*" not in quiet and "busy" not in quiet


def test_every_written_table_and_plot_of_a_busy_run_is_marked(tmp_path):
    run = create_run_dir(tmp_path, "bench", "busy")
    printed = write_bench_outputs(run, RECORDS)
    assert printed.startswith("WARNING: the machine was busy during 2 of 4")
    csv = pd.read_csv(run / "tables" / "speedup_b2.csv", index_col=0, dtype=str)
    assert list(csv.columns)[-1] == "busy" and list(csv["busy"]) == ["True"]
    assert csv.iloc[0]["Filters = 8 | Speed-up"] == "1.00"  # the one convention, in the CSV
    quiet = pd.read_csv(run / "tables" / "speedup_b8.csv", index_col=0)
    assert list(quiet["busy"]) == [False]
    assert "*" in (run / "tables" / "speedup_b2.md").read_text()
    summary = pd.read_csv(run / "tables" / "summary.csv")
    assert summary["busy"].sum() == 2


def test_plots_of_busy_measurements_carry_the_red_line(monkeypatch):
    marked = []
    monkeypatch.setattr(figures, "mark_figure", lambda fig: marked.append(fig))
    figures.memory_plot(RECORDS)
    figures.memory_plot([_record(8, 2), _record(8, 4)])
    assert len(marked) == 1
    plt.close("all")


# ----------------------------------------------------------------------------- memory


def test_high_water_is_the_highest_running_sum():
    assert high_water([100, 50, -120, 300, -330]) == 330
    assert high_water([-500, 100]) == 0  # a free of an older block is not a peak
    assert high_water([]) == 0


@pytest.mark.slow  # the profiler's first start takes seconds
def test_step_peak_memory_on_cpu_counts_what_the_step_allocates():
    held = []

    def step(mib: int) -> None:
        block = torch.ones(mib * 2**18)  # mib MiB of float32, freed at the end
        held.append(float(block[0]))

    small, kind = step_peak_bytes(lambda: step(4), torch.device("cpu"))
    large, _ = step_peak_bytes(lambda: step(32), torch.device("cpu"))
    assert kind == "cpu_profiler_memory_events"
    assert 4 * 2**20 <= small < 8 * 2**20 and 32 * 2**20 <= large < 40 * 2**20


def test_memory_plot_shows_the_step_memory_from_zero_with_plain_ticks():
    fig = figures.memory_plot(RECORDS)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_ylim()[0] == 0
    assert "own peak memory" in ax.get_title() and ax.get_ylabel() == "peak memory (MiB)"
    ys = sorted(y for line in ax.get_lines() for y in line.get_ydata())
    assert ys[-1] == pytest.approx(160.0)  # 20 MiB x batch 8: the step's, not the RSS
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8"]
    old = [{k: v for k, v in r.items() if not k.startswith("step_peak")} for r in RECORDS]
    assert "RSS" in figures.memory_plot(old).axes[0].get_title()  # older runs: said so
    plt.close("all")


# ----------------------------------------------------------------------------- telemetry


def test_telemetry_panels_have_units_and_no_offset():
    frame = pd.DataFrame(
        {
            "t_s": [0.0, 0.5, 1.0],
            "process_cpu_percent": [90.0, 180.0, 200.0],
            "rss_bytes": [1.26e9, 1.261e9, 1.262e9],
            "cpu1_percent": [10.0, 20.0, 30.0],
        }
    )
    fig = figures.telemetry_plot(frame, "f8 b2, 2 threads, bf16")
    fig.canvas.draw()
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == [
        "this process (% of one core)",
        "process memory, RSS (MiB)",
        "core 1 busy (%)",
    ]
    assert all(ax.yaxis.get_offset_text().get_text() == "" for ax in fig.axes)
    assert max(fig.axes[1].get_lines()[0].get_ydata()) == pytest.approx(1.262e9 / 2**20)
    plt.close("all")


# ----------------------------------------------------------------------------- html


@pytest.fixture
def busy_run(tmp_path):
    run = create_run_dir(tmp_path, "bench", "busy-run")
    for record in RECORDS:
        append_record(run, record)
    write_bench_outputs(run, RECORDS)
    (run / "telemetry").mkdir()
    pd.DataFrame({"t_s": [0.0, 1.0], "rss_bytes": [1e9, 1.1e9]}).to_csv(
        run / "telemetry" / f"{KEY.format(f=8, b=2).replace('|', '_')}.csv", index=False
    )
    finish_run(run)
    return run


def test_html_banner_is_one_line_linking_to_the_details(busy_run):
    html = write_report([busy_run], use_reference=False).html.read_text()
    banners = html.count('<p class="busy">')
    assert banners == 1
    banner = html.split('<p class="busy">')[1].split("</p>")[0]
    assert "2 of 4 configurations" in banner and 'href="#s-measured-on-a-busy-machine"' in banner
    details = html.split('id="s-measured-on-a-busy-machine"')[1].split("</section>")[0]
    assert details.count("other processes kept") == 2  # each busy configuration, and why
    assert "f8 b4, 2 threads, bf16" in details


def test_html_tables_scroll_in_their_box_telemetry_folds_speedup_two_decimals(busy_run):
    html = write_report([busy_run], use_reference=False).html.read_text()
    assert html.count("<table") == html.count('<div class="scroll"><table')
    assert "<details><summary>telemetry: f8 b2, 2 threads, bf16</summary>" in html
    speedup = html.split("<h2>Speed-up</h2>")[1].split("</section>")[0]
    assert "<td>1.00</td>" in speedup and "<td>1</td>" not in speedup
    assert "dualpath3d|default" not in html.split("<h2>Telemetry</h2>")[1].split("</section>")[0]


def test_compare_names_configurations_in_words(tmp_path):
    from lungbench.report.compare import compare_records, format_comparison

    a = [{**_record(8, 2), "samples_s": {"step": [0.1, 0.11, 0.1]}}]
    b = [{**_record(8, 2), "samples_s": {"step": [0.2, 0.21, 0.2]}}]
    text = format_comparison(compare_records(a, b, n_boot=50))
    assert "| f8 b2, 2 threads, bf16 |" in text and "\\|" not in text
    table = compare_records(a, b, n_boot=50).table()
    assert set(table["key"]) == {KEY.format(f=8, b=2)}  # the key stays in the CSV
    assert json.dumps(sorted(set(table["configuration"]))) == '["f8 b2, 2 threads, bf16"]'
