"""What each profile does on 8, 12, 16 and 24 GB cards, and about how long a run takes there (an
estimate from doctor's plan, not a measurement): the numbers behind README's per-card table.

    python scripts/plan_cards.py [--profiles sdxl-realistic,...] [--cards 8,12,16,24] [--out plan_cards.json]

For each profile and card: the plan `localora doctor --vram GB` prints (resident or moving, the
moves of a 5-iteration run, the peak), and minutes for a Merge run of 5 iterations x 3 candidates
with 3 LoRAs and the few-shot grid (33 renders, 16 VLM calls) at the stated seconds per render,
per VLM call and per move. Change the seconds to your card's (scripts/bench_gpu.py measures them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from localora import planning, profiles
from localora.estimates import GIB

RENDERS, VLM_CALLS = 33, 16  # refs 3 + grid 9 + start 1 + 5 x (3 candidates + 1 refined); 5 x 3 + select


def minutes(plan: planning.Plan, render_s: float, vlm_s: float, move_s: float) -> float | None:
    if plan.verdict in ("too large", "unknown"):
        return None
    return round((RENDERS * render_s + VLM_CALLS * vlm_s + sum(plan.moves.values()) * move_s) / 60, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="sdxl-realistic,sdxl-anime,sdxl-realistic-small,sdxl-anime-small,"
                                               "sd15-anime,sd15-realistic")
    parser.add_argument("--cards", default="8,12,16,24", help="card sizes in GiB")
    parser.add_argument("--render-s", default="8:30,12:16,16:16,24:8",
                        help="seconds per SDXL render by card size (GiB:seconds)")
    parser.add_argument("--vlm-s", type=float, default=3.5, help="seconds per VLM call")
    parser.add_argument("--move-s", type=float, default=4.0, help="seconds per move of a model to or from the card")
    parser.add_argument("--out", type=Path, default=Path("plan_cards.json"))
    args = parser.parse_args()
    render_s = {float(k): float(v) for k, v in (pair.split(":") for pair in args.render_s.split(","))}
    rows = []
    for name in args.profiles.split(","):
        profile = profiles.load_profile(name)
        for card in (float(c) for c in args.cards.split(",")):
            plan = planning.plan(profile, int(card * GIB))
            rows.append({**plan.as_dict(), "minutes": minutes(plan, render_s.get(card, 16.0), args.vlm_s, args.move_s)})
    print(f"{'profile':<22} {'card':>5} {'verdict':<10} {'moves':>5} {'GiB moved':>9} {'peak':>5} {'minutes':>7}")
    for r in rows:
        mins = "-" if r["minutes"] is None else f"{r['minutes']:.0f}"
        print(f"{r['profile']:<22} {r['card_gib']:>5g} {r['verdict']:<10} {sum(r['moves'].values()):>5} "
              f"{r['moved_gib']:>9.0f} {r['peak_gib']:>5.1f} {mins:>7}")
    args.out.write_text(json.dumps({"basis": {"renders": RENDERS, "vlm_calls": VLM_CALLS, "render_s": render_s,
                                              "vlm_s": args.vlm_s, "move_s": args.move_s}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
