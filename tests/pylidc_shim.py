"""pylidc 0.2.3 itself, imported on today's stack, to check lungbench.data.lidc against it.

pylidc imports `pkg_resources` (no longer shipped by setuptools) only to find its own
SQLite file, and calls `np.int` / `np.float` (removed in NumPy 1.24) when it builds the
contour matrices. Both are patched in only while pylidc is imported or runs; SQLAlchemy 2.x
runs its 1.x-style models as they are (deprecation warnings only).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

REMOVED_NUMPY_ALIASES = {"int": int, "float": float}  # np.bool is back in NumPy 2


@contextlib.contextmanager
def numpy_aliases() -> Iterator[None]:
    """np.int / np.float as pylidc expects them, removed again afterwards."""
    added = [name for name in REMOVED_NUMPY_ALIASES if not hasattr(np, name)]
    for name in added:
        setattr(np, name, REMOVED_NUMPY_ALIASES[name])
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


def _stub_pkg_resources() -> types.ModuleType:
    """The one function pylidc uses: resource_filename(package, name)."""

    def resource_filename(package: str, name: str) -> str:
        spec = importlib.util.find_spec(package)
        return str(Path(next(iter(spec.submodule_search_locations))) / name)

    stub = types.ModuleType("pkg_resources")
    stub.resource_filename = resource_filename
    return stub


def import_pylidc() -> types.ModuleType:
    """The real pylidc package, importable once per process."""
    if "pylidc" in sys.modules:
        return sys.modules["pylidc"]
    stubbed = importlib.util.find_spec("pkg_resources") is None
    if stubbed:
        sys.modules["pkg_resources"] = _stub_pkg_resources()
    try:
        with numpy_aliases(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy 2.x and SciPy deprecations
            return importlib.import_module("pylidc")
    finally:
        if stubbed:
            del sys.modules["pkg_resources"]


def pylidc_clusters(scan_ids: Iterable[int] | None = None) -> dict[int, list[list[int]]]:
    """scan id -> pylidc's `Scan.cluster_annotations()` as annotation ids, nodules in its
    order; scans without annotations are left out (as lidc.read_nodules leaves them)."""
    pl = import_pylidc()
    query = pl.query(pl.Scan).order_by(pl.Scan.id)
    if scan_ids is not None:
        query = query.filter(pl.Scan.id.in_(list(scan_ids)))
    out = {}
    with numpy_aliases():
        for scan in query:
            clusters = scan.cluster_annotations(verbose=False)
            if clusters:
                out[scan.id] = [[ann.id for ann in nodule] for nodule in clusters]
    return out


def pylidc_malignancy() -> dict[int, int]:
    """annotation id -> malignancy score, read through pylidc's own model."""
    pl = import_pylidc()
    return {ann.id: ann.malignancy for ann in pl.query(pl.Annotation)}
