"""report.html: one self-contained page (inline CSS and SVG, plots as base64 PNG, no scripts, no fetches).

The first screen answers "can I ship this conversion?": the verdict, the conversion graph
(convqa.report.graph, inline SVG), then only what failed or was not evaluated (most specific
gate first) and the skipped rows collapsed into one line per absent capability. Tensor checks
are one heatmap over every comparison; per-layer plots only for comparisons that fail or come
within 10x of a tolerance.

Rendered from the evidence dict only, through a jinja2 template with autoescaping on, so a
reason or tensor name containing markup is shown as text.
"""

from __future__ import annotations

import base64

import jinja2
from markupsafe import Markup

from convqa.report import graph, logits, plots
from convqa.report.evidence import (blocking_rows, display_hash, display_number, display_percent, display_size,
                                    inference_rows, outside_verdict_line, row_comparison, row_diagnosis, skip_groups)
from convqa.report.markdown import prompt_columns

VERDICT_COLORS = {"QUALIFIED": "#2e7d32", "NOT QUALIFIED": "#c62828", "INCOMPLETE": "#ef6c00"}

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ ev.model }}: {{ s.verdict }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #212121; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 0 1.2em 3em; }
.banner { padding: 1.1em 1.2em; color: #fff; background: {{ verdict_color }}; }
.banner h1 { margin: 0; font-size: 1.6em; }
.banner p { margin: .3em 0 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
.cards { display: flex; gap: .8em; flex-wrap: wrap; margin-top: 1em; }
.card { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: .6em 1em; min-width: 7em; }
.card b { display: block; font-size: 1.5em; }
table { border-collapse: collapse; background: #fff; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #e0e0e0; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .95em; }
.st-pass { background: #c8e6c9; } .st-fail { background: #ffcdd2; font-weight: bold; }
.st-skipped { background: #eeeeee; color: #616161; } .st-not_evaluated { background: #ffe0b2; }
.matrix td { text-align: center; min-width: 2.2em; }
.matrix th.subj { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; font-weight: normal; }
img { max-width: 100%; background: #fff; border: 1px solid #e0e0e0; }
.note { color: #616161; font-size: .85em; }
details > summary { cursor: pointer; margin: .5em 0; }
.graph { overflow-x: auto; background: #fff; border: 1px solid #e0e0e0; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: middle; margin: 0 .2em 0 .4em; border-radius: 2px; }
ul.skips { padding-left: 1.2em; } ul.skips details > summary { margin: .2em 0; }
h3.bad { color: #c62828; }
</style>
</head>
<body>
<div class="banner"><h1>{{ ev.model }}: {{ s.verdict }}</h1><p>{{ s.verdict_reason }}.</p>{% if outside_line %}<p>{{ outside_line }}.</p>{% endif %}</div>
<main>
<section id="first-screen">
<h2>Can I ship this conversion?</h2>
{% if graph_svg %}<div class="graph">{{ graph_svg }}</div>
<p class="note">Nodes S (SafeTensors), G (GGUF), A (APR) per variant; an edge holds every row on the artifacts its hop produced,
a node the rows on the source, a badge the round trip, idempotency, commutativity and cross-converter checks.
Colour = worst status:
{% for st, color in status_colors.items() %}<span class="swatch" style="background: {{ color }}"></span>{{ st }} {% endfor %}
<span class="swatch" style="background: {{ no_rows_color }}"></span>no rows (dashed).
A numbered failing edge or check names its most specific failing gate and diagnosis; hover for the counts.</p>
{% endif %}
<h3>What failed or was not evaluated</h3>
{% if blocking %}<p class="note">{{ blocking | length }} row(s), most specific gate first.</p>{{ gate_table(blocking) }}
{% else %}<p>Nothing failed and nothing was left unevaluated.</p>{% endif %}
{% if skips %}<ul class="skips">{% for g in skips %}<li><details><summary class="skip-line">{{ g.line }}</summary>
<span class="mono">{{ g.gates | join(", ") }}</span></details></li>
{% endfor %}</ul>{% endif %}
</section>
<div class="cards">
{% for label, value in cards %}<div class="card">{{ label }}<b>{{ value }}</b></div>
{% endfor %}</div>
<p class="note">pass rate = pass / (pass + fail); coverage = (pass + fail) / (rows &minus; skipped).
Generated {{ ev.generated_at }}, evidence schema <code>{{ ev.schema_version }}</code>.</p>

<h2>Gate &times; artifact matrix</h2>
{% if ev.gates %}{{ matrix(conversion_rows) }}
{% if matrix_png %}<p><img alt="gate matrix" src="data:image/png;base64,{{ matrix_png }}"></p>{% endif %}
{% else %}<p>No gate rows: nothing was evaluated.</p>{% endif %}

{% if ev.tensor_checks %}<h2>Tensor checks</h2>
<p class="note">One row per tensor (grouped by role, layers top to bottom), one column per comparison; colour = normalised max error
(max |ref &minus; artifact| / max |ref|) against the tensor's tolerance, bit-exact on the floor colour, out of tolerance dark red.
A comparison gets its own per-layer plot only when it fails or comes within 10&times; of a tolerance ({{ detail_count }} of {{ ev.tensor_checks | length }}).</p>
{% if heatmap_png %}<p><img id="tensor-heatmap" alt="tensor error against tolerance, every comparison" src="data:image/png;base64,{{ heatmap_png }}"></p>{% endif %}
{% for c in ev.tensor_checks %}<h3 id="check-{{ loop.index0 }}" class="{{ '' if c.ok else 'bad' }}">{{ c.label }}</h3>
{% if tensor_pngs[loop.index0] %}<p><img alt="per-tensor error by layer, {{ c.label }}" src="data:image/png;base64,{{ tensor_pngs[loop.index0] }}"></p>{% endif %}
{% set bad = c.tensors | selectattr("flagged") | list %}
{% if c.config_differences %}<p>Config differences: {% for k, v in c.config_differences.items() %}<code>{{ k }}</code> {{ v[0] }} &rarr; {{ v[1] }}{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}
{% if c.tokenizer_differences %}<p>Tokenizer differences: {% for k in c.tokenizer_differences %}<code>{{ k }}</code>{% if not loop.last %}, {% endif %}{% endfor %}</p>{% endif %}
{% if bad %}<table><tr><th>tensor</th><th>layer</th><th>kind</th><th>status</th><th>normalised max error</th><th>tolerance</th><th>diagnosis</th><th>blocks vs reference quantizer</th></tr>
{% for t in bad %}<tr class="st-fail"><td class="mono">{{ t.name }}</td><td class="num">{{ t.layer if t.layer is not none else "" }}</td><td>{{ t.kind }}</td><td>{{ t.status }}</td><td class="num">{{ t.normalized_max_abs | num }}</td><td class="num">{{ t.tolerance | num }}</td><td>{{ t.diagnosis }}</td><td class="mono">{{ t.blocks }}</td></tr>
{% endfor %}</table>{% else %}<p>{{ c.tensors | length }} tensors, all within tolerance{% if c.summary.get("reference_quantizer") %}, {{ c.summary["reference_quantizer"]["tensors"] }} quantized tensors byte-identical to the reference quantizer{% endif %}.</p>{% endif %}
{% endfor %}{% endif %}

{% if inference_section %}<h2>Inference</h2>
{% if inf_rows %}{{ matrix(inf_rows) }}{% endif %}
{% if logit_table %}<h3>Logit evidence</h3>
<p class="note">Per artifact and engine, over every compared position of every prompt: KL(reference || artifact) mean, median, p99, max and p99/mean
(a few bad positions show in p99 where the mean averages them away); top-1 and top-5 agreement (the reference argmax among the artifact's five most likely tokens).</p>
<table id="logit-evidence"><tr><th>artifact / engine</th><th>positions</th><th>KL mean</th><th>median</th><th>p99</th><th>max</th><th>p99/mean</th><th>top-1</th><th>top-5</th><th>max |dlogit|</th><th>worst prompt</th></tr>
{% for t in logit_table %}<tr><td class="mono">{{ t.label }}</td><td class="num">{{ t.positions }}</td><td class="num">{{ t.mean_kl | num }}</td><td class="num">{{ t.median_kl | num }}</td><td class="num">{{ t.p99_kl | num }}</td><td class="num">{{ t.max_kl | num }}</td><td class="num">{{ t.p99_over_mean | num }}</td><td class="num">{{ t.top1_agreement | num }}</td><td class="num">{{ t.top5_agreement | num }}</td><td class="num">{{ t.max_abs_dlogit | num }}</td><td class="mono">{{ t.worst_prompt }}</td></tr>
{% endfor %}</table>{% endif %}
{% if kl_png %}<p><img alt="KL per position" src="data:image/png;base64,{{ kl_png }}"></p>{% endif %}
{% if divergences %}<h3>First divergent layer</h3>
<p class="note">Failing transformers runs: the hidden state after every layer and sub-layer of one prompt against the baseline
(the ground truth for a lossless variant, the reference-quantized model for a lossy one), as max |d| / max |baseline| (bit-exact points on the 1e-9 floor); the first point beyond tolerance, ringed, is where the artifact diverges: the points after it show the error propagating.</p>
{% for d in divergences %}<p id="divergence-{{ loop.index0 }}" class="divergence"><span class="mono">{{ d.subject }}</span> ({{ d.gate }}): {{ d.diagnosis }}</p>
{% if divergence_pngs[loop.index0] %}<p><img alt="first divergent layer, {{ d.subject }}" src="data:image/png;base64,{{ divergence_pngs[loop.index0] }}"></p>{% endif %}
{% endfor %}{% endif %}
{% for d in ev.inference.details %}{% if d.prompts %}<h3>{{ d.label }}: per-prompt results</h3>
{% set cols = prompt_cols(d.prompts) %}<table><tr>{% for c in cols %}<th>{{ c }}</th>{% endfor %}</tr>
{% for p in d.prompts %}<tr>{% for c in cols %}<td>{{ p.get(c) | num }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}{% endfor %}
{% if ev.inference.throughput %}<h3>Throughput</h3>
<table><tr><th>format</th><th>engine</th><th>backend</th><th>prefill tok/s</th><th>decode tok/s</th></tr>
{% for t in ev.inference.throughput %}<tr><td>{{ t.get("format") or "" }}</td><td>{{ t.get("engine") or "" }}</td><td>{{ t.get("backend") or "" }}</td><td class="num">{{ t.get("prefill_tps") | num }}</td><td class="num">{{ t.get("decode_tps") | num }}</td></tr>
{% endfor %}</table>{% endif %}{% endif %}

<h2>Artifacts</h2>
<table><tr><th>artifact</th><th>format</th><th>sha256</th><th>size</th><th>tensors</th><th>encodings</th><th>converter</th><th>fingerprint</th><th>wall s</th><th>peak RSS MB</th><th>hash check</th></tr>
{% for a in ev.artifacts %}{% set p = a.producer or {} %}<tr><td class="mono">{{ a.label }}</td><td>{{ a.format or "" }}</td>
<td class="mono" title="{{ a.file_sha256 or '' }}">{{ a.file_sha256 | shorthash }}</td><td class="num">{{ a.file_size | size }}</td>
<td class="num">{{ a.tensor_count | num }}</td><td>{% for e, n in a.encodings.items() %}{{ e }}&times;{{ n }} {% endfor %}</td>
<td>{{ p.get('converter') or "source" }}{% if p.get('mutant') %} (mutant {{ p.get('mutant') }}){% endif %}</td>
<td class="mono" title="{{ p.get('fingerprint') or '' }}">{{ p.get('fingerprint') | shorthash }}</td><td class="num">{{ p.get('wall_s') | num }}</td><td class="num">{{ p.get('peak_rss_mb') | num }}</td>
<td class="{{ 'st-fail' if a.sha256_consistent is false else '' }}">{{ {True: "manifest = sidecar", False: "MISMATCH", None: ""}[a.sha256_consistent] }}</td></tr>
{% endfor %}</table>
<details><summary>Producer command lines</summary>
<table><tr><th>artifact</th><th>argv</th></tr>
{% for a in ev.artifacts if a.producer %}<tr><td class="mono">{{ a.label }}</td><td class="mono">{{ (a.producer.argv or []) | join(" ") }}</td></tr>
{% endfor %}</table></details>
{% set disk = ev.extra.get('disk') %}{% if disk %}
<h2>Disk</h2>
<p>Artifacts written: {{ disk.written | size }} in {{ disk.chains | length }} artifacts; deleted after use: {{ disk.deleted | size }}; kept: {{ disk.kept | size }}{% if disk.get('shared') %}; stored as hard links to identical artifacts (no second copy on disk): {{ disk.shared | size }}{% endif %}{% if disk.get('on_disk') is not none %}; on disk under results/ for this model when the report was built: {{ disk.on_disk | size }}{% endif %}{% if disk.get('linked_from_outside') %}, of which hard links to the source checkpoint's files (not a second copy): {{ disk.linked_from_outside | size }}{% endif %}.</p>
<table><tr><th>artifact</th><th>written</th><th>state</th></tr>
{% for c in disk.chains %}<tr><td class="mono">{{ c.label }}</td><td class="num">{{ c.bytes_written | size }}</td><td>{{ c.state }}</td></tr>
{% endfor %}</table>{% endif %}

<h2>All gate rows</h2>
<details><summary>{{ ev.gates | length }} rows</summary>{{ gate_table(ev.gates) }}</details>

<h2>Tool versions</h2>
<table><tr><th>tool</th><th>version</th></tr>
{% for k, v in ev.tool_versions.items() %}<tr><td>{{ k }}</td><td class="mono">{{ v or "not installed" }}</td></tr>
{% endfor %}</table>
{% set host = ev.get('host') or {} %}{% if host %}<p class="note">Host {{ host.get('hostname') }}, {{ host.get('system') }}, {{ host.get('cpu_count') }} CPUs.</p>{% endif %}
</main>
</body>
</html>
"""

GATE_TABLE = """<table class="gates"><tr><th>gate</th><th>subject</th><th>reference</th><th>status</th><th>metric</th><th>value</th><th>threshold</th><th>reason</th><th>diagnosis</th></tr>
{% for r in rows %}<tr class="st-{{ r.status }}" data-gate="{{ r.gate }}" data-subject="{{ r.subject }}" data-reference="{{ r.reference or '' }}"><td class="mono">{{ r.gate }}</td><td class="mono">{{ r.subject }}</td><td class="mono">{{ r.reference or "" }}</td><td>{{ r.status }}</td><td>{{ r.metric or "" }}</td><td class="num">{{ r.value | num }}</td><td class="num">{{ r.threshold | num }}</td><td>{{ r.reason }}</td><td>{{ diagnosis(r) }}{% set check = check_index.get(comparison(r)) %}{% if check is not none %} <a href="#check-{{ check }}">tensor check</a>{% endif %}</td></tr>
{% endfor %}</table>"""

MATRIX = """<table class="matrix"><tr><th>gate</th>{% for s in subjects %}<th class="subj mono">{{ s }}</th>{% endfor %}</tr>
{% for g in gates %}<tr><th class="mono">{{ g }}</th>{% for s in subjects %}{% set here = cells.get((g, s)) %}{% if here %}{% set st = worst(here) %}<td class="st-{{ st }}" title="{% for r in here %}{{ r.status }}{% if r.reference %} vs {{ r.reference }}{% endif %}{% if r.reason %}: {{ r.reason }}{% endif %}&#10;{% endfor %}">{{ letters[st] }}{% if here | length > 1 %}<sub>{{ here | length }}</sub>{% endif %}</td>{% else %}<td></td>{% endif %}{% endfor %}</tr>
{% endfor %}</table>"""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False)
    env.filters.update(num=display_number, pct=display_percent, size=display_size, shorthash=display_hash)
    return env


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode("ascii") if png else None


def render_html(evidence: dict) -> str:
    env = _environment()
    gate_table_template = env.from_string(GATE_TABLE)
    matrix_template = env.from_string(MATRIX)

    def gate_table(rows):
        return Markup(gate_table_template.render(rows=rows, diagnosis=row_diagnosis, comparison=row_comparison,
                                                 check_index=check_index))

    def matrix(rows):
        gates, subjects, cells = plots.gate_matrix(rows)
        return Markup(matrix_template.render(
            gates=gates, subjects=subjects, cells=cells, letters=plots.STATUS_LETTERS,
            worst=lambda here: plots.worst_status([r["status"] for r in here])))

    check_index = {c["label"]: i for i, c in enumerate(evidence["tensor_checks"])}
    s = evidence["summary"]
    inf_rows = inference_rows(evidence)
    conversion_rows = [r for r in evidence["gates"] if r not in inf_rows]
    inference = evidence["inference"]
    divergence_list = logits.divergences(evidence)
    return env.from_string(TEMPLATE).render(
        ev=evidence, s=s, verdict_color=VERDICT_COLORS[s["verdict"]], outside_line=outside_verdict_line(s),
        cards=[("verdict", s["verdict"]), ("pass", s["pass"]), ("fail", s["fail"]), ("skipped", s["skipped"]),
               ("not evaluated", s["not_evaluated"]), ("pass rate", display_percent(s["pass_rate"])),
               ("coverage", display_percent(s["coverage"]))],
        graph_svg=Markup(graph.conversion_graph_svg(evidence["gates"])), status_colors=graph.STATUS_COLORS,
        no_rows_color=graph.NO_ROWS_COLOR, blocking=blocking_rows(evidence), skips=skip_groups(evidence),
        conversion_rows=conversion_rows or evidence["gates"],
        matrix_png=_b64(plots.gate_matrix_png(conversion_rows or evidence["gates"], f"{evidence['model']}: gates")),
        heatmap_png=_b64(plots.tensor_heatmap_png(evidence["tensor_checks"], f"{evidence['model']}: tensor error / tolerance")),
        tensor_pngs=[_b64(plots.tensor_error_png(c)) if plots.needs_detail(c) else None for c in evidence["tensor_checks"]],
        detail_count=sum(1 for c in evidence["tensor_checks"] if plots.needs_detail(c)),
        inference_section=bool(inf_rows or inference["throughput"] or inference["details"]),
        inf_rows=inf_rows, kl_png=_b64(plots.kl_per_position_png(inference["details"])),
        logit_table=logits.logit_summary(inference["details"]), divergences=divergence_list,
        divergence_pngs=[_b64(plots.divergence_png(d)) for d in divergence_list],
        gate_table=gate_table, matrix=matrix, prompt_cols=prompt_columns,
    )
