"""The dashboard's inline-SVG charts: the evaluation interval chart."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from app.charts import LABEL_WIDTH, PAD, ROW, WIDTH, interval_chart

ROWS: list[tuple[str, float | None, float | None, float | None]] = [
    ("v1 vs v0", 0.5, 0.40, 0.60),  # includes 50%
    ("v2 vs v0", 0.625, 0.55, 0.69),  # above
    ("v3 vs v0", 0.30, 0.20, 0.45),  # below
    ("v4 vs v3", 0.55, 0.50, 0.60),  # touches 50%: still undecided, as the verdict says
    ("v5 vs v0", None, None, None),  # no votes yet
]


def rows_of(svg: ET.Element) -> list[ET.Element]:
    return [g for g in svg.iter("g") if "row" in g.get("class", "").split()]


def test_one_row_per_comparison_with_its_title() -> None:
    svg = ET.fromstring(str(interval_chart(ROWS)))
    rows = rows_of(svg)
    assert len(rows) == 5
    assert [g.findtext("title") for g in rows] == [
        "v1 vs v0: 50% [40%, 60%]",
        "v2 vs v0: 62% [55%, 69%]",
        "v3 vs v0: 30% [20%, 45%]",
        "v4 vs v3: 55% [50%, 60%]",
        "v5 vs v0: no votes",
    ]
    assert [g.find("text").text for g in rows] == [label for label, *_ in ROWS]  # type: ignore[union-attr]


def test_undecided_class_marks_exactly_the_rows_whose_interval_spans_one_half() -> None:
    rows = rows_of(ET.fromstring(str(interval_chart(ROWS))))
    classes = [set(g.get("class", "").split()) - {"row"} for g in rows]
    assert classes == [{"undecided"}, {"better"}, {"worse"}, {"undecided"}, {"empty"}]
    # Against another reference, other rows are undecided.
    rows = rows_of(ET.fromstring(str(interval_chart(ROWS, reference=0.58))))
    assert ["undecided" in g.get("class", "") for g in rows] == [True, True, False, True, False]


def test_point_and_bar_sit_at_the_rate_and_interval() -> None:
    svg = ET.fromstring(str(interval_chart([("v2 vs v0", 0.625, 0.55, 0.69)])))
    plot_width = WIDTH - PAD - LABEL_WIDTH
    (row,) = rows_of(svg)
    circle, bar = row.find("circle"), row.find("line")
    assert circle is not None and bar is not None
    assert float(circle.get("cx", "")) == pytest.approx(LABEL_WIDTH + 0.625 * plot_width, abs=0.05)
    assert float(circle.get("cy", "")) == PAD + ROW // 2
    assert float(bar.get("x1", "")) == pytest.approx(LABEL_WIDTH + 0.55 * plot_width, abs=0.05)
    assert float(bar.get("x2", "")) == pytest.approx(LABEL_WIDTH + 0.69 * plot_width, abs=0.05)
    assert bar.get("y1") == bar.get("y2") == circle.get("cy")


def test_axis_reference_line_and_labels() -> None:
    svg = ET.fromstring(str(interval_chart(ROWS)))
    assert svg.get("viewBox") == f"0 0 {WIDTH} {2 * PAD + 5 * ROW}"
    reference = next(line for line in svg.iter("line") if line.get("class") == "reference")
    assert float(reference.get("x1", "")) == pytest.approx(LABEL_WIDTH + 0.5 * (WIDTH - PAD - LABEL_WIDTH))
    assert reference.get("x1") == reference.get("x2")
    assert reference.get("stroke-dasharray") == "4 3"
    ticks = [t.text for t in svg.findall("text")]
    assert ticks == ["0%", "50%", "100%"]


def test_no_inline_style_or_script_and_labels_are_escaped() -> None:
    html = str(interval_chart([*ROWS, ("<b>v6</b> & v0", 0.5, 0.4, 0.6)]))
    assert "style=" not in html and "<script" not in html
    assert "<b>" not in html and "&lt;b&gt;v6&lt;/b&gt; &amp; v0" in html
    ET.fromstring(html)  # well-formed


def test_no_rows() -> None:
    assert str(interval_chart([])) == "<p class=muted>no evaluation votes yet</p>"
