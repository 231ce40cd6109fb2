"""Many compose runs from one FILE.jsonl, in one process: `localora compose --prompts FILE.jsonl`.

    FILE.jsonl        one JSON object per non-blank line:
                      {"prompt": "...", "loras": ["NAME_OR_PATH[:START]", ...], "name": "folder", "seed": 7}
    DIR/batch.json    the source file; per line: its number, folder, status (done/failed/pending),
                      final weights, image; rewritten (atomically) after each line
    DIR/<name>/       line N's compose run folder; DIR/NNN-<slug of its prompt>/ without a name

load() parses, resolves and checks every line before anything renders, so a typo on line 40 is
one error line naming FILE:40, not a failure an hour in. run() is the batch in one process: a
finished line is skipped (never recomputed), an unfinished one resumed, a missing one started,
and the models load once for all of them. Rerunning the same command (same FILE, same --out)
continues a stopped batch. run_item() does one line from nothing but an Item and its folder, so
an `execute` hook can run lines elsewhere (another process, a cluster).

Torch-free at import: the models load on the first run_item().
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localora.errors import LocaloraError, MissingError, RuntimeFailure
from localora.files import slug, write_json
from localora.runs.folder import RunFolder, result

if TYPE_CHECKING:
    from localora.search.config import ComposeConfig

FORMAT = "localora-batch/1"
KEYS = ("prompt", "loras", "name", "seed")
EXAMPLE = '{"prompt": "a girl in a garden", "loras": ["character", "style:0.8"], "name": "garden", "seed": 7}'


@dataclass(frozen=True)
class Item:
    """One line of FILE.jsonl, resolved and checked; picklable, so it can be sent to a worker."""

    line: int  # 1-based line number in FILE
    name: str  # folder name under DIR
    cfg: ComposeConfig
    profile: str  # profile name (load_profile(profile) gives the Profile)


# ------------------------------------------------------------------ reading FILE.jsonl

def load(path: Path, make_config: Callable[[dict], tuple[ComposeConfig, str]]) -> list[Item]:
    """Every line of `path` as an Item, or one error naming FILE:LINE. `make_config` turns one
    line's {"prompt", "loras", "seed"} (seed None: the command's) into (cfg, profile name), as the
    command's options say; its errors get the line's place in front."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocaloraError(f"{path}: cannot read the prompts file ({getattr(e, 'strerror', None) or e})") from None
    items: list[Item] = []
    taken: dict[str, int] = {}  # folder name (lower case: one folder on a case-blind disk) -> line
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        entry = _parse(raw, where)
        try:
            cfg, profile = make_config({"prompt": entry["prompt"], "loras": entry.get("loras", []),
                                        "seed": entry.get("seed")})
            cfg.check()
        except LocaloraError as e:
            raise type(e)(f"{where}: {e}") from None
        name = entry.get("name") or f"{number:03d}-{slug(cfg.prompt)}"
        if name.lower() in taken:
            raise LocaloraError(f"{where}: folder name '{name}' is line {taken[name.lower()]}'s too; "
                                f"give each line its own \"name\"")
        taken[name.lower()] = number
        items.append(Item(number, name, cfg, profile))
    if not items:
        raise LocaloraError(f"{path}: no prompts in it; write one JSON object per line, e.g. {EXAMPLE}")
    return items


def _parse(raw: str, where: str) -> dict[str, Any]:
    """One line's object, its keys and their types checked."""
    try:
        entry = json.loads(raw)
    except ValueError as e:
        why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise LocaloraError(f"{where}: not JSON ({why}); each line is one object, e.g. {EXAMPLE}") from None
    if not isinstance(entry, dict):
        raise LocaloraError(f"{where}: not a JSON object; each line is one, e.g. {EXAMPLE}")
    unknown = [k for k in entry if k not in KEYS]
    if unknown:
        raise LocaloraError(f"{where}: unknown key {', '.join(map(repr, unknown))}; a line takes "
                            f"{', '.join(KEYS)} (every other setting comes from the command line)")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        what = "has no \"prompt\"" if prompt is None else "\"prompt\" must be a non-empty string"
        raise LocaloraError(f"{where}: {what}; e.g. {EXAMPLE}")
    loras = entry.get("loras", [])
    if not isinstance(loras, list) or not all(isinstance(x, str) for x in loras):
        raise LocaloraError(f"{where}: \"loras\" must be a list of strings NAME_OR_PATH[:START]")
    name = entry.get("name")
    if name is not None and not _folder_name(name):
        raise LocaloraError(f"{where}: \"name\" {json.dumps(name)} is not a folder name; use letters, digits, "
                            f"'-', '_' and '.', not starting with '.'")
    seed = entry.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise LocaloraError(f"{where}: \"seed\" must be a whole number")
    return entry


def _folder_name(name: Any) -> bool:
    # One folder directly under DIR: no separators, no dot-names, not the batch's own file.
    return (isinstance(name, str) and bool(name) and not name.startswith(".") and name != "batch.json"
            and all(c.isalnum() or c in "-_." for c in name))


# ------------------------------------------------------------------ one line

def state(item: Item, out: Path) -> str:
    """"done" (final.json is there), "partial" (a run was started in its folder) or "new"."""
    folder = Path(out) / item.name
    if (folder / "final.json").is_file():
        return "done"
    return "partial" if (folder / "run.json").is_file() else "new"


def check_folder(item: Item, folder: Path) -> None:
    """One error when `folder` holds a run of other settings than the line's: a finished one is
    never recomputed, and an unfinished one must not go on with the old prompt."""
    try:
        settings = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        stored = {**settings["config"], "profile": settings["profile"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise LocaloraError(f"{folder}: not a compose run folder (no readable run.json); "
                            f"write the batch to a new --out") from None
    wanted = _by_content(json.loads(json.dumps({**item.cfg.settings(), "profile": item.profile}, default=str)))
    stored = _by_content(stored)
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if differ:
        raise LocaloraError(f"{folder}: line {item.line} now asks for other settings ({', '.join(differ)}) than "
                            f"the run in this folder; put the line back as it was, or write the batch to a new --out")


def _by_content(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with each LoRA known by name and sha256, not by where its file lies: a run made on
    another node of a cluster (its own copy of the file) is the same line's run."""
    loras = settings.get("loras")
    if isinstance(loras, list):
        settings = {**settings, "loras": [{k: v for k, v in lo.items() if k not in ("path", "references")}
                                          if isinstance(lo, dict) else lo for lo in loras]}
    return settings


def run_item(item: Item, folder: Path, ui: Any, *, batch: int = 0, profile: Any = None,
             compiled: bool = False) -> dict[str, Any]:
    """Start (or resume) the compose of `item` in `folder`; returns folder.result's dict, as
    `localora compose --json` prints it (cli/compose.summary). Writes only inside `folder`. The models stay loaded in
    this process for its next item (release() lets them go); `batch` is --batch, `compiled` --compile. `profile`: the
    Profile to start the run with instead of item.profile's entry in this machine's models.toml
    (a cluster worker runs the driver's)."""
    from localora.profiles import load_profile
    from localora.runs import session

    folder = Path(folder)
    if (folder / "final.json").is_file():
        check_folder(item, folder)
        return finished(folder)
    if (folder / "run.json").is_file():
        check_folder(item, folder)
        run, cfg, profile = session.reopen(folder, list(item.cfg.loras))
    else:
        cfg, profile = item.cfg, profile or load_profile(item.profile)
        run = session.start(cfg, profile, folder)
    try:
        parts = _models(profile, batch, compiled)
    except BaseException:
        run.close()
        raise
    final = session.compose(cfg, profile, run, ui, batch=batch, parts=parts)
    return result(folder, final.weights, final.iteration, _renders(folder))


def finished(folder: Path) -> dict[str, Any]:
    """A finished run folder's summary, from its files (nothing is loaded)."""
    final = json.loads((folder / "final.json").read_text(encoding="utf-8"))
    return result(folder, final["weights"], final["iteration"], _renders(folder))


def _renders(folder: Path) -> int | None:
    """The renders the run spent, as its done event counted them."""
    done = [e for e in RunFolder.open(folder, write=False).events() if e["type"] == "done"]
    return done[-1].get("renders") if done else None


# The models this process loaded, kept for its next item: one profile's at a time (a batch has one).
_held: dict[str, Any] = {}


def _models(profile: Any, batch: int, compiled: bool = False) -> Any:
    from localora.runs import session

    key = json.dumps([asdict(profile), batch, compiled], sort_keys=True, default=str)
    if key not in _held:
        _held.clear()
        _held[key] = session.components(profile, batch=batch, compiled=compiled)
    return _held[key]


def release() -> None:
    """Let go of the models run_item() kept loaded."""
    _held.clear()


# ------------------------------------------------------------------ the batch

Execute = Callable[[list[tuple[Item, Path]]], Iterable[tuple[Item, Any]]]


def run(items: list[Item], out: Path, ui: Any, execute: Execute | None = None, *,
        source: Path | None = None, batch: int = 0, profile: Any = None, compiled: bool = False) -> list[dict[str, Any]]:
    """The batch: skip the finished lines, run the rest in order, rewrite DIR/batch.json after
    each; returns its per-line records. Every folder already there is checked first, so a changed
    line is one error before anything renders.

    `execute(todo)` takes the (item, folder) pairs to do and yields (item, summary dict) as each
    finishes, or (item, RuntimeFailure) for a line whose work failed; the default runs them one by
    one in this process, sharing one set of models, with `profile` (the command's: --vlm) when
    given. A line's failure does not stop the others."""
    out = Path(out)
    states = {item.line: state(item, out) for item in items}
    for item in items:
        if states[item.line] != "new":
            check_folder(item, out / item.name)
    records = {item.line: _record(item, out, finished(out / item.name) if states[item.line] == "done" else None)
               for item in items}
    _write(out, source, records)
    todo = [(item, out / item.name) for item in items if states[item.line] != "done"]
    try:
        for item, result in (execute or (lambda pairs: _here(pairs, ui, batch, profile, compiled)))(todo):
            records[item.line] = _record(item, out, result)
            _write(out, source, records)
    finally:
        if execute is None:
            release()
    return list(records.values())


def _here(todo: list[tuple[Item, Path]], ui: Any, batch: int, profile: Any = None,
          compiled: bool = False) -> Iterator[tuple[Item, Any]]:
    for number, (item, folder) in enumerate(todo, 1):
        if hasattr(ui, "status"):
            ui.status(f"batch: line {item.line} ({number} of {len(todo)} to do) in {folder}")
        try:
            yield item, run_item(item, folder, ui, batch=batch, profile=profile, compiled=compiled)
        except RuntimeFailure as e:  # this line's work failed (NaN latents, ...): the others may not
            yield item, e


def _record(item: Item, out: Path, result: dict[str, Any] | Exception | None) -> dict[str, Any]:
    """batch.json's entry for a line: done (with a summary), failed (an error) or pending (None)."""
    record: dict[str, Any] = {"line": item.line, "folder": str(out / item.name), "status": "pending",
                              "weights": None, "image": None}
    if isinstance(result, Exception):
        record.update(status="failed", error=str(result))
    elif result is not None:
        record.update(status="done", weights=result["weights"], image=result["image"], renders=result["renders"],
                      report=result["report"])
    return record


def _write(out: Path, source: Path | None, records: dict[int, dict[str, Any]]) -> None:
    write_json(out / "batch.json", document(source, list(records.values())))


def document(source: Path | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What DIR/batch.json holds (and compose --prompts FILE.jsonl --json prints)."""
    return {"format": FORMAT, "source": str(Path(source).resolve()) if source else None, "lines": records}
