"""Plain-text tables of a robustness evaluation (one per family of results), for ``peerdistill eval``."""
from __future__ import annotations

from typing import Any

from ..text import plural, text_table


def _num(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def adversarial_table(part: dict[str, Any]) -> str:
    res, s = part["results"], part["settings"]
    attacks = [a for a in ("fgsm", "pgd") if a in res]
    eps = [k for k in next(iter(res[attacks[0]].values()))] if attacks else []
    authors = "fgsm_authors" in res
    header = ["head", "clean", *(f"{a.upper()} {e.split('/')[0]}" for a in attacks for e in eps)]
    rows = [[head, _num(clean), *(_num(res[a][head][e]) for a in attacks for e in eps)]
            for head, clean in res["clean"].items()]
    if authors:
        header.append("authors")
        for row in rows:
            row.append(_num(res["fgsm_authors"][row[0]]))
    lines = [f"adversarial top-1 (%), {plural(s['adv_limit'], 'test image')}, eps in 1/255 of the [0, 1] range, "
             f"PGD {plural(s['pgd_steps'], 'step')}{'' if s['pgd_random_start'] else ', no random start'}",
             *text_table(header, rows, "l" + "r" * (len(header) - 1))]
    if authors:
        a = res.get("fgsm_authors_setting", {})
        pixels = (f" ({a['normalisation']} normalisation: {'/'.join(f'{v:.1f}' for v in a['pixel_eps_255'])}/255 "
                  f"in pixels per channel)") if a else ""
        lines.append(f"authors: IBM ART FGSM eps={s['authors_eps']:g} on normalised inputs{pixels}, clipped to (0, 1) "
                     "there, against the predicted labels (SD-Dropout's _3_adv_robust.py)")
    return "\n".join(lines)


def corruption_table(part: dict[str, Any]) -> str:
    res, s = part["results"], part["settings"]
    sev = s["severities"]
    lines = [f"corruption top-1 (%), {plural(s['corruption_limit'], 'test image')}, source {s['corruption_source']}"]
    for head, clean in res["clean"].items():
        lines.append(f"\nhead {head}: clean {clean:.2f}, mCA {res['mca'][head]:.2f} "
                     f"(mean over {plural(len(res['families']), 'family', 'families')} of the severity mean)")
        rows = [[fam, *(_num(r[head]["severity"][str(k)]) for k in sev), _num(r[head]["mean"])]
                for fam, r in res["families"].items()]
        lines += text_table(["family", *(f"s{k}" for k in sev), "mean"], rows, "l" + "r" * (len(sev) + 1))
    return "\n".join(lines)


def ood_table(part: dict[str, Any]) -> str:
    res, s = part["results"], part["settings"]
    rows = []
    for name, per in res.items():
        if name == "in_distribution":
            continue
        for head, scores in per.items():
            if head == "images":
                continue
            for score, m in scores.items():
                m = m or {}
                rows.append([name, head, score, *(_num(m.get(k)) for k in ("auroc", "aupr_in", "aupr_out", "fpr95"))])
    return "\n".join([f"OOD detection (%), in-distribution: {res['in_distribution']}; "
                      f"ODIN T={s['odin_temperature']:g}, eps={s['odin_eps']:g} ({s['odin_space']}); "
                      f"energy T={s['energy_temperature']:g}; FPR95 at the "
                      + ("highest threshold keeping 95 % of the in-distribution scores"
                         if s.get("fpr_rule", "highest") == "highest"
                         else "mean over the thresholds with TPR 95 % ± 0.05 (ODIN's)"),
                      *text_table(["OOD set", "head", "score", "AUROC", "AUPR-in", "AUPR-out", "FPR95"], rows,
                                  "lllrrrr")])


def format_robust(res: dict[str, Any]) -> str:
    """Every evaluated part's table, under a header naming the checkpoint."""
    blocks = [f"{res['checkpoint']} (epoch {res['epoch']}); results in {res['run_dir']}/eval.json"]
    for part, fn in (("adversarial", adversarial_table), ("corruptions", corruption_table), ("ood", ood_table)):
        if part in res:
            blocks.append(fn(res[part]) + f"\n({res[part]['seconds']:.1f} s)")
    return "\n\n".join(blocks)
