"""``report_acc`` (upstream: dataset/utils/multiple_choice.py): one row per split ('none' without
a split column): ``Overall`` and the mean hit per category."""
from .._frame import Frame


def report_acc(data):
    rows = data.to_dict(orient="records")
    splits = sorted({r.get("split") or "none" for r in rows})
    out = {"split": splits, "Overall": []}
    cats = sorted({r["category"] for r in rows if r.get("category")})
    for c in cats:
        out[c] = []
    for sp in splits:
        sub = [r for r in rows if (r.get("split") or "none") == sp]
        out["Overall"].append(sum(r["hit"] for r in sub) / len(sub))
        for c in cats:
            hits = [r["hit"] for r in sub if r.get("category") == c]
            out[c].append(sum(hits) / len(hits) if hits else float("nan"))
    return Frame(out)
