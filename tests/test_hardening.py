"""Input hardening: property-based tests of the store, statistics, sweep files and CSV
readers; each bad input a clear one-line error. And safety: no unsafe loading in lungbench/."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lungbench.cli import main
from lungbench.core.errors import DataError, UsageError
from lungbench.core.paths import check_name, confined
from lungbench.core.runs import RECORDS_FILE, read_records
from lungbench.data.store import StoreDataset, StoreWriter, read_info, read_meta
from lungbench.experiments.speedup import BenchRequest
from lungbench.harness.sweep_file import apply_sweep_file, parse_sweep
from lungbench.measure.stats import summarize
from lungbench.report.runview import read_table

REPO = Path(__file__).resolve().parents[1]
FAST = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ----------------------------------------------------------------------------- store

SHAPE = (1, 3, 4, 5)


def _write(path: Path, volumes: list[np.ndarray], labels: list[int], units: str = "HU"):
    with StoreWriter(
        path,
        kind="test",
        inputs={"volume": SHAPE},
        label_names=["benign", "malignant"],
        units=units,
    ) as w:
        for i, (v, y) in enumerate(zip(volumes, labels, strict=True)):
            w.append({"volume": v}, label=y, id=f"s{i}", spacing=(1.0, 0.7, 0.7))


@FAST
@given(
    st.lists(
        st.tuples(hnp.arrays(np.int16, SHAPE, elements=st.integers(-1000, 400)), st.integers(0, 1)),
        min_size=1,
        max_size=4,
    )
)
def test_store_round_trip(tmp_path_factory, samples):
    path = tmp_path_factory.mktemp("rt") / "s.h5"
    _write(path, [v for v, _ in samples], [y for _, y in samples])
    info = read_info(path)
    assert info.n == len(samples) and info.inputs == {"volume": SHAPE}
    meta = read_meta(path)
    assert meta["label"].tolist() == [y for _, y in samples]
    assert meta["id"].tolist() == [f"s{i}" for i in range(len(samples))]
    ds = StoreDataset(path)
    for i, (v, y) in enumerate(samples):
        (x,), target = ds[i]
        expected = (np.clip(v, -1000, 400) + 1000) / 1400
        np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(target) == y


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "g.h5"
    rng = np.random.default_rng(0)
    _write(path, [rng.integers(-1000, 400, SHAPE) for _ in range(3)], [0, 1, 0])
    return path


@FAST
@given(st.data())
def test_truncated_or_corrupted_store_is_a_data_error(tmp_path_factory, good_store, data):
    raw = bytearray(good_store.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:  # overwrite a run of bytes in the first few KiB (superblock, headers)
        start = data.draw(st.integers(0, min(len(raw), 4096) - 16), label="start")
        raw[start : start + 16] = data.draw(st.binary(min_size=16, max_size=16), label="bytes")
    path = tmp_path_factory.mktemp("bad") / "bad.h5"
    path.write_bytes(bytes(raw))
    try:
        read_info(path)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_nan_inf_empty_and_bad_labels_are_clear_errors(tmp_path, good_store):
    vol = np.zeros(SHAPE, np.float32)
    for bad in (np.nan, np.inf):
        v = vol.copy()
        v[0, 1, 2, 3] = bad
        with pytest.raises(DataError, match="has NaN or Inf values"):
            _write(tmp_path / "nan.h5", [v], [0], units="normalized")
    assert not (tmp_path / "nan.h5").exists()
    with pytest.raises(DataError, match="no samples were written"):
        _write(tmp_path / "empty.h5", [], [])
    with pytest.raises(DataError, match="outside the allowed set"):
        _write(tmp_path / "label.h5", [vol], [2])

    # Files written by other tools: a NaN voxel, an out-of-range label, zero rows.
    path = tmp_path / "edited.h5"
    _write(path, [vol, vol], [0, 1], units="normalized")
    with h5py.File(path, "r+") as f:
        f["volume"][1, 0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"dataset 'volume' row 1 has NaN or Inf"):
        StoreDataset(path)[1]
    with h5py.File(path, "r+") as f:
        f["label"][0] = 7
    with pytest.raises(DataError, match="dataset 'label' has values outside the allowed set"):
        read_info(path)
    empty = tmp_path / "zero.h5"
    empty.write_bytes(good_store.read_bytes())
    with h5py.File(empty, "r+") as f:
        for name in (
            "volume",
            "label",
            "meta/id",
            "meta/source",
            "meta/spacing",
            "meta/diameter",
            "meta/fold",
        ):
            f[name].resize(0, axis=0)
    with pytest.raises(DataError, match="the store is empty"):
        read_info(empty)


# ----------------------------------------------------------------------------- statistics

samples_st = st.lists(st.floats(1e-6, 1e3, allow_nan=False), min_size=1, max_size=50)


@settings(max_examples=100, deadline=None)
@given(samples_st, st.floats(1e-3, 1e3))
def test_stats_order_and_scaling(samples, factor):
    s = summarize(samples)
    tol = 1e-9 * max(samples)
    assert s.min - tol <= s.q1 <= s.median + tol <= s.q3 + 2 * tol <= s.max + 3 * tol
    assert s.median <= s.p90 + tol <= s.p95 + 2 * tol <= s.max + 3 * tol
    assert s.min - tol <= s.mean <= s.max + tol and s.iqr >= -tol and s.std >= 0
    assert s.n == len(samples)
    scaled = summarize([x * factor for x in samples])
    for name in ("median", "q1", "q3", "p95", "mean", "min", "max"):
        assert math.isclose(
            getattr(scaled, name), getattr(s, name) * factor, rel_tol=1e-9, abs_tol=1e-12
        )
    assert summarize(sorted(samples, reverse=True)).median == pytest.approx(s.median)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_stats_reject_empty_and_non_finite(bad):
    with pytest.raises(ValueError):
        summarize(bad)


# ----------------------------------------------------------------------------- sweep files


def test_thesis_sweep_file_parses():
    request = apply_sweep_file(
        REPO / "bench" / "sweeps" / "thesis.toml", BenchRequest(), BenchRequest()
    )
    assert request.filters == (8, 16) and request.batch_sizes == (2,)
    assert request.preset == "dey2018" and request.devices == ("cpu",)


def test_unknown_key_lists_the_valid_ones(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text("filterz = [8]\nbatch = [2]\n")
    assert main(["bench", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown key in --config" in err and "'filterz'" in err
    assert "did you mean 'filters'?" in err and "batch" in err and "repeats" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filters = [0]", "must be >= 1"),
        ("filters = ['8']", "expected an integer"),
        ("epoch = 1", "expected true or false"),
        ("batch = []", "at least one value"),
        ("repeats = 2.5", "expected an integer"),
        ("filters = [8", "not valid TOML"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text + "\n")
    with pytest.raises((UsageError, DataError), match=message):
        apply_sweep_file(path, BenchRequest(), BenchRequest())


toml_values = st.one_of(
    st.integers(-5, 50),
    st.booleans(),
    st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(-2, 20), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "filters",
                "batch",
                "device",
                "threads",
                "warmup",
                "repeats",
                "epoch",
                "epoch-samples",
                "workers",
                "seed",
                "store",
                "out",
                "nonsense",
            ]
        ),
        toml_values,
        max_size=5,
    )
)
def test_sweep_parser_accepts_or_raises_usage_error(table):
    try:
        values = parse_sweep(table, BenchRequest())
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    assert "nonsense" not in table
    for name in ("filters", "batch_sizes", "repeats"):
        if name in values:
            items = values[name] if isinstance(values[name], tuple) else (values[name],)
            assert all(isinstance(v, int) and v >= 1 for v in items)


def test_command_line_wins_over_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("filters = [4]\nrepeats = 3\n")
    request = apply_sweep_file(path, BenchRequest(repeats=7), BenchRequest())
    assert request.filters == (4,) and request.repeats == 7


# ----------------------------------------------------------------------------- CSV readers


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=30),
            st.just('{"key": "k", "status": "ok"}'),
            st.just("[1, 2]"),
            st.just("3"),
        ),
        max_size=8,
    )
)
def test_records_reader_keeps_only_whole_objects(tmp_path_factory, lines):
    run = tmp_path_factory.mktemp("rec")
    text = "\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines)
    (run / RECORDS_FILE).write_text(text, encoding="utf-8")
    records = read_records(run)
    assert all(isinstance(r, dict) for r in records)
    assert len(records) >= sum(line == '{"key": "k", "status": "ok"}' for line in lines)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_results_csv_reader_returns_a_table_or_a_data_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_bytes(raw)
    try:
        read_table(path)
    except DataError as exc:
        assert str(path) in str(exc)


def _label_reader():
    try:
        from lungbench.data.images import read_label_csv
    except ImportError:  # the issue-5 reader is not there yet
        return None
    return read_label_csv


@pytest.mark.skipif(_label_reader() is None, reason="lungbench.data.images not available")
@settings(max_examples=60, deadline=None)
@example(rows=[("a.png", "\u00b2")])  # a Unicode digit: isdigit() but not int()-able
@given(
    st.lists(
        st.tuples(
            st.text("abc.png", min_size=1, max_size=6),
            st.one_of(
                st.sampled_from(["0", "1", "benign", "Malignant", "2", "-1", "", "x", "1.0"]),
                st.text(max_size=4),
            ),
        ),
        max_size=6,
    )
)
def test_label_csv_reader_allows_only_known_labels(tmp_path_factory, rows):
    assume(
        all(
            "," not in c and '"' not in c and "\n" not in c and "\r" not in c
            for row in rows
            for c in row
        )
    )
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    path.write_text("filename,label\n" + "".join(f"{f},{y}\n" for f, y in rows))
    try:
        files, targets, names, task = _label_reader()(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert task == "binary" and set(np.asarray(targets).tolist()) <= {0, 1}
    assert len(files) == len(targets)


# ----------------------------------------------------------------------------- safety


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that load pickles, evaluate strings or run shell strings."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (
            f"{ast.unparse(func.value)}.{func.attr}"
            if isinstance(func, ast.Attribute)
            else getattr(func, "id", "")
        )
        keywords = {k.arg: k.value for k in node.keywords}
        if name in (
            "eval",
            "exec",
            "pickle.load",
            "pickle.loads",
            "os.system",
            "os.popen",
            "marshal.loads",
            "yaml.load",
            "pd.read_pickle",
            "pandas.read_pickle",
            "cloudpickle.load",
            "dill.load",
            "joblib.load",
        ):
            found.append(f"{name}() at line {node.lineno}")
        elif name == "torch.load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"torch.load() without weights_only=True at line {node.lineno}")
        elif name in ("np.load", "numpy.load"):
            flag = keywords.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                found.append(f"np.load(allow_pickle=True) at line {node.lineno}")
        if "shell" in keywords:
            flag = keywords["shell"]
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{name}(shell=...) at line {node.lineno}")
    return found


def test_no_unsafe_loading_or_shell_strings_in_lungbench():
    problems = []
    for path in sorted((REPO / "lungbench").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        problems += [f"{path.relative_to(REPO)}: {p}" for p in _unsafe_calls(tree)]
    assert not problems, "\n".join(problems)


def test_the_scanner_finds_what_it_looks_for():
    code = (
        "import torch, pickle, subprocess\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "pickle.load(f)\neval(s)\nsubprocess.run(c, shell=True)\n"
        "torch.load(p, weights_only=True)\n"
    )
    assert len(_unsafe_calls(ast.parse(code))) == 5


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "..", ".", "", "a\\b", "/abs", "x/../y", "a..b", "tab\tname", "new\nline"],
)
def test_run_ids_cannot_leave_the_output_folder(name, tmp_path, capsys, tiny_store):
    with pytest.raises(UsageError):
        check_name(name)
    if name:
        assert (
            main(
                [
                    "bench",
                    "--run-id",
                    name,
                    "--store",
                    str(tiny_store),
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
            == 2
        )
        assert "--run-id" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20))
def test_accepted_names_stay_inside(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("root")
    try:
        check_name(name)
    except UsageError:
        return
    assert confined(root, name).parent == root.resolve()


def test_confined_rejects_escapes(tmp_path):
    with pytest.raises(UsageError, match="escapes the output folder"):
        confined(tmp_path, "..", "elsewhere")
    assert confined(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()


# ----------------------------------------------------------------------- LUNGx spreadsheet

LUNGX_HEADER = 'Scan Number,Nodule Number,"Nodule Center x,y Position*",Nodule Center Image,'
LUNGX_HEADER += "Final Diagnosis"
CELL = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e400", "", " 7 ", "3.5", "-2", "x", "1,2", "(4, 5)"]),
    st.text(alphabet="0123456789.,-e ()infa", max_size=8),
)


@FAST
@given(st.lists(st.tuples(CELL, CELL, CELL, st.sampled_from(["Benign", "malignant", "?"]))))
def test_lungx_spreadsheet_rows_are_finite_or_a_data_error(tmp_path_factory, rows):
    """Any cell text: the reader returns rows with finite positions and slices, or one
    DataError naming the file (never OverflowError / ValueError from int(inf), say)."""
    sheet = tmp_path_factory.mktemp("lungx") / "n.csv"
    lines = [LUNGX_HEADER]
    for i, (nodule, xy, image, diagnosis) in enumerate(rows):
        lines.append(f'LUNGx-CT{i:03d},"{nodule}","{xy}","{image}",{diagnosis}')
    sheet.write_text("\n".join(lines) + "\n")
    from lungbench.data.lungx import read_spreadsheet

    try:
        parsed = read_spreadsheet(sheet)
    except DataError as exc:
        assert str(sheet) in str(exc) and "\n" not in str(exc)
        return
    for row in parsed:
        assert math.isfinite(row.x) and math.isfinite(row.y) and row.label in (0, 1)


def test_lungx_infinite_cells_are_data_errors(tmp_path):
    from lungbench.data.lungx import read_spreadsheet

    sheet = tmp_path / "inf.csv"
    sheet.write_text(f'{LUNGX_HEADER}\nLUNGx-CT001,1,"3, 4",inf,Benign\n')
    with pytest.raises(DataError, match=r"row 2: slice 'inf' is not a finite number"):
        read_spreadsheet(sheet)
    sheet.write_text(f'{LUNGX_HEADER}\nLUNGx-CT001,1,"nan, 4",2,Benign\n')
    with pytest.raises(DataError, match=r"row 2: x 'nan' is not a finite number"):
        read_spreadsheet(sheet)
    sheet.write_text(f'{LUNGX_HEADER}\nLUNGx-CT001,1,"3, 4",2,Benign\n')
    assert read_spreadsheet(sheet)[0].slice == 2  # the header parses: the cells are read


def test_damaged_chunk_is_a_data_error_naming_file_and_dataset(tmp_path):
    """Bytes overwritten inside a compressed sample chunk (file length intact): reading that
    sample fails with a DataError naming the file, the dataset and the row."""
    path = tmp_path / "s.h5"
    _write(path, [np.full(SHAPE, -1000) for _ in range(3)], [0, 1, 0])  # compressible
    with h5py.File(path, "r") as f:
        chunk = f["volume"].id.get_chunk_info(1)  # one sample per chunk
    assert chunk.filter_mask == 0  # the chunk went through the compression filter
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset : chunk.byte_offset + chunk.size] = b"\xff" * chunk.size
    path.write_bytes(bytes(raw))
    ds = StoreDataset(path)
    ds[0]  # the undamaged samples still read
    with pytest.raises(DataError, match=r"s\.h5: dataset 'volume' row 1 cannot be read"):
        ds[1]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LUNGBENCH_MEMORY_LIMIT", "garbage", "LUNGBENCH_MEMORY_LIMIT='garbage' is not a size"),
        ("LUNGBENCH_MEMORY_LIMIT", "0", "must be more than 0 bytes"),
        ("LUNGBENCH_MALLOC", "bogus", "LUNGBENCH_MALLOC='bogus': choose from: keep"),
    ],
)
def test_bad_environment_variables_are_one_line_before_any_run_folder(
    variable, value, expected, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(variable, value)
    out = tmp_path / "out"
    assert main(["bench", "--filters", "2", "--batch", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists(), "nothing written"


def test_more_threads_than_cores_is_said_in_words(monkeypatch, caplog):
    from lungbench.experiments import speedup

    monkeypatch.setattr(speedup, "allowed_cores", lambda: 2)  # planted: any host
    with caplog.at_level("WARNING"):
        speedup.warn_oversubscribed((1, 2, None))
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        speedup.warn_oversubscribed((2, 999))
    assert "--threads 999: more than the 2 core(s) this process may use" in caplog.text


@pytest.mark.parametrize(
    ("line", "message"),
    [("ci_target = 0", "ci_target: 0.0: must be a finite number > 0"),
     ("time_budget = -1", "expected a number >= 0"),
     ("max_repeats = 0", "must be >= 1")],
)  # fmt: skip
def test_a_sweep_file_takes_what_the_command_line_takes(tmp_path, capsys, line, message):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(line + "\n")
    out = tmp_path / "out"
    assert main(["bench", "--config", str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
