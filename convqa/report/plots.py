"""Report figures as PNG bytes, drawn from the evidence dict only.

Figures are rendered with matplotlib's Agg backend (no display) and returned as bytes, so the
HTML page can inline them as base64 and stay a single self-contained file.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.colors import ListedColormap  # noqa: E402

from convqa.gates.registry import family_sort_key  # noqa: E402
from convqa.report.evidence import STATUSES, as_float  # noqa: E402

STATUS_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "skipped": "#9e9e9e", "not_evaluated": "#ef6c00"}
STATUS_LETTERS = {"pass": "P", "fail": "F", "skipped": "S", "not_evaluated": "N"}
# Worst first: a matrix cell holding several rows (one per reference) shows the worst status.
STATUS_SEVERITY = ("fail", "not_evaluated", "skipped", "pass")

# One marker and colour per tensor role, so a bug confined to one role stands out as a line of
# identical markers apart from the rest.
KIND_STYLES = {
    "embed": ("D", "#1f77b4"),
    "attn_q": ("o", "#d62728"),
    "attn_k": ("s", "#ff7f0e"),
    "attn_v": ("^", "#2ca02c"),
    "attn_o": ("v", "#9467bd"),
    "mlp_gate": ("<", "#8c564b"),
    "mlp_up": (">", "#e377c2"),
    "mlp_down": ("P", "#17becf"),
    "norm": ("h", "#7f7f7f"),
    "bias": ("d", "#bcbd22"),
    "lm_head": ("*", "#000000"),
    "other": (".", "#aaaaaa"),
}
# Errors of exactly 0 (bit-exact) cannot sit on a log axis; they are drawn on this floor.
ERROR_FLOOR = 1e-9


def worst_status(statuses: list[str]) -> str:
    return min(statuses, key=STATUS_SEVERITY.index)


def gate_matrix(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """Gates (report order) x subjects, and {(gate, subject): [rows]} for the cells."""
    cells: dict[tuple[str, str], list[dict]] = {}
    families = {}
    for r in rows:
        cells.setdefault((r["gate"], r["subject"]), []).append(r)
        families[r["gate"]] = r["family"]
    gates = sorted(families, key=lambda g: (family_sort_key(families[g]), g))
    subjects = sorted({r["subject"] for r in rows})
    return gates, subjects, cells


def _png(fig) -> bytes:
    """The figure as PNG with a 256-colour palette: the plots are flat colours and text, so the
    palette costs nothing visible and keeps the page a third of the RGBA size."""
    from PIL import Image  # matplotlib's own dependency

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    out = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def gate_matrix_png(rows: list[dict], title: str) -> bytes | None:
    if not rows:
        return None
    gates, subjects, cells = gate_matrix(rows)
    codes = [[-1] * len(subjects) for _ in gates]
    for i, g in enumerate(gates):
        for j, s in enumerate(subjects):
            if (g, s) in cells:
                codes[i][j] = STATUSES.index(worst_status([r["status"] for r in cells[(g, s)]]))
    cmap = ListedColormap(["#ffffff"] + [STATUS_COLORS[s] for s in STATUSES])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(subjects) + 2.5), max(2.0, 0.32 * len(gates) + 1.2)))
    ax.imshow([[c + 1 for c in row] for row in codes], cmap=cmap, vmin=0, vmax=len(STATUSES), aspect="auto")
    for i, row in enumerate(codes):
        for j, c in enumerate(row):
            if c >= 0:
                n = len(cells[(gates[i], subjects[j])])
                ax.text(j, i, STATUS_LETTERS[STATUSES[c]] + (f"{n}" if n > 1 else ""), ha="center", va="center",
                        color="white", fontsize=7, fontweight="bold")
    ax.set_xticks(range(len(subjects)), subjects, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(gates)), gates, fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, len(subjects))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(gates))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=STATUS_COLORS[s]) for s in STATUSES]
    ax.legend(handles, [f"{STATUS_LETTERS[s]} {s}" for s in STATUSES], loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def tensor_error_png(check: dict) -> bytes | None:
    """Normalised max error per tensor against layer, one marker per tensor role.

    Non-layer tensors sit beside the stack: the embedding left of layer 0, the final norm and
    lm_head right of the last layer. Tensors without a value (missing, shape mismatch) or with
    an infinite one are drawn as red crosses on the ceiling.
    """
    tensors = check["tensors"]
    if not tensors:
        return None
    layers = [t["layer"] for t in tensors if t["layer"] is not None]
    last = max(layers) if layers else -1
    values = [as_float(t["normalized_max_abs"]) for t in tensors]
    finite = [v for v in values if v is not None and v == v and v != float("inf")]
    ceiling = max([1.0] + finite) * 10
    kinds = sorted({t["kind"] for t in tensors}, key=list(KIND_STYLES).index)
    # Spread the roles across the width of a layer so they do not hide each other.
    offset = {k: (i - (len(kinds) - 1) / 2) * (0.7 / max(len(kinds), 1)) for i, k in enumerate(kinds)}

    def x_of(t):
        if t["layer"] is not None:
            return t["layer"] + offset[t["kind"]]
        return (-1 if t["kind"] == "embed" else last + 1) + offset[t["kind"]]

    fig, ax = plt.subplots(figsize=(9, 3.4))
    for kind in kinds:
        marker, color = KIND_STYLES[kind]
        pts = [(x_of(t), max(v, ERROR_FLOOR)) for t, v in zip(tensors, values)
               if t["kind"] == kind and v is not None and v == v and v != float("inf")]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, s=26, label=kind, alpha=0.85, linewidths=0)
    bad = [(x_of(t), max(v, ERROR_FLOOR)) for t, v in zip(tensors, values)
           if not t["ok"] and v is not None and v == v and v != float("inf")]
    if bad:
        ax.scatter(*zip(*bad), marker="o", facecolors="none", edgecolors="#c62828", s=90, linewidths=1.2,
                   label="failing")
    novalue = [x_of(t) for t, v in zip(tensors, values) if v is None or v != v or v == float("inf")]
    if novalue:
        ax.scatter(novalue, [ceiling] * len(novalue), marker="x", color="#c62828", s=50, label="no value / inf")
    for tol in sorted({as_float(t["tolerance"]) for t in tensors} - {None}):
        if tol > ERROR_FLOOR:
            ax.axhline(tol, color="#555555", linestyle="--", linewidth=0.8)
            ax.text(last + 1.6, tol, f"tol {tol:g}", fontsize=7, va="bottom", ha="right", color="#555555")
    ax.axhline(ERROR_FLOOR, color="#2e7d32", linestyle=":", linewidth=0.8)
    ax.set_ylim(ERROR_FLOOR / 3, ceiling * 3)
    ax.set_yscale("log")
    ax.set_xlim(-1.6, last + 1.6)
    ticks = [-1] + list(range(0, last + 1, max(1, (last + 1) // 16))) + [last + 1]
    ax.set_xticks(ticks, ["embed"] + [str(t) for t in ticks[1:-1]] + ["head"], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel(f"normalised max |error| (0 drawn at {ERROR_FLOOR:g})", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", color="#eeeeee")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    ax.set_title(f"{check['label']}: " + ("all tensors within tolerance" if check["ok"] else "tensors out of tolerance"),
                 fontsize=9, color="#2e7d32" if check["ok"] else "#c62828")
    return _png(fig)


def kl_per_position_png(details: list[dict], worst: int = 5) -> bytes | None:
    """KL divergence per position for the prompts with the largest total KL, across artifacts."""
    series = []
    for d in details:
        for p in d["prompts"]:
            kl = [as_float(x) for x in p.get("kl_per_position") or []]
            kl = [x for x in kl if x is not None]
            if kl:
                series.append((sum(kl), f"{d['label']} / {p.get('prompt_id', p.get('id', '?'))}", kl))
    if not series:
        return None
    series.sort(key=lambda s: s[0], reverse=True)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for _, label, kl in series[:worst]:
        ax.plot(range(len(kl)), [max(x, ERROR_FLOOR) for x in kl], marker=".", linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("position", fontsize=8)
    ax.set_ylabel("KL(reference || artifact)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(color="#eeeeee")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    ax.set_title(f"KL per position, {min(worst, len(series))} worst prompt(s)", fontsize=9)
    return _png(fig)


# --- one heatmap for all tensor checks ------------------------------------------------------

# error / tolerance: below HEATMAP_FLOOR (bit-exact included) is the floor colour, at and above 1
# out of tolerance. A check whose worst tensor reaches DETAIL_WITHIN of its tolerance (10x) gets
# its own per-layer plot.
HEATMAP_FLOOR = 1e-4
DETAIL_WITHIN = 0.1


def tolerance_ratio(tensor: dict) -> float:
    """A tensor's normalised error against its tolerance: 0 when bit-exact, inf when it has no
    finite value, exceeds a zero tolerance, or its check flagged it (out of tolerance, missing,
    shape mismatch, blocks differing from the reference quantizer)."""
    if not tensor["ok"] or tensor.get("flagged"):
        return float("inf")
    err, tol = as_float(tensor["normalized_max_abs"]), as_float(tensor["tolerance"])
    if err is None or err == 0:
        return 0.0
    if err != err or err == float("inf"):
        return float("inf")
    if tol is None or tol <= 0:
        return float("inf")
    return err / tol


def needs_detail(check: dict) -> bool:
    """A check gets its own per-layer plot when it fails or comes within 10x of a tolerance."""
    return not check["ok"] or any(tolerance_ratio(t) >= DETAIL_WITHIN for t in check["tensors"])


def _heatmap_row_key(t: dict, last_layer: int) -> tuple:
    kinds = list(KIND_STYLES)
    layer = t["layer"] if t["layer"] is not None else (-1 if t["kind"] == "embed" else last_layer + 1)
    return (kinds.index(t["kind"]) if t["kind"] in kinds else len(kinds), layer, t["name"])


def tensor_heatmap_png(checks: list[dict], title: str = "tensor error / tolerance") -> bytes | None:
    """Rows: tensors grouped by role, layer 0 at the top of each group; columns: the checks.
    Colour: normalised max error / tolerance on a log scale; bit-exact on the floor colour,
    out of tolerance (>= 1, or no value) dark red, a tensor a check does not hold white."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap, LogNorm

    checks = [c for c in checks if c["tensors"]]
    if not checks:
        return None
    meta: dict[str, dict] = {}
    for c in checks:
        for t in c["tensors"]:
            meta.setdefault(t["name"], t)
    layers = [t["layer"] for t in meta.values() if t["layer"] is not None]
    last = max(layers) if layers else -1
    names = sorted(meta, key=lambda n: _heatmap_row_key(meta[n], last))
    index = {n: i for i, n in enumerate(names)}
    grid = np.full((len(names), len(checks)), np.nan)
    for j, c in enumerate(checks):
        for t in c["tensors"]:
            ratio = tolerance_ratio(t)
            grid[index[t["name"]], j] = HEATMAP_FLOOR / 10 if ratio == 0 else ratio
    cmap = LinearSegmentedColormap.from_list("tolerance", ["#c8e6c9", "#fff59d", "#ff9800", "#e65100"]).with_extremes(
        under="#eef7ee", over="#b71c1c", bad="#ffffff")
    grid = np.where(np.isinf(grid), 1e6, grid)  # LogNorm masks inf; draw it as "over"
    fig, ax = plt.subplots(figsize=(min(2.8 + 0.16 * len(checks), 14), min(1.8 + 0.022 * len(names), 9)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=LogNorm(vmin=HEATMAP_FLOOR, vmax=1.0, clip=False),
                      aspect="auto", interpolation="nearest")
    # One y label per role, at the middle of its block; lines between the blocks.
    kinds = [meta[n]["kind"] for n in names]
    starts = [i for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    ends = starts[1:] + [len(names)]
    ax.set_yticks([(s + e - 1) / 2 for s, e in zip(starts, ends)], [kinds[s] for s in starts], fontsize=7)
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="#424242", linewidth=0.6)
    ax.set_xticks(range(len(checks)), [c["label"] for c in checks], rotation=90, fontsize=6)
    for tick, c in zip(ax.get_xticklabels(), checks):
        if not c["ok"]:
            tick.set_color("#c62828")
            tick.set_fontweight("bold")
    ax.set_ylabel("tensor role (layers top to bottom)", fontsize=8)
    bar = fig.colorbar(image, ax=ax, extend="both", fraction=0.04, pad=0.02)
    bar.set_label("normalised max error / tolerance\n(below: bit-exact; above 1: out of tolerance)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


# --- first divergent layer ------------------------------------------------------------------


def divergence_png(divergence: dict) -> bytes | None:
    """Distance to the baseline at every capture point of one forward pass (convqa.compare
    .divergence): layers along x, one marker per sub-layer, the first divergent point ringed."""
    from convqa.compare.divergence import describe

    points, values = divergence.get("points") or [], [as_float(v) for v in divergence.get("values") or []]
    if not points or len(points) != len(values):
        return None
    top = max([v for v in values if v is not None and v != float("inf")] + [ERROR_FLOOR])
    # inf (missing, NaN, misshapen) is drawn above the finite maximum, so it stays on the axis.
    shown = [top * 10 if v is None or v == float("inf") else max(v, ERROR_FLOOR) for v in values]
    fig, ax = plt.subplots(figsize=(9, 3.0))
    ax.plot(range(len(shown)), shown, color="#555555", linewidth=0.8)
    by_sublayer: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        by_sublayer.setdefault(point.get("sublayer", "?"), []).append(i)
    for n, (sub, where) in enumerate(by_sublayer.items()):
        ax.plot(where, [shown[i] for i in where], marker="os^vD<>Ph*"[n % 10], linestyle="", markersize=4, label=sub)
    first = divergence.get("first")
    if isinstance(first, int) and 0 <= first < len(shown):
        ax.plot([first], [shown[first]], marker="o", markersize=11, markerfacecolor="none", color="#c62828",
                label=f"first divergence: {describe(points[first])}")
    tolerance = as_float(divergence.get("tolerance"))
    if tolerance:
        ax.axhline(tolerance, color="#c62828", linestyle="--", linewidth=0.8, label=f"tolerance {tolerance:g}")
    layer_starts = [i for i, p in enumerate(points) if p.get("layer") is not None
                    and (i == 0 or points[i - 1].get("layer") != p.get("layer"))]
    step = max(1, len(layer_starts) // 12)
    ax.set_xticks(layer_starts[::step], [str(points[i]["layer"]) for i in layer_starts[::step]])
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (embedding left, final norm and logits right)", fontsize=8)
    ax.set_ylabel("max |d| / max |baseline|", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(color="#eeeeee")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    ax.set_title(f"{divergence.get('subject', '')} against {divergence.get('baseline', '')}, "
                 f"prompt {divergence.get('prompt_id', '?')}", fontsize=9)
    return _png(fig)
