"""Testbeds: a fixed list of LoRAs, a base profile and prompts, and the composition sets over them.

A testbed is a TOML file (the shipped ones are in localora/testbeds/): top-level `name`,
`profile`, `prompt`, `negative_prompt`, `lora_scale`, optional `seeds` (default 0, 1, 2), `description` and
`lora_dir`, and one [[lora]] table per LoRA with `id`, `name`, `category`, `file`, `triggers`
and optional `references` (image paths relative to the LoRA folder) and `url`.

LoRA files are found at load time in a folder: the user's --lora-dir, or, for a testbed whose
`lora_dir` is "tiny:NAME", the tiny demo LoRAs localora builds offline, or else the first of the
user's LoRA folders ($LOCALORA_LORA_DIRS, then lora_dirs in config.toml, as generate and compose
search them) that holds every file the testbed names. A testbed names its files by path within
that folder, so unlike generate's bare names they are not looked up by stem in subfolders.

Composition sets follow the ComposLoRA rule: exactly one character plus N-1 distinct other
categories, one LoRA per category, every combination (24 / 72 / 96 / 48 sets for N = 2..5).
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localora.diffusion import loras
from localora.errors import LocaloraError, check_keys
from localora.profiles import check_tiny_source
from localora.scoring.judge import Element

CATEGORIES = loras.CATEGORIES  # character, clothing, style, background, object: the Switch order
SHIPPED_DIR = Path(__file__).resolve().parent / "testbeds"
DEFAULT_SEEDS = (0, 1, 2)  # a testbed without `seeds`: three, as both papers average over three

_TOP_KEYS = {"name", "description", "profile", "prompt", "negative_prompt", "lora_scale", "seeds", "lora_dir", "lora"}
_REQUIRED_TOP = ("profile", "prompt", "lora")
_LORA_KEYS = {"id", "name", "category", "file", "triggers", "references", "url"}
_REQUIRED_LORA = ("id", "category", "file", "triggers")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class TestbedLora:
    __test__ = False  # not a pytest test class

    id: str
    name: str
    category: str
    file: str
    triggers: tuple[str, ...]
    references: tuple[str, ...] = ()
    url: str = ""

    @property
    def trigger_text(self) -> str:
        return ", ".join(self.triggers)

    def element(self) -> Element:
        """The judge's element line: '<category> (<name>): <trigger, words>'."""
        return Element(self.category, self.name, self.trigger_text)


@dataclass(frozen=True)
class Testbed:
    __test__ = False

    name: str
    path: Path
    profile: str
    prompt: str
    negative_prompt: str
    lora_scale: float
    loras: tuple[TestbedLora, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    lora_dir: str | None = None  # "tiny:NAME", or None: the user gives the folder
    description: str = ""

    def categories(self) -> tuple[str, ...]:
        present = {lora.category for lora in self.loras}
        return tuple(c for c in CATEGORIES if c in present)

    def composition_sets(self, n: int) -> list[tuple[TestbedLora, ...]]:
        return composition_sets(self.loras, n)

    def all_sets(self, sizes: Sequence[int] | None = None) -> list[tuple[TestbedLora, ...]]:
        """Every set for each size (default 2 .. number of categories), smaller sizes first."""
        sizes = sizes if sizes is not None else range(2, len(self.categories()) + 1)
        return [s for n in sizes for s in self.composition_sets(n)]

    def prompt_for(self, combo: Sequence[TestbedLora]) -> str:
        """The reference prompt: base quality tags, then every trigger word, comma-joined."""
        return ", ".join([self.prompt, *(t for lora in combo for t in lora.triggers)])

    def resolve(self, lora_dir: str | Path | None = None) -> dict[str, loras.Lora]:
        """id -> Lora with its file path, or one LocaloraError listing every missing file."""
        folder = self._folder(lora_dir)
        needed = [lora.file for lora in self.loras] + [r for lora in self.loras for r in lora.references]
        if not folder.is_dir():
            raise LocaloraError(
                f"testbed {self.name}: LoRA folder {folder} does not exist; it must hold {', '.join(needed)}"
            )
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            raise LocaloraError(
                f"testbed {self.name}: {len(missing)} of {len(needed)} files missing in {folder}: "
                f"{', '.join(missing)} (sources are listed in {self.path})"
            )
        return {
            lora.id: loras.Lora(
                name=lora.id, path=folder / lora.file, category=lora.category, triggers=lora.trigger_text,
                references=tuple(folder / r for r in lora.references),
            )
            for lora in self.loras
        }

    def _folder(self, lora_dir: str | Path | None) -> Path:
        if lora_dir is not None:
            return Path(lora_dir).expanduser()
        if self.lora_dir and self.lora_dir.startswith("tiny:"):
            from localora import tiny  # builds the demo LoRAs on first use, so only when asked

            return tiny.ensure(self.lora_dir.removeprefix("tiny:"))
        needed = [lora.file for lora in self.loras]
        for folder in loras.lora_folders().dirs:
            if all((folder.path / f).is_file() for f in needed):
                return folder.path
        raise LocaloraError(f"testbed {self.name}: give --lora-dir, a folder holding {', '.join(needed)} "
                            f"(none of ${loras.LORA_DIRS_ENV} or config.toml's lora_dirs holds them all; "
                            f"sources in {self.path})")


def set_id(combo: Sequence[TestbedLora]) -> str:
    """A stable name for a set, as the reference code names its images: 'character_1_style_2'."""
    return "_".join(lora.id for lora in combo)


def composition_sets(items: Sequence[TestbedLora], n: int) -> list[tuple[TestbedLora, ...]]:
    """Exactly one character plus n-1 distinct other categories, one LoRA each, every combination.

    Sets list the character first, then the categories in CATEGORIES order.
    """
    by_cat = {c: [x for x in items if x.category == c] for c in CATEGORIES}
    by_cat = {c: xs for c, xs in by_cat.items() if xs}
    if "character" not in by_cat:
        raise LocaloraError("composition sets need at least one character LoRA; the testbed has none")
    if not 1 <= n <= len(by_cat):
        raise LocaloraError(
            f"composition size {n} is not possible: it must be 1 to {len(by_cat)}, the number of "
            f"categories in the testbed ({', '.join(by_cat)})"
        )
    others = [c for c in by_cat if c != "character"]
    sets = []
    for cats in itertools.combinations(others, n - 1):
        sets.extend(itertools.product(*(by_cat[c] for c in ("character", *cats))))
    return sets


# ------------------------------------------------------------------ reading testbed files

def names() -> list[str]:
    """The shipped testbeds."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def load(name_or_path: str | Path) -> Testbed:
    """A shipped testbed by name, or a testbed TOML file by path; every error names the file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if str(name_or_path).endswith(".toml") or "/" in str(name_or_path):
            raise LocaloraError(f"{path}: testbed file not found")
        path = SHIPPED_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise LocaloraError(f"unknown testbed '{name_or_path}'; shipped testbeds: {', '.join(names())}, or give a .toml path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LocaloraError(f"{path}: not valid TOML ({e})") from None
    return _parse(data, path)


def _parse(data: dict[str, Any], path: Path) -> Testbed:
    check_keys(data, _TOP_KEYS, _REQUIRED_TOP, str(path))
    scale = data.get("lora_scale", 0.8)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise LocaloraError(f"{path}: lora_scale must be a positive number, got {scale!r}")
    seeds = data.get("seeds", list(DEFAULT_SEEDS))
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise LocaloraError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    for key in ("profile", "prompt", "negative_prompt", "name", "description", "lora_dir"):
        if key in data and not isinstance(data[key], str):
            raise LocaloraError(f"{path}: '{key}' must be a string, got {data[key]!r}")
    if "lora_dir" in data:
        check_tiny_source(data["lora_dir"], "loras", f"{path}: lora_dir")
    if not isinstance(data["lora"], list) or not data["lora"]:
        raise LocaloraError(f"{path}: needs one or more [[lora]] tables")
    items = tuple(_parse_lora(t, path, i) for i, t in enumerate(data["lora"], 1))
    ids = [x.id for x in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise LocaloraError(f"{path}: duplicate LoRA id(s) {', '.join(dupes)}")
    return Testbed(
        name=data.get("name", path.stem), path=path, profile=data["profile"], prompt=data["prompt"],
        negative_prompt=data.get("negative_prompt", ""), lora_scale=float(scale), loras=items,
        seeds=tuple(seeds), lora_dir=data.get("lora_dir"), description=data.get("description", ""),
    )


def _parse_lora(table: Any, path: Path, index: int) -> TestbedLora:
    where = f"{path} [[lora]] #{index}"
    if not isinstance(table, dict):
        raise LocaloraError(f"{where}: expected a table")
    where = f"{path} [[lora]] '{table.get('id', index)}'"
    check_keys(table, _LORA_KEYS, _REQUIRED_LORA, where)
    if not isinstance(table["id"], str) or not _SAFE_ID.fullmatch(table["id"]):
        # Ids name image files and run folders under --out: one from a shared file must never
        # choose a place outside it ("../..", "/abs", NUL).
        raise LocaloraError(f"{where}: id {table['id']!r} must be letters, digits, '.', '_' or '-' "
                            f"(not starting with '.'); rename it")
    if table["category"] not in CATEGORIES:
        raise LocaloraError(f"{where}: unknown category '{table['category']}'; use one of {', '.join(CATEGORIES)}")
    triggers = table["triggers"]
    if isinstance(triggers, str):
        triggers = [t.strip() for t in triggers.split(",")]
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
        raise LocaloraError(f"{where}: triggers must be a list of words or a comma-separated string")
    refs = table.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise LocaloraError(f"{where}: references must be a list of image paths")
    try:
        loras.check_suffix(Path(table["file"]))
    except LocaloraError as e:
        raise LocaloraError(f"{where}: {e}") from None
    return TestbedLora(
        id=str(table["id"]), name=str(table.get("name", table["id"])), category=table["category"],
        file=str(table["file"]), triggers=tuple(triggers), references=tuple(refs), url=str(table.get("url", "")),
    )
