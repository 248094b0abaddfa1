"""Tiny inline-SVG charts for the dashboard (no JavaScript, no CDN)."""

from __future__ import annotations

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
