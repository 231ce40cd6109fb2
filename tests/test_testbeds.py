"""Testbeds: the shipped definitions, the ComposLoRA composition rule, LoRA resolution, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from localora import tiny
from localora.bench import testbeds
from localora.errors import LocaloraError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "composlora"
STYLES = {"composlora-anime": "anime", "composlora-realistic": "reality"}


def test_shipped_testbeds():
    assert {"composlora-anime", "composlora-realistic", "tiny"} <= set(testbeds.names())
    anime = testbeds.load("composlora-anime")
    assert (anime.profile, anime.lora_scale, anime.prompt) == ("sd15-anime", 0.8, "masterpiece, best quality")
    assert testbeds.load("composlora-realistic").profile == "sd15-realistic"


@pytest.mark.parametrize("name", sorted(STYLES))
def test_composlora_matches_the_shared_metadata(name):
    bed = testbeds.load(name)
    assert Counter(x.category for x in bed.loras) == {"character": 3, "clothing": 2, "style": 2, "background": 2, "object": 2}
    info_file = SHARED / f"{STYLES[name]}_lora_info.json"
    if info_file.is_file():  # ../shared is there in development and CI
        info = json.loads(info_file.read_text())
        expected = [(i["id"], i["name"], cat, tuple(i["trigger"])) for cat, items in info.items() for i in items]
        assert [(x.id, x.name, x.category, x.triggers) for x in bed.loras] == expected
    assert all(x.file == f"{x.id}.safetensors" for x in bed.loras)


@pytest.mark.parametrize("name", sorted(STYLES))
def test_composlora_sets_per_size(name):
    bed = testbeds.load(name)
    counts = {}
    for n in (2, 3, 4, 5):
        sets = bed.composition_sets(n)
        counts[n] = len(sets)
        for s in sets:
            cats = [x.category for x in s]
            assert len(s) == n and cats[0] == "character" and cats.count("character") == 1
            assert len(set(cats)) == n
        assert len({testbeds.set_id(s) for s in sets}) == len(sets)
    assert counts == {2: 24, 3: 72, 4: 96, 5: 48}
    assert len(bed.all_sets()) == 240


def test_prompt_is_base_tags_then_every_trigger():
    bed = testbeds.load("composlora-anime")
    combo = bed.composition_sets(2)[0]
    assert testbeds.set_id(combo) == "character_1_clothing_1"
    assert bed.prompt_for(combo) == (
        "masterpiece, best quality, kamado nezuko, black hair, pink eyes, forehead, gmuniform, blue thighhighs, long sleeves"
    )
    assert combo[0].element().line(1) == "1. character (Kamado Nezuko): kamado nezuko, black hair, pink eyes, forehead"


def test_tiny_testbed_resolves_the_demo_loras_at_load_time_only():
    bed = testbeds.load("tiny")
    assert [len(bed.composition_sets(n)) for n in (1, 2, 3)] == [1, 2, 1]
    resolved = bed.resolve()  # builds the demo LoRAs now, not at import or load
    assert set(resolved) == {"demo-character", "demo-clothing", "demo-style"}
    folder = tiny.ensure("loras-sdxl")
    for lora_id, lora in resolved.items():
        assert lora.path == folder / f"{lora_id}.safetensors" and lora.path.is_file()
    assert resolved["demo-style"].category == "style" and resolved["demo-style"].triggers == "demo style, watercolor"


def test_user_folder_resolves_with_references(tmp_path):
    bed = _write_bed(tmp_path, _LORAS.replace('file = "b.safetensors"', 'file = "b.safetensors"\nreferences = ["refs/b.png"]'))
    folder = tmp_path / "loras"
    (folder / "refs").mkdir(parents=True)
    for f in ("a.safetensors", "b.safetensors", "refs/b.png"):
        (folder / f).write_bytes(b"")
    resolved = testbeds.load(bed).resolve(folder)
    assert resolved["b"].path == folder / "b.safetensors" and resolved["b"].references == (folder / "refs" / "b.png",)


# ------------------------------------------------------------------ bad input

_LORAS = """
profile = "tiny"
prompt = "best quality"

[[lora]]
id = "a"
category = "character"
file = "a.safetensors"
triggers = ["girl"]

[[lora]]
id = "b"
category = "style"
file = "b.safetensors"
triggers = "ink, wash"
"""


def _write_bed(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bed.toml"
    path.write_text(text)
    return path


def test_unknown_category_names_the_file_lora_and_allowed_ones(tmp_path):
    path = _write_bed(tmp_path, _LORAS.replace('category = "style"', 'category = "vehicle"'))
    with pytest.raises(LocaloraError) as e:
        testbeds.load(path)
    msg = str(e.value)
    assert str(path) in msg and "'b'" in msg and "unknown category 'vehicle'" in msg
    assert "character, clothing, style, background, object" in msg


def test_missing_lora_folder_is_one_line_listing_the_files(tmp_path):
    bed = testbeds.load("composlora-anime")
    with pytest.raises(LocaloraError) as e:
        bed.resolve(tmp_path / "no-such-folder")
    msg = str(e.value)
    assert "\n" not in msg and "does not exist" in msg and str(tmp_path / "no-such-folder") in msg
    assert all(f"{x.id}.safetensors" in msg for x in bed.loras)


def test_missing_files_are_listed_exactly(tmp_path):
    bed = testbeds.load("composlora-realistic")
    for x in bed.loras:
        if x.category != "object":
            (tmp_path / x.file).write_bytes(b"")
    with pytest.raises(LocaloraError) as e:
        bed.resolve(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "2 of 11 files missing" in msg
    assert msg.split(": ", 2)[2].startswith("object_1.safetensors, object_2.safetensors (")
    assert "character_1.safetensors" not in msg


def test_user_testbed_without_lora_dir_says_to_give_one():
    with pytest.raises(LocaloraError, match="give --lora-dir"):
        testbeds.load("composlora-anime").resolve()


def test_composition_size_beyond_the_categories(tmp_path):
    with pytest.raises(LocaloraError, match="composition size 6 is not possible: it must be 1 to 5"):
        testbeds.load("composlora-anime").composition_sets(6)
    with pytest.raises(LocaloraError, match="must be 1 to 2, .*\\(character, style\\)"):
        testbeds.load(_write_bed(tmp_path, _LORAS)).composition_sets(3)
    with pytest.raises(LocaloraError, match="composition size 0"):
        testbeds.load("tiny").composition_sets(0)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('profile = "tiny"\n', ""), "missing key\\(s\\) profile"),
    (lambda t: t.replace('id = "b"', 'id = "a"'), "duplicate LoRA id\\(s\\) a"),
    (lambda t: t.replace('file = "a.safetensors"', 'file = "a.ckpt"'), "pickles"),
    (lambda t: t.replace('prompt = "best quality"', 'prompt = "x"\nscale = 1'), "unknown key\\(s\\) scale"),
    (lambda t: t + "\nlora_scale = -1\n", None),  # after a [[lora]] table: a key of that LoRA
    (lambda t: "lora_scale = 0\n" + t, "lora_scale must be a positive number"),
    (lambda t: t.replace("[[lora]]", "[[lora]", 1), "not valid TOML"),
])
def test_bad_testbed_files(tmp_path, edit, message):
    path = _write_bed(tmp_path, edit(_LORAS))
    with pytest.raises(LocaloraError, match=message or "unknown key\\(s\\) lora_scale"):
        testbeds.load(path)


def test_unknown_testbed_name_lists_the_shipped_ones():
    with pytest.raises(LocaloraError, match="unknown testbed 'nope'; shipped testbeds: .*composlora-anime"):
        testbeds.load("nope")
