"""report.html for a run folder: one self-contained page, images embedded, nothing fetched.

    DIR/report.html          thumbnails embedded as data URLs; each links to its full-size PNG
                             in the run folder (a relative link, never a URL)
    DIR/rounds/round-N.png   round N's candidates side by side, captioned (runs/sheet.py)

The final pick shows the A1111 infotext stored in final.png (its `parameters` chunk), with a
button that copies it, so the result can be pasted into A1111's prompt box.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image

from localora import events
from localora.files import atomic_write
from localora.runs.folder import RunFolder
from localora.runs.sheet import write_sheet

SHEETS = "rounds"  # contact sheets, one per round

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd}
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


def _figure(path: Path | None, caption: str, cls: str = "", link: str | None = None) -> str:
    """A thumbnail; `link` (a path relative to report.html) opens the full-size image."""
    if path and path.is_file():
        img = f'<img src="{_thumb(path)}" alt="{html.escape(caption)}">'
        if link:
            img = f'<a href="{html.escape(link)}">{img}</a>'
    else:
        img = "<p>(image missing)</p>"
    return f'<figure class="{cls}">{img}<figcaption>{html.escape(caption)}</figcaption></figure>'


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


def _svg(fig) -> str:
    """A matplotlib figure as inline SVG, without a date, so a page is the same on every build."""
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _plot(rounds: list[dict[str, float]]) -> str:
    """Weights over iterations as an inline SVG (matplotlib, no external resources)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.8), dpi=100)
    ax = fig.subplots()
    names = list(rounds[0]) if rounds else []
    xs = list(range(len(rounds)))
    for name in names:
        ax.plot(xs, [r[name] for r in rounds], marker="o", label=name)
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


def build(run: RunFolder) -> str:
    log = run.events()
    by_id = {e["id"]: e for e in log if "id" in e}
    settings = run.settings["config"]
    final = json.loads((run.path / "final.json").read_text()) if (run.path / "final.json").is_file() else None
    img = lambda rel: run.path / rel  # noqa: E731

    def figure(rel: str, caption: str, cls: str = "") -> str:
        return _figure(img(rel), caption, cls, link=rel)
    out: list[str] = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>localora run</title>"
                      f"<style>{CSS}</style></head><body>"]
    out.append(f"<h1>localora compose</h1><p><b>Prompt:</b> {html.escape(settings.get('prompt', ''))}</p>")
    out.append("<table><tr><th>LoRA</th><th>category</th><th>trigger words</th><th>file</th></tr>")
    for lo in settings.get("loras", []):
        out.append(f"<tr><td>{html.escape(lo['name'])}</td><td>{html.escape(str(lo['category']))}</td>"
                   f"<td>{html.escape(lo['triggers'])}</td><td>{html.escape(Path(lo['path']).name)}</td></tr>")
    out.append("</table>")
    out.append(f"<p>{settings.get('iterations')} iterations x {settings.get('candidates')} candidates, bounds "
               f"{settings.get('bounds')}, seed {settings.get('sampling', settings).get('seed')}, method {settings.get('method')}, profile "
               f"{html.escape(str(run.settings.get('profile', '')))}</p>")

    if final:
        out.append("<h2>Final pick</h2><div class=row>")
        out.append(figure(final["image"], f"round {final['iteration']}: {_weights(final['weights'])}", "final"))
        out.append("</div>")
        infotext = _infotext(run.path / "final.png")
        if infotext:
            out.append("<p>For Automatic1111 / Forge (paste into the prompt box, then the arrow under Generate), "
                       f"or drop final.png on ComfyUI:</p><pre>{html.escape(infotext)}</pre>{COPY_BUTTON}")

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
        names = [lo["name"] for lo in settings.get("loras", [])]
        for s in shots["kept"]:
            inside = img(s["image"]).is_file()  # else in the few-shot library, outside the run folder
            path = img(s["image"]) if inside else Path(shots.get("library", "")) / s["image"]
            out.append(_figure(path, f"{_weights(dict(zip(names, s['weights'])))}; CLIP-T {s['prompt_score']:.3f}",
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
            out.append(figure(e["image"], f"{j}: {_weights(e['weights'])}{score}{origin}"))
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
            out.append("<div class=row>" + figure(refined["image"], f"refined: {_weights(refined['weights'])}") + "</div>")
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
