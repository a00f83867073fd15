"""pytest-benchmark suites of the kernels that matter for 3D CNNs on CT (see README.md).

A package so that its test modules (test_transforms.py, ...) never clash with the
same-named modules in tests/ when both folders are collected in one session.
"""
