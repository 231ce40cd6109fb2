"""report.html for a run folder: one self-contained page, images embedded, nothing fetched.

    DIR/report.html          thumbnails embedded as data URLs; each links to its full-size PNG
                             in the run folder (a relative link, never a URL)
    DIR/rounds/round-N.png   round N's candidates side by side, captioned (runs/sheet.py)

    (tiny profile)   a note first: random weights, noise images, random text, how to run a real one

    Final pick       the image, its scores (CLIP-T, CLIP-I, objective), why it was picked (the
                     VLM's reason, the judge's points or the best objective), its A1111 infotext
    Models           what each model was (run.json's profile, the load event's detail), its size,
                     its first load and its moves, in seconds
    Time per stage   renders, VLM calls and model loads/moves of each LoRA alone, few-shot,
                     each iteration and the final pick, in seconds (from events.jsonl)
    Iteration N      candidates with scores and origin, feedback, refine, the refined image
                     with its scores (the run's final/scores step)
    Weights plot     one line per LoRA, each with its own marker and dash, side by side where
                     values are equal (a small x offset; the weights drawn are exact)

The final pick shows the A1111 infotext stored in final.png (its `parameters` chunk), with a
button that copies it, so the result can be pasted into A1111's prompt box.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from localora import events, profiles, tiny
from localora.files import atomic_write
from localora.runs.folder import RunFolder
from localora.runs.sheet import write_sheet

SHEETS = "rounds"  # contact sheets, one per round

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}.note{background:#fff4d6;border:1px solid #e0b84c;padding:.6em 1em;border-radius:4px}table.blocks{font-size:12px}table.blocks td,table.blocks th{padding:0 4px}h2{margin-top:2em;border-bottom:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;width:180px}figure img{width:180px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:12px;color:#444;word-break:break-word}
.final img{width:320px;border:3px solid #2a7}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:.6em;border-radius:4px}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}
"""


def _thumb(path: Path, size: int = 256) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(path: Path | None, caption: str, cls: str = "", link: str | None = None, extra: str = "") -> str:
    """A thumbnail; `link` (a path relative to report.html) opens the full-size image; `extra` is
    HTML under the caption (a per-block weight table)."""
    if path and path.is_file():
        img = f'<img src="{_thumb(path)}" alt="{html.escape(caption)}">'
        if link:
            img = f'<a href="{html.escape(link)}">{img}</a>'
    else:
        img = "<p>(image missing)</p>"
    return f'<figure class="{cls}">{img}<figcaption>{html.escape(caption)}</figcaption>{extra}</figure>'


def _infotext(path: Path) -> str | None:
    """The A1111 line stored in a PNG (its `parameters` chunk, without the localora entry), if any."""
    from localora.export import a1111

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except OSError:
        return None
    return a1111.for_people(text) if isinstance(text, str) and text.strip() else None


# One inline handler, no external script: copies the <pre> before the button.
COPY_BUTTON = ('<button type=button onclick="navigator.clipboard.writeText('
               'this.previousElementSibling.textContent)">Copy</button>')


def _weights(w: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in w.items())


def block_table(w: dict[str, float], names: list[str], groups: list[str]) -> str:
    """A compose --blocks vector (keys NAME.GROUP) as a small table: a row per LoRA, a column per group."""
    head = "".join(f"<th>{html.escape(g)}</th>" for g in groups)
    rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(
        f"<td>{w[f'{n}.{g}']:.2f}</td>" if f"{n}.{g}" in w else "<td>-</td>" for g in groups) + "</tr>"
        for n in names)
    return f"<table class=blocks><tr><th>LoRA</th>{head}</tr>{rows}</table>"


def _svg(fig) -> str:
    """A matplotlib figure as inline SVG, without a date, so a page is the same on every build."""
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", ":", "-.")
DODGE = 0.08  # x offset between neighbouring LoRAs' lines, in iterations


@dataclass(frozen=True)
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    marker: str
    dash: str


def weight_series(rounds: list[dict[str, float]]) -> list[Series]:
    """One line per LoRA. Two LoRAs often hold the same weight (the start, 1.00 each): each line
    gets its own marker and dash, and is drawn a little beside the others along x (iterations are
    whole numbers, so the offset misreads nothing), never moved along y: the weights stay exact."""
    names = list(rounds[0]) if rounds else []
    middle = (len(names) - 1) / 2
    return [Series(name, [x + (k - middle) * DODGE for x in range(len(rounds))], [r[name] for r in rounds],
                   MARKERS[k % len(MARKERS)], DASHES[k % len(DASHES)])
            for k, name in enumerate(names)]


def _plot(rounds: list[dict[str, float]]) -> str:
    """Weights over iterations as an inline SVG (matplotlib, no external resources)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.8), dpi=100)
    ax = fig.subplots()
    xs = list(range(len(rounds)))
    for line in weight_series(rounds):
        ax.plot(line.xs, line.ys, marker=line.marker, linestyle=line.dash, label=line.name)
    ax.set_xticks(xs, ["start"] + [str(i) for i in xs[1:]])
    ax.set_xlabel("iteration")
    ax.set_ylabel("weight")
    ax.legend(fontsize=8, loc="best")
    return _svg(fig)


ORIGINS = {"vlm": "proposed by the VLM", "vlm-again": "proposed by the VLM, asked again", "filled": "filled",
           "random": "random", "cmaes": "CMA-ES"}


def _objective_plot(states: list[dict]) -> str:
    """Best objective over renders spent, as an inline SVG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.8), dpi=100)
    ax = fig.subplots()
    ax.plot([s["spent"] for s in states], [s["best"] for s in states], marker="o")
    ax.set_xlabel("renders spent")
    ax.set_ylabel("best objective")
    return _svg(fig)


# ------------------------------------------------------------------ scores, the pick's reason

def scores_by_image(log: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each scored image's CLIP-T, CLIP-I and objective, as the run's scores events hold them: the
    candidates of each round, and the refined images (the vlm loop's final/scores step)."""
    out: dict[str, dict[str, float]] = {}
    for e in log:
        if e.get("type") != events.SCORES:
            continue
        for i, image in enumerate(e["images"]):
            row = {"CLIP-T": e["clip_t"][i]}
            row.update({label: e[key][i] for key, label in (("clip_i", "CLIP-I"), ("objective", "objective"))
                        if key in e})
            out[image] = {**out.get(image, {}), **row}
    return out


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def why_picked(final: dict[str, Any], by_id: dict[str, dict[str, Any]], log: list[dict[str, Any]]) -> str:
    """Why the final image is the one: the VLM's reason, the judge's points, or the best objective."""
    select = by_id.get(events.SELECT)
    if select is not None:
        value = select["value"]
        if isinstance(value, dict) and value.get("reason"):
            return f"The VLM picked it among the refined images: \u201c{value['reason']}\u201d"
        return ("The VLM picked it among the refined images (this run's answer has no reason: it was made by a "
                "localora that asked for the number only).")
    if final.get("picked_by") == "final judge" or any(e.get("step") == "final-judge" for e in log):
        points = f" (points per contender, best-ranked first: {final['judge_points']})" if "judge_points" in final else ""
        return f"The pairwise judge (--final-judge) picked it among the top 3 by the objective{points}."
    if final.get("picked_by") == "objective":
        return f"The best objective (CLIP-T + mean CLIP-I) of the {final.get('renders', '?')} renders searched."
    return "The only refined image: one iteration, nothing to choose."


# ------------------------------------------------------------------ models and time per stage

COMPONENTS = ("diffusion", "vlm", "clip")  # the device manager's names, as run.json's profile_spec keys them


def _models(run: RunFolder, log: list[dict[str, Any]]) -> str:
    """What each model was, from run.json's profile and the first load event's detail, with its
    size and its load and move seconds (events.jsonl)."""
    spec = run.settings.get("profile_spec") or {}
    loads: dict[str, dict[str, Any]] = {}
    moves: dict[str, list[float]] = {}
    for e in log:
        if e.get("type") == events.MODEL:
            if e["action"] == "load" and e["model"] not in loads:
                loads[e["model"]] = e
            elif e["action"] != "compile":  # --compile's warm-up is no move
                moves.setdefault(e["model"], []).append(e.get("seconds", 0.0))
    rows = ["<table><tr><th>model</th><th>name</th><th>source</th><th>loaded as</th><th>size</th>"
            "<th>first load</th><th>moves, offloads, reloads</th></tr>"]
    for comp in dict.fromkeys([*COMPONENTS, *loads]):
        s, load, moved = spec.get(comp, {}), loads.get(comp), moves.get(comp, [])
        size = f"{load['bytes'] / 2**20:.1f} MiB" if load and load.get("bytes") else "-"
        first = f"{load['seconds']:.2f} s" if load else "not loaded"
        rows.append(f"<tr><td>{comp}</td><td>{html.escape(str(s.get('name', '-')))}</td>"
                    f"<td>{html.escape(str(s.get('source', '-')))}</td>"
                    f"<td>{html.escape(load.get('detail', '') if load else '')}</td><td>{size}</td><td>{first}</td>"
                    f"<td>{len(moved)}, {sum(moved):.2f} s</td></tr>")
    return "\n".join(rows) + "</table>"


def _stage(step_id: str) -> str | None:
    kind = events.parse(step_id)
    if kind.kind == "reference":
        return "each LoRA alone"
    if kind.kind in ("grid", "fewshot"):
        return "few-shot"
    if kind.kind == "start":
        return "start weights"
    if kind.kind in ("select", "final-judge", "final-scores"):
        return "final pick"
    return f"iteration {kind.round}" if kind.round is not None else None


@dataclass
class StageTime:
    renders: int = 0
    cached: int = 0
    render_s: float = 0.0  # denoising, the model time inside a render taken out
    calls: int = 0
    vlm_s: float = 0.0
    model_s: float = 0.0  # loads and moves this stage waited for

    @property
    def total(self) -> float:
        return self.render_s + self.vlm_s + self.model_s

    def add(self, other: StageTime) -> StageTime:
        return StageTime(self.renders + other.renders, self.cached + other.cached, self.render_s + other.render_s,
                         self.calls + other.calls, self.vlm_s + other.vlm_s, self.model_s + other.model_s)


def stage_times(log: list[dict[str, Any]]) -> dict[str, StageTime]:
    """Seconds per stage, in the order the stages ran. A model event is the wait of the next step.
    A render's logged seconds include acquiring the pipeline (loading or moving it, and evicting
    others) while a VLM call's start after its model is resident: the model time just before a
    render is taken out of it (a batch shares it over its images), so nothing counts twice."""
    stages: dict[str, StageTime] = {}
    waiting = inside = 0.0  # model seconds not yet given to a stage; of those, not yet taken from a render
    for e in log:
        if e.get("type") == events.MODEL:
            waiting += e.get("seconds", 0.0)
            inside += e.get("seconds", 0.0)
            continue
        try:
            name = _stage(e["id"]) if "id" in e else None
        except ValueError:
            name = None
        if name is None:
            continue
        st = stages.setdefault(name, StageTime())
        st.model_s, waiting = st.model_s + waiting, 0.0
        if e["type"] == events.RENDER and e.get("cached"):
            st.cached += 1
        elif e["type"] == events.RENDER:
            taken = min(inside, e.get("seconds", 0.0))
            inside -= taken
            st.renders += 1
            st.render_s += e.get("seconds", 0.0) - taken
        else:
            inside = 0.0
            if e["type"] == events.VLM:
                st.calls += 1
                st.vlm_s += e.get("seconds", 0.0)
    if waiting:
        stages.setdefault("after the last step", StageTime()).model_s += waiting
    return stages


def _times(log: list[dict[str, Any]]) -> str:
    stages = stage_times(log)
    rows = ["<table><tr><th>stage</th><th>renders (cached)</th><th>denoising</th><th>VLM calls</th>"
            "<th>VLM</th><th>model loads, moves</th><th>total</th></tr>"]
    everything = StageTime()
    for st in stages.values():
        everything = everything.add(st)
    for name, st in [*stages.items(), ("all", everything)]:
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{st.renders} ({st.cached})</td><td>{st.render_s:.2f} s</td>"
                    f"<td>{st.calls}</td><td>{st.vlm_s:.2f} s</td><td>{st.model_s:.2f} s</td>"
                    f"<td>{st.total:.2f} s</td></tr>")
    return ("\n".join(rows) + "</table><p>Seconds as events.jsonl logs them (a resumed run's log holds every "
            "session's steps and loads); CLIP scoring and writing files are not timed.</p>")


def build(run: RunFolder) -> str:
    log = run.events()
    by_id = {e["id"]: e for e in log if "id" in e}
    settings = run.settings["config"]
    final = json.loads((run.path / "final.json").read_text()) if (run.path / "final.json").is_file() else None
    img = lambda rel: run.path / rel  # noqa: E731
    groups = list(settings.get("blocks") or ())  # compose --blocks: weights keyed NAME.GROUP
    lora_names = [lo["name"] for lo in settings.get("loras", [])]

    def shown(w: dict[str, float]) -> str:
        """A vector in a caption; with --blocks, the table under the caption shows it instead."""
        return "weights per block below" if groups else _weights(w)

    def figure(rel: str, caption: str, cls: str = "", weights: dict[str, float] | None = None) -> str:
        extra = block_table(weights, lora_names, groups) if groups and weights is not None else ""
        return _figure(img(rel), caption, cls, link=rel, extra=extra)
    out: list[str] = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>localora run</title>"
                      f"<style>{CSS}</style></head><body>"]
    out.append("<h1>localora compose</h1>")
    source = ((run.settings.get("profile_spec") or {}).get("diffusion") or {}).get("source", "")
    if profiles.is_tiny(source):  # its noise images and random text must not look like a fault
        out.append(f"<p class=note>{html.escape(tiny.NOTE)}</p>")
    out.append(f"<p><b>Prompt:</b> {html.escape(settings.get('prompt', ''))}</p>")
    out.append("<table><tr><th>LoRA</th><th>category</th><th>trigger words</th><th>file</th></tr>")
    for lo in settings.get("loras", []):
        out.append(f"<tr><td>{html.escape(lo['name'])}</td><td>{html.escape(str(lo['category']))}</td>"
                   f"<td>{html.escape(lo['triggers'])}</td><td>{html.escape(Path(lo['path']).name)}</td></tr>")
    out.append("</table>")
    out.append(f"<p>{settings.get('iterations')} iterations x {settings.get('candidates')} candidates, bounds "
               f"{settings.get('bounds')}, seed {settings.get('sampling', settings).get('seed')}, method {settings.get('method')}, profile "
               f"{html.escape(str(run.settings.get('profile', '')))}</p>")

    image_scores = scores_by_image(log)
    if final:
        out.append("<h2>Final pick</h2><div class=row>")
        out.append(figure(final["image"], f"round {final['iteration']}: {shown(final['weights'])}", "final",
                          final["weights"]))
        out.append("</div>")
        score = image_scores.get(final["image"]) or ({"objective": final["objective"]} if "objective" in final else {})
        out.append(f"<p><b>Scores:</b> {_scores_text(score) if score else 'not scored'}</p>"
                   f"<p class=why><b>Why this one:</b> {html.escape(why_picked(final, by_id, log))}</p>")
        infotext = _infotext(run.path / "final.png")
        if infotext:
            out.append("<p>For Automatic1111 / Forge (paste into the prompt box, then the arrow under Generate), "
                       f"or drop final.png on ComfyUI:</p><pre>{html.escape(infotext)}</pre>{COPY_BUTTON}")

    out.append("<h2>Models</h2>" + _models(run, log))
    out.append("<h2>Time per stage</h2>" + _times(log))

    refs = [e for e in log if e.get("type") == events.RENDER and e.get("role") == "reference"]
    out.append("<h2>Each LoRA alone</h2><div class=row>")
    for e, lo in zip(refs, settings.get("loras", [])):
        out.append(figure(e["image"], lo["name"]))
    out.append("</div>")

    shots = by_id.get(events.FEWSHOT_STEP)
    out.append("<h2>Few-shot examples</h2>")
    if shots is None:
        out.append("<p>Few-shot selection was off for this run.</p>")
    else:
        how = "reused from the library" if shots.get("reused") else f"{len(shots['scored'])} grid images scored"
        out.append(f"<p>{len(shots['kept'])} kept ({how}; threshold {shots['threshold']}).</p><div class=row>")
        dims = [f"{n}.{g}" for n in lora_names for g in groups] if groups else lora_names
        for s in shots["kept"]:
            inside = img(s["image"]).is_file()  # else in the few-shot library, outside the run folder
            path = img(s["image"]) if inside else Path(shots.get("library", "")) / s["image"]
            w = dict(zip(dims, s["weights"]))
            out.append(_figure(path, f"{shown(w)}; CLIP-T {s['prompt_score']:.3f}",
                               extra=block_table(w, lora_names, groups) if groups else "",
                               link=s["image"] if inside else None))
        out.append("</div>")

    rounds = []
    start = by_id.get(events.START_RENDER)
    if start:
        rounds.append(start["weights"])
    r = 1
    while events.round_step(r, "generate") in by_id or events.candidate(r, 1) in by_id:
        out.append(f"<h2>Iteration {r}</h2><h3>Candidates</h3><div class=row>")
        scored = by_id.get(events.round_step(r, "scores"), {})
        scores = scored.get("objective") or scored.get("clip_t", [])
        label = "objective" if "objective" in scored else "CLIP-T"
        j, cells = 1, []
        while events.candidate(r, j) in by_id:
            e = by_id[events.candidate(r, j)]
            score = f"; {label} {scores[j - 1]:.3f}" if j - 1 < len(scores) else ""
            origin = f" ({ORIGINS.get(e['origin'], e['origin'])})" if "origin" in e else ""
            out.append(figure(e["image"], f"{j}: {shown(e['weights'])}{score}{origin}", weights=e["weights"]))
            cells.append((img(e["image"]), "\n".join(
                [f"{j}: " + " ".join(f"{k}={v:.2f}" for k, v in e["weights"].items())]
                + ([f"{label} {scores[j - 1]:.3f}"] if j - 1 < len(scores) else [])
                + ([ORIGINS.get(e["origin"], e["origin"])] if "origin" in e else []))))
            j += 1
        out.append("</div>")
        if cells:
            rel = f"{SHEETS}/round-{r}.png"
            write_sheet(cells, run.path / rel)
            out.append(f'<p><a href="{rel}">All candidates of iteration {r} on one sheet</a></p>')
        fb = by_id.get(events.round_step(r, "feedback"))
        if fb:
            out.append(f"<h3>Feedback</h3><pre>{html.escape(fb['value']['feedback'])}</pre>")
        ref = by_id.get(events.round_step(r, "refine"))
        if ref:
            out.append(f"<h3>Refine</h3><pre>{html.escape(ref['value']['feedback'])}</pre>")
        refined = by_id.get(events.round_step(r, "refined"))
        if refined:
            score = image_scores.get(refined["image"])
            caption = f"refined: {shown(refined['weights'])}" + (f"; {_scores_text(score)}" if score else "")
            out.append("<div class=row>" + figure(refined["image"], caption, weights=refined["weights"]) + "</div>")
            rounds.append(refined["weights"])
        r += 1
    if len(rounds) > 1:
        out.append("<h2>Weights over iterations</h2>" + _plot(rounds))
    states = [e for e in log if e.get("type") == events.STATE]
    if states:
        out.append(f"<h2>Best objective over renders ({html.escape(states[0]['strategy'])})</h2>"
                   f"<p>objective = CLIP-T to the prompt + mean CLIP-I to each LoRA alone</p>" + _objective_plot(states))
    out.append("</body></html>")
    return "\n".join(out)


def write(run: RunFolder) -> Path:
    path = run.path / "report.html"
    page = build(run)
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path
