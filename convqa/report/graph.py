"""The conversion graph on the report's first screen: an inline SVG drawn from the gate rows.

One panel per variant with the three formats as nodes (S SafeTensors, G GGUF, A APR) and the six
conversion edges between them. An edge gathers every row about the artifacts its hop produced
(`q8_0/st-gguf-apr` is the G->A hop of variant q8_0): its F-CONV edge gate, the layout, contract
and quantizer gates on that artifact, inference on it; a node gathers the rows on the source
artifact. Round trips, idempotency, commutativity and cross-converter checks are badges under
the triangle. Everything is coloured by the worst status it holds; a failing edge or check is
labelled with its most specific failing gate (registry specificity) and that row's diagnosis.

Only the evidence is read; the SVG has no scripts, no external references and escapes all text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from convqa.gates.registry import counts_toward_verdict, specificity
from convqa.report.evidence import row_diagnosis

STATUS_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "skipped": "#9e9e9e", "not_evaluated": "#ef6c00"}
NO_ROWS_COLOR = "#d0d0d0"
# Worst first. Unlike a matrix cell, a skipped row does not grey out an edge that also passed:
# an absent capability (no GPU) says nothing about the conversion; all-skipped shows grey.
STATUS_SEVERITY = ("fail", "not_evaluated", "pass", "skipped")
FORMAT_LETTER = {"st": "S", "gguf": "G", "apr": "A"}
FORMAT_NAME = {"S": "SafeTensors", "G": "GGUF", "A": "APR"}
EDGES = (("S", "G"), ("S", "A"), ("G", "A"), ("A", "G"), ("G", "S"), ("A", "S"))
CHECKS = (("F-CONV-RT", "round trip"), ("F-CONV-IDEM", "idempotency"), ("F-CONV-COM", "commutativity"),
          ("F-XCONV", "cross-converter"))
_EDGE_GATE = re.compile(r"^F-CONV-([SGA])-([SGA])$")


def worst(statuses) -> str | None:
    statuses = list(statuses)
    return min(statuses, key=STATUS_SEVERITY.index) if statuses else None


def hop(subject: str) -> tuple[str, tuple[str, ...] | str | None]:
    """`q8_0/st-gguf-apr.run2/llama.cpp` -> ("q8_0", ("G", "A")); `q8_0/st` -> ("q8_0", "S").

    The variant is the part before the first slash; the chain's formats are its dash-separated
    parts with any `.runN` suffix and any engine or converter part dropped. None when the chain
    names no known format."""
    variant, _, rest = subject.partition("/")
    formats = []
    for part in rest.split("/"):
        letters = [FORMAT_LETTER.get(p.split(".")[0]) for p in part.split("-")]
        if letters and all(letters):
            formats = letters
            break
    if not formats:
        return variant, None
    if len(formats) == 1:
        return variant, formats[0]
    return variant, (formats[-2], formats[-1])


@dataclass
class Element:
    """One node, edge or check badge: its rows and how it is drawn."""
    rows: list = field(default_factory=list)

    @property
    def status(self) -> str | None:
        return worst(r["status"] for r in self.rows)

    @property
    def culprit(self) -> dict | None:
        """The most specific failing (else not-evaluated) row."""
        status = self.status
        if status not in ("fail", "not_evaluated"):
            return None
        return min((r for r in self.rows if r["status"] == status), key=lambda r: (specificity(r["gate"]), r["subject"]))

    def label(self) -> str:
        r = self.culprit
        if r is None:
            return ""
        why = row_diagnosis(r) or r["reason"]
        return f"{r['gate']}" + (f": {why}" if why else "")

    def title(self, name: str) -> str:
        counts = {}
        for r in self.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        text = f"{name}: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: STATUS_SEVERITY.index(kv[0])))
                              if counts else "no rows")
        return text + (f"\n{self.label()}" if self.culprit else "")


def conversion_graph(rows: list[dict]) -> dict[str, dict]:
    """variant -> {"nodes": {S,G,A: Element}, "edges": {(X, Y): Element}, "checks": {family: Element}}.

    A row on an artifact whose chain names no format (or on no artifact) is kept under
    "other" so nothing is dropped from the colours."""
    graph: dict[str, dict] = {}

    def panel(variant):
        return graph.setdefault(variant, {"nodes": {f: Element() for f in "SGA"}, "edges": {e: Element() for e in EDGES},
                                          "checks": {f: Element() for f, _ in CHECKS}, "other": Element()})

    for r in rows:
        if not counts_toward_verdict(r["gate"]):
            continue  # judges the backend, not a conversion (F-BACKEND-001): no edge or node's colour
        variant, where = hop(r["subject"])
        p = panel(variant)
        edge_gate = _EDGE_GATE.match(r["gate"])
        check = next((f for f, _ in CHECKS if r["family"] == f), None)
        if check:
            p["checks"][check].rows.append(r)
        elif edge_gate:
            p["edges"][(edge_gate.group(1), edge_gate.group(2))].rows.append(r)
        elif isinstance(where, tuple) and where in p["edges"]:
            p["edges"][where].rows.append(r)
        elif isinstance(where, str):
            p["nodes"][where].rows.append(r)
        else:
            p["other"].rows.append(r)
    return dict(sorted(graph.items()))


# --- drawing ---------------------------------------------------------------------------------

PANEL_W = 380
NODE_R = 24
_POS = {"S": (70, 125), "G": (300, 55), "A": (300, 195)}


def _color(status):
    return STATUS_COLORS.get(status, NO_ROWS_COLOR)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _edge_line(a, b, offset):
    (x1, y1), (x2, y2) = _POS[a], _POS[b]
    dx, dy = x2 - x1, y2 - y1
    length = (dx * dx + dy * dy) ** 0.5
    ux, uy = dx / length, dy / length
    nx, ny = -uy * offset, ux * offset  # the two directions of a pair run side by side
    return (x1 + ux * (NODE_R + 4) + nx, y1 + uy * (NODE_R + 4) + ny,
            x2 - ux * (NODE_R + 8) + nx, y2 - uy * (NODE_R + 8) + ny)


def _arrowhead(x1, y1, x2, y2, color) -> str:
    """A filled triangle at the line's end (drawn, not a marker: the page holds no url() reference)."""
    dx, dy = x2 - x1, y2 - y1
    length = (dx * dx + dy * dy) ** 0.5
    ux, uy = dx / length, dy / length
    tip = (x2 + ux * 8, y2 + uy * 8)
    left = (x2 - uy * 5, y2 + ux * 5)
    right = (x2 + uy * 5, y2 - ux * 5)
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (tip, left, right))
    return f'<polygon points="{points}" fill="{color}"/>'


def _panel_svg(variant: str, p: dict, x0: int) -> list[str]:
    out = [f'<g transform="translate({x0},0)" class="variant" data-variant="{escape(variant)}">',
           f'<text x="{PANEL_W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{escape(variant)}</text>']
    labels = []
    for a, b in EDGES:
        e = p["edges"][(a, b)]
        status = e.status
        x1, y1, x2, y2 = _edge_line(a, b, 6)
        dash = ' stroke-dasharray="4 4"' if status is None else ""
        width = 4 if status == "fail" else 2.5
        color = _color(status)
        out.append(f'<g class="edge" data-edge="{a}-{b}" data-status="{status or "none"}">'
                   f'<title>{escape(e.title(f"{variant} {FORMAT_NAME[a]} -> {FORMAT_NAME[b]}"))}</title>'
                   f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="{width}"{dash}/>'
                   f'{_arrowhead(x1, y1, x2, y2, color)}</g>')
        if e.culprit:
            n = len(labels) + 1
            mx, my = (x1 + x2) / 2, (y1 + y2) / 2
            out.append(f'<circle cx="{mx:.1f}" cy="{my:.1f}" r="8" fill="#fff" stroke="{color}" stroke-width="1.5"/>'
                       f'<text x="{mx:.1f}" y="{my + 4:.1f}" text-anchor="middle" font-size="10" font-weight="bold" fill="{color}">{n}</text>')
            labels.append((n, f"{a}\u2192{b}", e.label(), color))
    for f, (x, y) in _POS.items():
        # A node shows its own rows (the source) and the rows of every artifact that lands on it.
        n = Element(p["nodes"][f].rows + [r for (a, b), e in p["edges"].items() if b == f for r in e.rows])
        status = n.status
        out.append(f'<g class="node" data-node="{f}" data-status="{status or "none"}">'
                   f'<title>{escape(n.title(f"{variant} {FORMAT_NAME[f]}"))}</title>'
                   f'<circle cx="{x}" cy="{y}" r="{NODE_R}" fill="#fff" stroke="{_color(status)}" stroke-width="3"/>'
                   f'<text x="{x}" y="{y + 6}" text-anchor="middle" font-size="18" font-weight="bold">{f}</text></g>')
        if p["nodes"][f].culprit:
            labels.append((len(labels) + 1, f, p["nodes"][f].label(), _color(status)))
    # check badges
    bx, by = 10, 240
    for family, name in CHECKS:
        c = p["checks"][family]
        if not c.rows:
            continue
        status = c.status
        w = 8 + 6.4 * len(name)
        out.append(f'<g class="check" data-check="{family}" data-status="{status}"><title>{escape(c.title(f"{variant} {name}"))}</title>'
                   f'<rect x="{bx}" y="{by}" width="{w:.0f}" height="20" rx="4" fill="{_color(status)}"/>'
                   f'<text x="{bx + 4}" y="{by + 14}" font-size="11" fill="#fff">{escape(name)}</text></g>')
        if c.culprit:
            labels.append((len(labels) + 1, name, c.label(), _color(status)))
        bx += w + 6
    if p["other"].rows and p["other"].status in ("fail", "not_evaluated"):
        labels.append((len(labels) + 1, "other", p["other"].label(), _color(p["other"].status)))
    y = 282
    for n, where, text, color in labels[:4]:
        out.append(f'<text class="failing-label" x="10" y="{y}" font-size="11" fill="{color}">'
                   f'<tspan font-weight="bold">{n} {escape(where)}</tspan> {escape(_shorten(text, 60))}'
                   f'<title>{escape(where + ": " + text)}</title></text>')
        y += 14
    if len(labels) > 4:
        out.append(f'<text x="10" y="{y}" font-size="11" fill="#616161">and {len(labels) - 4} more below</text>')
    out.append("</g>")
    return out, y


def conversion_graph_svg(rows: list[dict]) -> str:
    """The graph as one <svg> element (an empty string when there are no rows)."""
    graph = conversion_graph(rows)
    if not graph:
        return ""
    width = PANEL_W * len(graph)
    panels, bottom = [], 0
    for i, (variant, p) in enumerate(graph.items()):
        lines, y = _panel_svg(variant, p, i * PANEL_W)
        panels.extend(lines)
        bottom = max(bottom, y)
    height = bottom - 4
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="conversion-graph" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif">',
           "<title>conversion graph: every edge and check coloured by its worst status</title>"]
    out.extend(panels)
    out.append("</svg>")
    return "\n".join(out)
