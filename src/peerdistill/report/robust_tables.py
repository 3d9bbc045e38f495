"""Plain-text tables of a robustness evaluation (one per family of results), for ``peerdistill eval``."""
from __future__ import annotations

from typing import Any


def _num(v: Any, width: int = 8, digits: int = 2) -> str:
    return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def adversarial_table(part: dict[str, Any]) -> str:
    res, s = part["results"], part["settings"]
    attacks = [a for a in ("fgsm", "pgd") if a in res]
    eps = [k for k in next(iter(res[attacks[0]].values()))] if attacks else []
    cols = [f"{a.upper()} {e.split('/')[0]}" for a in attacks for e in eps]
    lines = [f"adversarial top-1 (%), {s['adv_limit']} test images, eps in 1/255 of the [0, 1] range, "
             f"PGD {s['pgd_steps']} steps{'' if s['pgd_random_start'] else ', no random start'}",
             f"{'head':<12}{'clean':>8}" + "".join(f"{c:>10}" for c in cols)
             + (f"{'authors':>10}" if "fgsm_authors" in res else "")]
    for head, clean in res["clean"].items():
        row = f"{head:<12}{_num(clean)}" + "".join(_num(res[a][head][e], 10) for a in attacks for e in eps)
        lines.append(row + (_num(res["fgsm_authors"][head], 10) if "fgsm_authors" in res else ""))
    if "fgsm_authors" in res:
        a = res.get("fgsm_authors_setting", {})
        pixels = (f" ({a['normalisation']} normalisation: {'/'.join(f'{v:.1f}' for v in a['pixel_eps_255'])}/255 "
                  f"in pixels per channel)") if a else ""
        lines.append(f"authors: IBM ART FGSM eps={s['authors_eps']:g} on normalised inputs{pixels}, clipped to (0, 1) "
                     "there, against the predicted labels (SD-Dropout's _3_adv_robust.py)")
    return "\n".join(lines)


def corruption_table(part: dict[str, Any]) -> str:
    res, s = part["results"], part["settings"]
    sev = s["severities"]
    lines = [f"corruption top-1 (%), {s['corruption_limit']} test images, source {s['corruption_source']}"]
    for head, clean in res["clean"].items():
        lines.append(f"\nhead {head}: clean {clean:.2f}, mCA {res['mca'][head]:.2f} "
                     f"(mean over {len(res['families'])} families of the severity mean)")
        lines.append(f"{'family':<20}" + "".join(f"{'s' + str(k):>8}" for k in sev) + f"{'mean':>8}")
        for fam, r in res["families"].items():
            lines.append(f"{fam:<20}" + "".join(_num(r[head]["severity"][str(k)]) for k in sev)
                         + _num(r[head]["mean"]))
    return "\n".join(lines)


def ood_table(part: dict[str, Any]) -> str:
    res, s = part["results"], part["settings"]
    lines = [f"OOD detection (%), in-distribution: {res['in_distribution']}; ODIN T={s['odin_temperature']:g}, "
             f"eps={s['odin_eps']:g} ({s['odin_space']}); energy T={s['energy_temperature']:g}; FPR95 at the "
             + ("highest threshold keeping 95 % of the in-distribution scores" if s.get("fpr_rule", "highest")
                == "highest" else "mean over the thresholds with TPR 95 % ± 0.05 (ODIN's)"),
             f"{'OOD set':<16}{'head':<12}{'score':<8}{'AUROC':>8}{'AUPR-in':>9}{'AUPR-out':>10}{'FPR95':>8}"]
    for name, per in res.items():
        if name == "in_distribution":
            continue
        for head, scores in per.items():
            if head == "images":
                continue
            for score, m in scores.items():
                m = m or {}
                lines.append(f"{name:<16}{head:<12}{score:<8}{_num(m.get('auroc'))}{_num(m.get('aupr_in'), 9)}"
                             f"{_num(m.get('aupr_out'), 10)}{_num(m.get('fpr95'))}")
    return "\n".join(lines)


def format_robust(res: dict[str, Any]) -> str:
    """Every evaluated part's table, under a header naming the checkpoint."""
    blocks = [f"{res['checkpoint']} (epoch {res['epoch']}); results in {res['run_dir']}/eval.json"]
    for part, fn in (("adversarial", adversarial_table), ("corruptions", corruption_table), ("ood", ood_table)):
        if part in res:
            blocks.append(fn(res[part]) + f"\n({res[part]['seconds']:.1f} s)")
    return "\n\n".join(blocks)
