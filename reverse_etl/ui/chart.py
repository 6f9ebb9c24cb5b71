"""Rows sent and rejected per run, as an inline SVG drawn on the server (no script, no
library): one pair of bars per run, oldest on the left, each with a tooltip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 720, 180, 48, 22, 10
SENT, REJECTED = "#2f855a", "#c53030"


def runs_chart(runs: Sequence[dict[str, Any]]) -> Markup:
    """``runs``: ``inspect.run_dict``s, newest first (as the history lists them); plans (dry
    runs) and a run still going are left out: they sent nothing."""
    points = [r for r in reversed(runs) if r["status"] not in ("running", "dry_run")]
    if not points:
        return Markup('<p class="muted">No finished runs yet.</p>')
    sent = [int(r["counts"]["sent"]) for r in points]
    bad = [int(r["counts"]["rejected"]) + int(r["counts"]["failed"]) for r in points]
    top = max([*sent, *bad, 1])
    plot_w, plot_h = WIDTH - PAD_LEFT - 8, HEIGHT - PAD_BOTTOM - PAD_TOP
    band = plot_w / len(points)
    bar = max(min(band * 0.4, 18), 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        'role="img" aria-label="rows sent and rejected per run">',
        f'<line x1="{PAD_LEFT}" y1="{PAD_TOP + plot_h}" x2="{WIDTH - 8}" y2="{PAD_TOP + plot_h}" '
        'stroke="#999"/>',
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + 8}" text-anchor="end">{top:,}</text>',
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + plot_h}" text-anchor="end">0</text>',
    ]
    for i, run in enumerate(points):
        x = PAD_LEFT + i * band + band / 2
        for offset, value, colour, word in (
            (-bar, sent[i], SENT, "sent"),
            (0, bad[i], REJECTED, "rejected or failed"),
        ):
            h = plot_h * value / top
            tip = escape(f"{run['started_at'][:19]} {run['status']}: {value:,} {word}")
            parts.append(
                f'<rect x="{x + offset:.1f}" y="{PAD_TOP + plot_h - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{tip}</title></rect>'
            )
    for i in {0, len(points) - 1}:
        x = PAD_LEFT + i * band + band / 2
        anchor = "start" if i == 0 else "end"
        label = escape(points[i]["started_at"][:16].replace("T", " "))
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">{label}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
