"""The bench report: report.md and PNG plots, from a bench folder's SQLite rows.

    report.md                 what ran (testbed, sets, seeds, searches, ablations, judge settings);
                              CLIP-T, CLIP-I and CLIP-I per element per method (mean over sets per
                              seed, then mean ± std over seeds; [--clipscore] CLIPScore x100 too);
                              the method x method win-rate table; win / tie / loss vs the baseline
                              over judge outcomes (Wilson interval) and over averaged pairs; the
                              judge's position bias; the image grid
    winrate.png               win / tie / loss per judge dimension, each method vs the baseline
    winrate_by_elements.png   the same per number of elements, when the folder holds several
    objective.png             best objective over renders spent, per black-box strategy (mean over
                              sets and seeds), from the state events of their run folders
    grid.png                  one row per set, one column per method, at the lowest seed

The counts come from judge.rates / judge.aggregate over the stored outcomes and scores, so the
report and the judge can never count differently.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localora.scoring import agreement as agreements
from localora.scoring import clipscore as scales
from localora.scoring import judge
from localora.bench.testbeds import CATEGORIES
from localora.bench import variants
from localora.bench.plan import ALL, METHODS, REFLECT, SEARCH_STRATEGY, run_folder
from localora.bench.store import Store
from localora.errors import LocaloraError
from localora.files import atomic_write

REPORT = "report.md"
WINRATE_PNG = "winrate.png"
BY_ELEMENTS_PNG = "winrate_by_elements.png"
OBJECTIVE_PNG = "objective.png"
GRID_PNG = "grid.png"
GRID_THUMB = 160  # pixels per image in grid.png
OUTCOMES = (("wins", "Win", "#4c9a5a"), ("ties", "Tie", "#b0b0b0"), ("losses", "Loss", "#c8553d"))

Rows = list[dict[str, Any]]


def write(folder: Path, clipscore: bool = False) -> list[Path]:
    """Write the report and its plots into `folder`; returns their paths."""
    folder = Path(folder)
    store = Store.open(folder)
    results, pairs, settings, outcomes = store.results(), store.pairs(), store.settings(), store.outcomes()
    if not results:
        raise LocaloraError(f"{folder}: the bench has no finished rows yet; run `localora bench --out {folder}` first")
    baseline = baseline_of(settings, results)
    against = [p for p in pairs if p["baseline"] == baseline]
    sizes = sorted({r["elements"] for r in results})
    plots = []
    if against:
        _save(_winrate_figure([("", winrates(against))], baseline), folder / WINRATE_PNG)
        plots.append(WINRATE_PNG)
        if len(sizes) > 1:
            groups = [(f"{n} elements", winrates([p for p in against if p["elements"] == n])) for n in sizes]
            _save(_winrate_figure(groups, baseline), folder / BY_ELEMENTS_PNG)
            plots.append(BY_ELEMENTS_PNG)
    if write_grid(folder, results):
        plots.append(GRID_PNG)
    curves = objective_curves(folder, results)
    if curves:
        _save(_objective_figure(curves), folder / OBJECTIVE_PNG)
        plots.append(OBJECTIVE_PNG)
    text = markdown(results, pairs, settings, plots, curves, outcomes, clipscore)
    atomic_write(folder / REPORT, lambda p: p.write_text(text, encoding="utf-8"))
    return [folder / REPORT] + [folder / name for name in plots]


# ------------------------------------------------------------------ numbers

def methods_in(rows: Rows) -> list[str]:
    """The methods present, in the paper's order."""
    present = {r["method"] for r in rows}
    order = {m: i for i, m in enumerate(METHODS)}
    # Each variant right after its base method, so an ablation sits beside what it ablates.
    return sorted(present, key=lambda m: (order.get(variants.base_of(m), len(order)), variants.base_of(m), m != variants.base_of(m), m))


@dataclass(frozen=True)
class Spread:
    """A score over seeds: the mean of the per-seed means over sets, and the sample standard
    deviation of those per-seed means (None with one seed: there is no spread to show)."""

    mean: float
    std: float | None
    seeds: int

    def cell(self) -> str:
        return f"{self.mean:.4f}" if self.std is None else f"{self.mean:.4f} ± {self.std:.4f}"


def over_seeds(rows: Rows, value: Callable[[dict[str, Any]], float | None]) -> Spread | None:
    """`value` of each row (None: the row lacks it), averaged per seed, then over seeds."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        v = value(r)
        if v is not None:
            by_seed.setdefault(r["seed"], []).append(v)
    if not by_seed:
        return None
    means = [statistics.fmean(vs) for vs in by_seed.values()]
    return Spread(statistics.fmean(means), statistics.stdev(means) if len(means) > 1 else None, len(means))


def elements_in(results: Rows) -> list[str]:
    """The element categories that have a per-element CLIP-I, in the testbeds' category order."""
    present = {c for r in results if r.get("clip_i_elements") for c in json.loads(r["clip_i_elements"])}
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


def clip_columns(results: Rows, clipscore: bool = False) -> dict[str, Callable[[dict[str, Any]], float | None]]:
    """Column title -> the row's value: CLIP-T, CLIP-I (the mean over elements), CLIP-I per
    element category, and with `clipscore` CLIPScore x 100 of CLIP-T and of CLIP-I."""
    cols: dict[str, Callable[[dict[str, Any]], float | None]] = {"CLIP-T": lambda r: r["clip_t"]}
    if clipscore:
        cols["CLIPScore-T"] = lambda r: scales.clipscore(r["clip_t"])
    cols["CLIP-I"] = lambda r: r["clip_i"]
    if clipscore:
        cols["CLIPScore-I"] = lambda r: scales.clipscore(r["clip_i"])
    for c in elements_in(results):
        cols[f"CLIP-I {c}"] = lambda r, c=c: json.loads(r["clip_i_elements"]).get(c) if r.get("clip_i_elements") else None
    return cols


def clip_table(results: Rows, clipscore: bool = False) -> dict[str, dict[str, Spread | None]]:
    """method -> column title -> the score over seeds (None where no row has that column)."""
    cols = clip_columns(results, clipscore)
    return {m: {title: over_seeds([r for r in results if r["method"] == m], f) for title, f in cols.items()}
            for m in methods_in(results)}


def winrates(pairs: Rows) -> dict[str, dict[str, judge.Counts]]:
    """method -> judge dimension -> win / tie / loss counts of the method against the baseline."""
    out = {}
    for m in methods_in(pairs):
        scores = [judge.PairScores({d: p[f"{d}_a"] for d in judge.DIMENSIONS}, {d: p[f"{d}_b"] for d in judge.DIMENSIONS})
                  for p in pairs if p["method"] == m]
        out[m] = judge.aggregate(scores)
    return out


def baseline_of(settings: dict[str, Any], results: Rows) -> str:
    """The method the one-baseline tables compare against: the bench's --judge-baseline, or with
    `all` the first method present (every pair is in the method x method table)."""
    return settings["baseline"] if settings["baseline"] != ALL else methods_in(results)[0]


def matrix(rows: Rows) -> dict[tuple[str, str], dict[str, judge.Rate]]:
    """(row method, column method) -> win / tie / loss of the row method against the column method,
    from judged rows (outcomes or pairs) in either direction: a stored (A = method, B = baseline)
    row counts for (method, baseline) as it is and for (baseline, method) mirrored."""
    mirror = {"win": "loss", "loss": "win", "tie": "tie"}
    verdicts: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        v = judge.verdict(judge.PairScores({d: r[f"{d}_a"] for d in judge.DIMENSIONS},
                                           {d: r[f"{d}_b"] for d in judge.DIMENSIONS}))
        verdicts.setdefault((r["method"], r["baseline"]), []).append(v)
        verdicts.setdefault((r["baseline"], r["method"]), []).append({d: mirror[x] for d, x in v.items()})
    return {k: judge.rates(vs) for k, vs in verdicts.items()}


def grid_cells(results: Rows) -> tuple[int, list[str], list[str], dict[tuple[str, str], str]]:
    """The image grid of the lowest seed: (seed, set ids, methods, (set, method) -> image path)."""
    seed = min(r["seed"] for r in results)
    mine = [r for r in results if r["seed"] == seed]
    sets = list(dict.fromkeys(r["set_id"] for r in sorted(mine, key=lambda r: (r["elements"], r["set_id"]))))
    return seed, sets, methods_in(mine), {(r["set_id"], r["method"]): r["image"] for r in mine}


def write_grid(folder: Path, results: Rows) -> bool:
    """grid.png: one row per set, one column per method (the lowest seed), labelled; False when
    no image of the folder can be read."""
    from PIL import Image, ImageDraw

    seed, sets, methods, cells = grid_cells(results)
    label_w, label_h, t = 220, 24, GRID_THUMB
    sheet = Image.new("RGB", (label_w + t * len(methods), label_h + t * len(sets)), "white")
    draw = ImageDraw.Draw(sheet)
    drawn = 0
    for j, m in enumerate(methods):
        draw.text((label_w + j * t + 4, 6), m[:24], fill="black")
    for i, set_id in enumerate(sets):
        draw.text((4, label_h + i * t + t // 2 - 6), set_id[:34], fill="black")
        for j, m in enumerate(methods):
            path = folder / cells.get((set_id, m), "-")
            if path.is_file():
                with Image.open(path) as im:
                    sheet.paste(im.convert("RGB").resize((t, t)), (label_w + j * t, label_h + i * t))
                drawn += 1
    if drawn:
        atomic_write(folder / GRID_PNG, lambda p: sheet.save(p, format="PNG"))
    return bool(drawn)


def outcome_rates(outcomes: Rows) -> dict[str, dict[str, judge.Rate]]:
    """method -> judge dimension -> win / tie / loss over the stored outcomes (every repeat and
    order) of the method against the baseline."""
    return {m: judge.rates([o for o in outcomes if o["method"] == m]) for m in methods_in(outcomes)}


def position_bias(outcomes: Rows) -> dict[str, dict[str, tuple[int, int, int, int, int]]]:
    """judge model -> dimension -> (first-shown wins, second-shown wins, ties, order pairs that
    agree, order pairs): how often the image shown first scores higher, and how often one repeat's
    two orders give the same verdict (an unbiased judge: first wins = second wins, agreement 100%)."""
    out = {}
    for model in sorted({o["judge"] for o in outcomes}):
        mine = [o for o in outcomes if o["judge"] == model]
        both: dict[tuple, dict[str, dict]] = {}
        for o in mine:
            both.setdefault((o["set_id"], o["seed"], o["method"], o["baseline"], o["repeat"]), {})[o["first"]] = o
        orders = [x for x in both.values() if set(x) == {"a", "b"}]
        out[model] = {}
        for d in judge.DIMENSIONS:
            # "win" is A's side; A was first when first == "a".
            first = sum((o[d] == "win") if o["first"] == "a" else (o[d] == "loss") for o in mine)
            ties = sum(o[d] == "tie" for o in mine)
            agree = sum(x["a"][d] == x["b"][d] for x in orders)
            out[model][d] = (first, len(mine) - first - ties, ties, agree, len(orders))
    return out


def objective_curves(folder: Path, results: Rows) -> dict[str, list[tuple[int, float]]]:
    """Per black-box method: (renders spent, best objective so far), the mean over its rows' runs."""
    import json

    curves: dict[str, list[tuple[int, float]]] = {}
    for method in methods_in(results):
        runs = []
        for r in (r for r in results if r["method"] == method):
            log = run_folder(folder, r["set_id"], r["seed"], method) / "events.jsonl"
            if log.is_file():
                states = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if '"state"' in line]
                runs.append({s["spent"]: s["best"] for s in states if s.get("type") == "state"})
        spent = sorted(set.intersection(*(set(run) for run in runs))) if runs and all(runs) else []
        if spent:
            curves[method] = [(n, statistics.fmean(run[n] for run in runs)) for n in spent]
    return curves


def _objective_figure(curves: dict[str, list[tuple[int, float]]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=110)
    ax = fig.subplots()
    for method, points in curves.items():
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=method)
    ax.set_xlabel("renders spent")
    ax.set_ylabel("best objective (mean over sets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ report.md

def markdown(results: Rows, pairs: Rows, settings: dict[str, Any], plots: list[str],
             curves: dict[str, list[tuple[int, float]]] | None = None, outcomes: Rows | None = None,
             clipscore: bool = False) -> str:
    baseline = baseline_of(settings, results)
    every_pair = pairs
    pairs = [p for p in pairs if p["baseline"] == baseline]
    sizes = sorted({r["elements"] for r in results})
    per_size = ", ".join(f"{len({r['set_id'] for r in results if r['elements'] == n})} of {n} elements" for n in sizes)
    seeds = sorted({r["seed"] for r in results})
    ran = methods_in(results)
    searches = [m for m in ran if variants.base_of(m) in SEARCH_STRATEGY]
    n, m = settings["iterations"], settings["candidates"]
    # Older folders ran reflect with one few-shot setting for the whole bench.
    old_fewshot = (f"; reflect's few-shot {'on' if settings['fewshot'] else 'off'}"
                   if "fewshot" in settings and REFLECT in searches else "")
    search = (f"{', '.join(searches)}: {n} round(s) of {m} candidates + 1, {n * (m + 1)} renders each"
              + old_fewshot + ". ") if searches else ""
    ablations = [f"`{name}` is {_variant_text(name)}" for name in ran if variants.base_of(name) != name]
    if ablations:
        search += "Ablations: " + "; ".join(ablations) + ". "
    temperature = settings.get("judge_temperature")
    judged = ((f"Judge: {'every pair of methods' if settings['baseline'] == ALL else f'each method vs {baseline}'}, "
               f"both orders, {settings['repeats']} repeat(s), "
               + (f"sampled at temperature {temperature:g}." if temperature else "greedy.")
               if "judge_temperature" in settings else
               f"Judge: each method vs {baseline}, both orders, {settings['repeats']} repeat(s).")
              if every_pair else "No pair was judged.")
    setup = (f"Testbed `{settings['testbed']}`, profile `{settings['profile']}`, LoRA scale "
             f"{settings['lora_scale']:g} for the baselines; composition sets: {per_size}; seed(s) "
             f"{', '.join(map(str, seeds))}. {search}{judged}")
    lines = [f"# Bench report: {settings['testbed']}", "", setup, "", "## CLIP scores", "",
             *_clip_lines(results, clipscore), "", _clip_note(results, settings, clipscore)]
    if len({_sets(results, m) for m in methods_in(results)}) > 1:
        lines.append("The methods ran on different numbers of sets (n); compare them within one size below.")
    if len(sizes) > 1:
        for n in sizes:
            lines += ["", f"### {n} elements", "", *_clip_lines([r for r in results if r["elements"] == n], clipscore)]
    if curves:
        lines += ["", "## Search at an equal render budget", "",
                  "Best objective (CLIP-T to the prompt + mean CLIP-I to each LoRA alone) after n renders, mean "
                  "over sets and seeds.", "", "| method | " + " | ".join(f"{n}" for n, _ in next(iter(curves.values())))
                  + " |", "|---|" + "---|" * len(next(iter(curves.values())))]
        for method, points in curves.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for _, v in points) + " |")
        if OBJECTIVE_PNG in plots:
            lines += ["", f"![best objective over renders]({OBJECTIVE_PNG})"]
    all_judges = outcomes or []
    # With --judges, the tables of methods count the first judge's answers; every judge has its
    # own section below.
    first = primary_judge(settings)
    every_outcome = [o for o in all_judges if first is None or o["judge"] == first]
    outcomes = [o for o in every_outcome if o["baseline"] == baseline]
    if every_pair:
        lines += ["", "## Method × method", "", *_matrix_lines(every_outcome or every_pair, results), "",
                  "Each cell: the row method's win rate against the column method, composition / quality, over "
                  + ("judge outcomes (every repeat and order)" if every_outcome else "judged pairs")
                  + ", and how many; – where that pair was not judged"
                  + ("" if settings["baseline"] == ALL else f" (this bench judged each method against {baseline} "
                     "only; `--judge-baseline all` judges every pair)") + "."]
    lines += ["", f"## Pairwise judge: each method vs {baseline}", ""]
    if not pairs:
        lines.append("No judged pairs yet.")
    else:
        lines += ["### Over outcomes", ""]
        if outcomes:
            lines += _outcome_lines(outcomes, baseline)
            lines += ["", "One outcome per judge answer: every repeat and both orders of every pair. Win rate = wins / "
                      "outcomes, ties counted separately (not as half wins); the interval is the 95% Wilson score "
                      "interval, which treats outcomes as independent although the answers about one pair are not."]
        else:
            lines.append("No per-answer outcomes stored (these pairs were judged by an older localora).")
        lines += ["", "### Averaged verdicts", ""]
        lines += _judge_lines(pairs, baseline)
        lines += ["", "Win rate = wins / pairs; a pair's scores are averaged over both orders and every repeat before "
                  "its one verdict (the MLC protocol)."]
        if WINRATE_PNG in plots:
            lines += ["", f"![win / tie / loss vs {baseline}]({WINRATE_PNG})"]
        if len(sizes) > 1:
            lines += ["", "### By number of elements"]
            for n in sizes:
                subset = [p for p in pairs if p["elements"] == n]
                lines += ["", f"#### {n} elements", ""]
                lines += _judge_lines(subset, baseline) if subset else ["No judged pairs."]
            if BY_ELEMENTS_PNG in plots:
                lines += ["", f"![win / tie / loss vs {baseline} by number of elements]({BY_ELEMENTS_PNG})"]
    if all_judges:
        lines += ["", "## Position bias", "", *_bias_lines(all_judges), "",
                  "First-shown wins: outcomes in which the image shown first scored higher; an unbiased judge has "
                  "as many second-shown wins. Order agreement: repeats whose two orders gave the same verdict."]
    if len(judges_in(all_judges)) > 1:
        lines += ["", *_judges_lines(all_judges, baseline)]
    lines += ["", "## Images", "", *_grid_lines(results, plots)]
    return "\n".join(lines) + "\n"


def _matrix_lines(rows: Rows, results: Rows) -> list[str]:
    table = matrix(rows)
    methods = [m for m in methods_in([*results, *rows]) if any(m in k for k in table)]
    lines = ["| row vs column | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for r in methods:
        cells = []
        for c in methods:
            rates = table.get((r, c))
            cells.append(" / ".join(f"{rates[d].win_rate:.0%}" for d in judge.DIMENSIONS) + f" ({rates[judge.DIMENSIONS[0]].n})"
                         if rates else "–")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def _grid_lines(results: Rows, plots: list[str]) -> list[str]:
    seed, sets, methods, cells = grid_cells(results)
    lines = [f"Seed {seed}: one row per composition set, one column per method."]
    if GRID_PNG in plots:
        lines += ["", f"![image grid]({GRID_PNG})"]
    lines += ["", "| set | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for set_id in sets:
        lines.append(f"| {set_id} | " + " | ".join(f"![{m}]({cells[(set_id, m)]})" if (set_id, m) in cells else "–"
                                                   for m in methods) + " |")
    return lines


def _variant_text(name: str) -> str:
    try:
        v = variants.parse(name, METHODS, tuple(SEARCH_STRATEGY), CATEGORIES)
    except LocaloraError:
        return "a method this localora does not know"
    text = v.describe()
    if v.drop:
        text += " (CLIP-T still against the whole prompt; only sets with that element)"
    return text


def _sets(results: Rows, method: str) -> str:
    mine = [r for r in results if r["method"] == method]
    sets, seeds = len({r["set_id"] for r in mine}), len({r["seed"] for r in mine})
    return f"{sets} set{'s' * (sets != 1)} × {seeds} seed{'s' * (seeds != 1)}"


def _clip_lines(results: Rows, clipscore: bool = False) -> list[str]:
    table = clip_table(results, clipscore)
    titles = list(clip_columns(results, clipscore))
    lines = ["| Method | " + " | ".join(titles) + " | n |", "|---|" + "---|" * (len(titles) + 1)]
    for m, cols in table.items():
        cells = [cols[t].cell() if cols[t] is not None else "–" for t in titles]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_sets(results, m)} |")
    return lines


def _clip_note(results: Rows, settings: dict[str, Any], clipscore: bool) -> str:
    seeds = len({r["seed"] for r in results})
    spread = ("Mean over composition sets per seed, then the mean ± sample standard deviation of those over "
              f"the {seeds} seeds" if seeds > 1 else
              "Mean over composition sets; one seed (n = 1), so no spread over seeds is shown")
    refs = settings.get("reference_seeds")
    where = (f"each LoRA alone rendered at seeds {', '.join(map(str, refs))}, which no method's search renders at "
             "(or the testbed's own reference images)" if refs else
             "each LoRA alone at the row's own seed (this folder predates held-out references, so a search was "
             "scored against a reference it had looked at)")
    old = sum(not r.get("clip_i_references") for r in results)
    note = (f"{spread}; raw cosine similarity. CLIP-T: image vs the set's prompt. CLIP-I: image vs {where}; one "
            "column per element category and their mean.")
    if refs and old:
        note += f" {old} row(s) made by an older localora scored CLIP-I against the same-seed render instead."
    if clipscore:
        note += f" CLIPScore: 100 × {scales.CLIPSCORE_W:g} × max(cosine, 0), of the same cosines."
    return note


def _outcome_lines(outcomes: Rows, baseline: str) -> list[str]:
    lines = [f"| Method vs {baseline} | Dimension | Win | Tie | Loss | Outcomes | Win rate (95% Wilson) |",
             "|---|---|---|---|---|---|---|"]
    for m, dims in outcome_rates(outcomes).items():
        for d, r in dims.items():
            lo, hi = r.interval
            lines.append(f"| {m} | {d} | {_shares(r)} | {r.n} | {r.win_rate:.1%} [{lo:.1%}, {hi:.1%}] |")
    return lines


def primary_judge(settings: dict[str, Any]) -> str | None:
    """The judge whose answers the method tables count: the first of --judges (None: the one judge)."""
    judges = settings.get("judges")
    return judges[0]["name"] if judges else None


def judges_in(outcomes: Rows) -> list[str]:
    return list(dict.fromkeys(o["judge"] for o in outcomes))


def outcome_key(o: dict[str, Any]) -> tuple:
    """One question asked: the pair, the repeat and the order; every judge of a bench answers each."""
    return (o["set_id"], o["seed"], o["method"], o["baseline"], o["repeat"], o["first"])


def pair_key(o: dict[str, Any]) -> tuple:
    return (o["set_id"], o["seed"], o["method"], o["baseline"])


def judge_agreement(outcomes: Rows) -> dict[tuple[str, str], dict[str, agreements.Agreement]]:
    """(judge A, judge B) -> dimension -> their agreement over the questions both answered."""
    names = judges_in(outcomes)
    by = {n: [o for o in outcomes if o["judge"] == n] for n in names}
    return {(a, b): agreements.compare(by[a], by[b], outcome_key, pair_key, judge.DIMENSIONS)
            for i, a in enumerate(names) for b in names[i + 1:]}


def _interval(x: tuple[float, float] | None, percent: bool) -> str:
    if x is None:
        return "–"
    return f"[{x[0]:.1%}, {x[1]:.1%}]" if percent else f"[{x[0]:.2f}, {x[1]:.2f}]"


def agreement_cells(g: agreements.Agreement) -> str:
    """| agreement [interval] | kappa [interval] | outcomes (pairs) |"""
    raw = "–" if g.agreement is None else f"{g.agreement:.1%}"
    k = "n/a" if g.kappa is None else f"{g.kappa:.2f}"
    return (f"{raw} {_interval(g.agreement_interval, True)} | {k} {_interval(g.kappa_interval, False)} | "
            f"{g.n} ({g.pairs})")


def _judges_lines(outcomes: Rows, baseline: str) -> list[str]:
    lines = ["## Judges", "", "### Each judge's verdicts", "",
             f"| Judge | Method vs {baseline} | Dimension | Win | Tie | Loss | Outcomes | Win rate (95% Wilson) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in judges_in(outcomes):
        for row in _outcome_lines([o for o in outcomes if o["judge"] == name and o["baseline"] == baseline],
                                  baseline)[2:]:
            lines.append(f"| {name} {row}")
    lines += ["", "### Agreement between judges", "",
              "| Judge A | Judge B | Dimension | Raw agreement [95% CI] | Cohen's kappa [95% CI] | Outcomes (pairs) |",
              "|---|---|---|---|---|---|"]
    for (a, b), dims in judge_agreement(outcomes).items():
        for d, g in dims.items():
            lines.append(f"| {a} | {b} | {d} | {agreement_cells(g)} |")
    lines += ["", "Both judges answered the same questions (pair, order, repeat, with the same seeds); raw "
              "agreement is the share of those answers with the same verdict (win, tie or loss), Cohen's kappa the "
              "agreement beyond what two judges with those verdict frequencies reach by chance (1 perfect, 0 "
              "chance, below 0 worse than chance; n/a where both always gave one verdict). Intervals: 95% "
              f"percentile bootstrap over whole pairs ({agreements.RESAMPLES} resamples), since the answers "
              "about one pair are not independent."]
    return lines


def _bias_lines(outcomes: Rows) -> list[str]:
    lines = ["| Judge model | Dimension | First-shown wins | Second-shown wins | Ties | Order agreement |",
             "|---|---|---|---|---|---|"]
    for model, dims in position_bias(outcomes).items():
        for d, (first, second, ties, agree, orders) in dims.items():
            n = first + second + ties
            lines.append(f"| {model} | {d} | {first / n:.1%} ({first}) | {second / n:.1%} ({second}) | "
                         f"{ties / n:.1%} ({ties}) | {agree / orders if orders else 0:.1%} ({agree} of {orders}) |")
    return lines


def _judge_lines(pairs: Rows, baseline: str) -> list[str]:
    lines = [f"| Method vs {baseline} | Dimension | Win | Tie | Loss | Pairs | Mean score (method / {baseline}) |",
             "|---|---|---|---|---|---|---|"]
    for m, dims in winrates(pairs).items():
        for d, c in dims.items():
            lines.append(f"| {m} | {d} | {_shares(c)} | {c.pairs} | {c.mean_a:.2f} / {c.mean_b:.2f} |")
    return lines


def _shares(r: judge.Rate) -> str:
    """Win | Tie | Loss cells: each share of the count, and the count."""
    return " | ".join(f"{r.share(key):.1%} ({getattr(r, key)})" for key, _, _ in OUTCOMES)


# ------------------------------------------------------------------ plots

def _winrate_figure(groups: list[tuple[str, dict[str, dict[str, judge.Counts]]]], baseline: str):
    """Stacked horizontal bars, one per method vs the baseline; a row of panels per group."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    # Every panel lists the same methods in the same places, so panels compare at a glance.
    methods = methods_in([{"method": m} for _, g in groups for m in g])
    fig = Figure(figsize=(5 * len(judge.DIMENSIONS), 0.6 + (0.5 + 0.45 * len(methods)) * len(groups)),
                 layout="constrained")
    axes = fig.subplots(len(groups), len(judge.DIMENSIONS), squeeze=False)
    for row, (title, counts) in enumerate(groups):
        for col, d in enumerate(judge.DIMENSIONS):
            ax = axes[row][col]
            left = [0.0] * len(methods)
            for key, label, color in OUTCOMES:
                share = [100 * getattr(counts[m][d], key) / counts[m][d].pairs if m in counts else 0.0 for m in methods]
                bars = ax.barh([f"{m} vs {baseline}" for m in methods], share, left=left, color=color, label=label)
                ax.bar_label(bars, labels=[f"{s:.0f}%" if s >= 8 else "" for s in share], label_type="center", fontsize=8)
                left = [a + b for a, b in zip(left, share)]
            ax.set_xlim(0, 100)
            ax.invert_yaxis()
            ax.set_title(f"{d}" + (f" ({title})" if title else ""), fontsize=10)
            ax.set_xlabel("% of pairs")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=len(OUTCOMES), fontsize=8)
    return fig


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
