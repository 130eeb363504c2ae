"""The report's logit evidence and first-divergence curves, from the evidence dict only.

- `logit_summary`: per artifact and engine (one inference-details label), the KL statistics over
  every compared position of every prompt (mean, median, p99, max, p99/mean), top-1 and top-5
  agreement, max |dlogit| and the worst prompt (largest max KL).
- `divergences`: the failing inference rows that carry a first-divergence curve
  (convqa.gates.divergence), one per (subject, baseline): a run row and a chat row of the same
  artifact share one capture.
"""

from __future__ import annotations

from convqa.compare.inference import kl_statistics
from convqa.report.evidence import as_float, inference_rows


def logit_summary(details: list[dict]) -> list[dict]:
    table = []
    for d in details:
        kls, positions, top1, top5, max_abs, worst = [], 0, 0.0, 0.0, None, None
        for p in d["prompts"]:
            kl = [as_float(x) for x in p.get("kl_per_position") or []]
            if not kl or any(x is None for x in kl):
                continue
            kls.extend(kl)
            positions += len(kl)
            top1 += (as_float(p.get("top1_agreement")) or 0.0) * len(kl)
            top5 += (as_float(p.get("top5_agreement", p.get("top1_agreement"))) or 0.0) * len(kl)
            dlogit = as_float(p.get("max_abs_dlogit"))
            if dlogit is not None:
                max_abs = dlogit if max_abs is None else max(max_abs, dlogit)
            if worst is None or max(kl) > worst[0]:
                worst = (max(kl), p.get("prompt_id", "?"))
        if not positions:
            continue
        stats = kl_statistics(kls)
        table.append({"label": d["label"], "positions": positions, **stats,
                      "p99_over_mean": stats["p99_kl"] / stats["mean_kl"] if stats["mean_kl"] > 0 else None,
                      "top1_agreement": top1 / positions, "top5_agreement": top5 / positions,
                      "max_abs_dlogit": max_abs, "worst_prompt": worst[1]})
    return table


def divergences(evidence: dict) -> list[dict]:
    found, seen = [], set()
    for row in inference_rows(evidence):
        details = row.get("details")
        divergence = details.get("divergence") if isinstance(details, dict) else None
        if row["status"] != "fail" or not isinstance(divergence, dict) or not divergence.get("values"):
            continue
        key = (row["subject"], divergence.get("baseline"))
        if key in seen:
            continue
        seen.add(key)
        found.append({"gate": row["gate"], "subject": row["subject"], **divergence})
    return found
