"""The printed report: a figure measured with no rows (e.g. the floor of a run of only multiplexed APIs)."""

from __future__ import annotations

from cellstream.bench.report import _table


def test_a_table_without_rows_prints_its_headers():
    assert _table(("api", "msgs/s"), []).split() == ["api", "msgs/s"]


def test_columns_fit_the_widest_cell():
    assert _table(("api", "n"), [("stream-many", 12345)]).splitlines() == [
        "  api               n",
        "  stream-many  12,345",
    ]
