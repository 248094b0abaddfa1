"""Tiny inline-SVG charts for the dashboard (no JavaScript, no CDN)."""

from __future__ import annotations

from collections.abc import Callable

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 360, 120, 24


def line_chart(points: list[tuple[int, float]]) -> Markup:
    """A polyline of (policy version, metric value) with the min and max labelled."""
    if not points:
        return Markup("<p class=muted>no values yet</p>")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)

    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"><title>v{x}: {y:.4g}</title></circle>'
        for x, y in points
    )
    return Markup(
        f'<svg class=chart viewBox="0 0 {WIDTH} {HEIGHT}" role="img">'
        f'<polyline fill="none" stroke="currentColor" stroke-width="2" points="{coords}"/>{dots}'
        f'<text x="2" y="{PAD - 8}">{escape(f"{max(ys):.4g}")}</text>'
        f'<text x="2" y="{HEIGHT - 4}">{escape(f"{min(ys):.4g}")}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 4}" text-anchor="end">v{x1 if len(set(xs)) > 1 else x0}</text>'
        "</svg>"
    )


def bar_chart(values: list[int]) -> Markup:
    """Bars for labels per hour, oldest on the left."""
    top = max(values, default=0) or 1
    width = (WIDTH - 2 * PAD) / max(len(values), 1)
    bars = "".join(
        f'<rect x="{PAD + i * width:.1f}" y="{HEIGHT - PAD - v / top * (HEIGHT - 2 * PAD):.1f}" '
        f'width="{max(width - 2, 1):.1f}" height="{v / top * (HEIGHT - 2 * PAD):.1f}"><title>{v}</title></rect>'
        for i, v in enumerate(values)
    )
    return Markup(
        f'<svg class=chart viewBox="0 0 {WIDTH} {HEIGHT}" role="img">{bars}'
        f'<text x="2" y="{PAD - 8}">{top}</text><text x="{WIDTH - PAD}" y="{HEIGHT - 4}" text-anchor="end">now</text>'
        "</svg>"
    )


# Interval chart: row height and the width of the label column, in viewBox pixels.
ROW, LABEL_WIDTH = 20, 80


def interval_chart(
    rows: list[tuple[str, float | None, float | None, float | None]], *, reference: float = 0.5
) -> Markup:
    """Win rates as points with interval bars, one row per (label, rate, low, high), on a 0..1 axis.

    A dashed line marks `reference` (no preference); a row whose interval includes it gets the class
    `undecided` (else `better` or `worse`), so the page can mute it. Styling is presentation
    attributes and classes only: the pages' Content-Security-Policy forbids inline styles.
    """
    if not rows:
        return Markup("<p class=muted>no evaluation votes yet</p>")
    left, right, axis = LABEL_WIDTH, WIDTH - PAD, PAD + len(rows) * ROW

    def sx(value: float) -> float:
        return left + min(max(value, 0.0), 1.0) * (right - left)

    body = "".join(_interval_row(PAD + i * ROW + ROW // 2, row, sx, reference) for i, row in enumerate(rows))
    ticks = "".join(
        f'<text x="{sx(v):.1f}" y="{axis + 14}" text-anchor="middle">{v:.0%}</text>'
        for v in sorted({0.0, reference, 1.0})
    )
    return Markup(
        f'<svg class="chart intervals" viewBox="0 0 {WIDTH} {axis + PAD}" role="img">'
        f'<line class="axis" x1="{left}" y1="{axis}" x2="{right}" y2="{axis}" stroke="currentColor"/>'
        f'<line class="reference" x1="{sx(reference):.1f}" y1="{PAD - 6}" x2="{sx(reference):.1f}" '
        f'y2="{axis}" stroke="currentColor" stroke-dasharray="4 3"/>{body}{ticks}</svg>'
    )


def _interval_row(
    y: int,
    row: tuple[str, float | None, float | None, float | None],
    sx: Callable[[float], float],
    reference: float,
) -> str:
    label, rate, low, high = row
    name = f'<text x="{LABEL_WIDTH - 6}" y="{y + 4}" text-anchor="end">{escape(label)}</text>'
    if rate is None:
        title = escape(f"{label}: no votes")
        return f'<g class="row empty"><title>{title}</title>{name}<text x="{LABEL_WIDTH}" y="{y + 4}">no votes</text></g>'
    if low is None or high is None:
        verdict, bar, title = "", "", escape(f"{label}: {rate:.0%}")
    else:
        verdict = " undecided" if low <= reference <= high else " better" if low > reference else " worse"
        bar = (
            f'<line class="ci" x1="{sx(low):.1f}" y1="{y}" x2="{sx(high):.1f}" y2="{y}" '
            'stroke="currentColor" stroke-width="3"/>'
        )
        title = escape(f"{label}: {rate:.0%} [{low:.0%}, {high:.0%}]")
    point = f'<circle cx="{sx(rate):.1f}" cy="{y}" r="4" fill="currentColor"/>'
    return f'<g class="row{verdict}"><title>{title}</title>{name}{bar}{point}</g>'
