"""Human preferences for a bench's judged pairs, and how each judge agrees with them.

    labels = read(Path("labels.csv"), store.pairs())   # pair -> {criterion: "win" | "tie" | "loss"}
    compare(store.outcomes(), labels)                   # judge -> criterion -> agreement.Agreement

The CSV has a header and one row per pair a person judged:

    set_id,seed,method,baseline,composition,quality
    demo-character_demo-clothing,0,reflect,merge,a,tie

`method` is image A and `baseline` image B, as the bench stores them; a criterion's winner is
`a`, `b` or `tie` (or the method's or the baseline's name). Any subset of the judge's criteria
(composition, quality) may be given, one column each. Every judge answer about a labelled pair
(each order, each repeat) is compared with that pair's label, so kappa here measures how often
a single answer of the judge matches the person. Every problem is one line naming FILE:LINE.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from localora.bench.report import judges_in, outcome_key, pair_key
from localora.errors import LocaloraError, MissingError
from localora.scoring import agreement as agreements
from localora.scoring.judge import DIMENSIONS

KEY = ("set_id", "seed", "method", "baseline")
WINNER = {"a": "win", "b": "loss", "tie": "tie"}

Labels = dict[tuple, dict[str, str]]


def read(path: Path, pairs: list[dict[str, Any]]) -> Labels:
    """The labels of `path` by pair (set_id, seed, method, baseline), as verdicts from A's side."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MissingError(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocaloraError(f"{path}: cannot read the labels file ({getattr(e, 'strerror', None) or e})") from None
    rows = csv.reader(text.splitlines())
    header = [h.strip() for h in next(rows, [])]
    missing = [k for k in KEY if k not in header]
    if missing:
        raise LocaloraError(f"{path}:1: no {', '.join(missing)} column; the header is "
                            f"{','.join(KEY)},{','.join(DIMENSIONS)} (any of the criteria)")
    criteria = [h for h in header if h not in KEY]
    unknown = [c for c in criteria if c not in DIMENSIONS]
    if unknown or not criteria:
        what = f"unknown criterion '{unknown[0]}'" if unknown else "no criterion column"
        raise LocaloraError(f"{path}:1: {what}; the judge's criteria are {', '.join(DIMENSIONS)}")
    known = {pair_key(p) for p in pairs}
    labels: Labels = {}
    for line, row in enumerate(rows, 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise LocaloraError(f"{path}:{line}: {len(row)} fields where the header has {len(header)}")
        cells = dict(zip(header, (c.strip() for c in row)))
        if not all(cells[k] for k in KEY):
            raise LocaloraError(f"{path}:{line}: no pair; give its {', '.join(KEY)}")
        try:
            pair = (cells["set_id"], int(cells["seed"]), cells["method"], cells["baseline"])
        except ValueError:
            raise LocaloraError(f"{path}:{line}: seed '{cells['seed']}' is not a whole number") from None
        if pair not in known:
            raise LocaloraError(f"{path}:{line}: the bench judged no pair {pair[0]} seed {pair[1]} {pair[2]} vs "
                                f"{pair[3]}; name a pair of its report (set_id, seed, method, baseline)")
        if pair in labels:
            raise LocaloraError(f"{path}:{line}: pair {pair[0]} seed {pair[1]} {pair[2]} vs {pair[3]} is labelled "
                                f"twice; keep one row")
        names = {**WINNER, pair[2].lower(): "win", pair[3].lower(): "loss"}
        verdicts = {}
        for c in criteria:
            if cells[c].lower() not in names:
                raise LocaloraError(f"{path}:{line}: {c} winner '{cells[c]}' is not a, b, tie, {pair[2]} or {pair[3]}")
            verdicts[c] = names[cells[c].lower()]
        labels[pair] = verdicts
    if not labels:
        raise LocaloraError(f"{path}: no labelled pairs; add one row per pair under the header")
    return labels


def compare(outcomes: list[dict[str, Any]], labels: Labels) -> dict[str, dict[str, agreements.Agreement]]:
    """judge -> criterion -> agreement of its answers about the labelled pairs with the labels."""
    criteria = [d for d in DIMENSIONS if any(d in v for v in labels.values())]
    out = {}
    for name in judges_in(outcomes):
        mine = [o for o in outcomes if o["judge"] == name and pair_key(o) in labels]
        # The person's label stands beside every answer of the judge about that pair.
        person = [{**o, **labels[pair_key(o)]} for o in mine]
        out[name] = agreements.compare(mine, person, outcome_key, pair_key, criteria)
    return out
