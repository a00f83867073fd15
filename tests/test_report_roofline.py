"""The report's gap-per-operator plot and table (lungbench.report.roofline), planted table."""

from __future__ import annotations

import pandas as pd

from lungbench.report.roofline import roofline_figure


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "calls": [8, 6, 14],
            "step_ms": [10.0, 5.0, 20.0],
            "bound_ms": [2.0, 0.1, 2.1],
            "bound": ["compute", "memory", None],
            "alone_ms": [6.0, None, 11.0],
            "x_bound": [5.0, 50.0, 9.5],
        },
        index=pd.Index(["aten.convolution", "aten.max_pool3d", "(step)"], name="operator"),
    )


def test_figure_draws_one_group_of_bars_per_operator_and_skips_the_summary_rows():
    import matplotlib.pyplot as plt

    fig = roofline_figure(_table())
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["convolution", "max_pool3d"]  # "(step)" is a row of the table only
    widths = [p.get_width() for p in ax.patches]
    assert sorted(w for w in widths if w == w) == [0.1, 2.0, 5.0, 6.0, 10.0]  # pool: no alone
    plt.close(fig)


def test_no_operator_rows_no_figure():
    assert roofline_figure(_table().iloc[2:]) is None
