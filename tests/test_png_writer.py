"""The background writer of render-cache files (diffusion/writer.py): byte for byte what a
synchronous write gives, its errors never lost, and a killed run records no image that is not
on disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from localora.cli import main
from localora.diffusion import render
from localora.files import TMP_PREFIX
from localora.diffusion.render import Renderer, RenderJob
from localora.diffusion.sampling import Sampling
from localora.runs.folder import RunFolder
from support import ctrl_c_works


def job(loras, method="merge", seed=5):
    return RenderJob("a cat in a hat", tuple(loras), (1.0, 0.5, 0.8), method,
                     Sampling(seed=seed, steps=2, width=32, height=32))


VECTORS = [(1.0, 0.5, 0.8), (0.2, 0.9, 0.4), (0.7, 0.7, 0.1)]


def renderer_like(shared: Renderer, cache: Path, sync: bool) -> Renderer:
    return Renderer(shared.profile, devices=shared.devices, cache_dir=cache, sync_writes=sync)


@pytest.mark.parametrize("method", ["merge", "composite"])  # merge: batched; composite: one at a time
def test_background_files_are_byte_identical_to_synchronous_ones(sdxl_renderer, demo_loras, tmp_path, method):
    files = {}
    for sync in (True, False):
        mode = "sync" if sync else "background"
        with renderer_like(sdxl_renderer, tmp_path / mode / "cache", sync) as renderer:
            assert renderer._writer.background is not sync
            outs = renderer.render_many(job(demo_loras["sdxl"], method), VECTORS)
            run = RunFolder.create(tmp_path / mode / "run", {"test": True})
            rels = [run.save_image(out) for out in outs]
            run.close()
        cache = sorted((tmp_path / mode / "cache").rglob("*.png")) + sorted((tmp_path / mode / "cache").rglob("*.json"))
        assert len(cache) == 2 * len(VECTORS)
        files[mode] = ({p.name: p.read_bytes() for p in cache},
                       [(tmp_path / mode / "run" / rel).read_bytes() for rel in rels])
    assert files["background"] == files["sync"]
    for data in files["sync"][1]:  # a cache PNG with its chunks, as the run folder keeps it
        assert data.startswith(b"\x89PNG") and b"parameters" in data


def test_render_many_returns_before_the_write_and_a_hit_of_it_waits(sdxl_renderer, demo_loras, tmp_path, monkeypatch):
    release = threading.Event()
    real = render.encode_png

    def held(image, info):
        assert release.wait(timeout=120)  # the test lets it go on once it has looked
        return real(image, info)

    monkeypatch.setattr(render, "encode_png", held)
    with renderer_like(sdxl_renderer, tmp_path, sync=False) as renderer:
        first = renderer.render(job(demo_loras["sdxl"], seed=11))
        assert not first.file.exists()  # returned while its write is pending
        release.set()
        second = renderer.render(job(demo_loras["sdxl"], seed=11))  # a hit of the key being written waits for it
        assert second.cached and renderer.stats.renders == 1 and renderer.stats.hits == 1
        assert first.path.read_bytes() == second.path.read_bytes()


def _full(path, write):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_failed_background_write_is_raised_at_the_wait(sdxl_renderer, demo_loras, tmp_path, monkeypatch):
    monkeypatch.setattr(render, "atomic_write", _full)
    renderer = renderer_like(sdxl_renderer, tmp_path, sync=False)
    out = renderer.render(job(demo_loras["sdxl"], seed=12))  # the denoise is done; the write fails behind it
    with pytest.raises(OSError, match="No space left") as failed:
        out.path
    assert failed.value.filename == str(out.file)
    renderer.close()  # raised once: it was seen at the wait
    lost = renderer.render(job(demo_loras["sdxl"], seed=13))
    with pytest.raises(OSError, match="No space left"):
        renderer.flush()  # nobody waited for it: flush says so instead of losing it
    assert not lost.file.exists()


def test_generate_gives_the_same_error_line_for_a_failed_cache_write_either_way(demo_loras, tmp_path, monkeypatch):
    monkeypatch.setattr(render, "atomic_write", _full)
    results = []
    for sync in ("1", "0"):
        monkeypatch.setenv("LOCALORA_SYNC_WRITES", sync)
        results.append(CliRunner().invoke(main, ["generate", "a cat", "-l", "demo-character", "-l", "demo-style",
                                                 "--steps", "2", "--width", "32", "--height", "32", "--seed", "14",
                                                 "--out", str(tmp_path / f"out-{sync}.png")]))
    sync, background = results
    assert sync.exit_code == background.exit_code == 4, (sync.output, background.output)
    assert sync.output.strip().splitlines()[-1] == background.output.strip().splitlines()[-1]
    line = background.output.strip().splitlines()[-1]
    assert "/renders/v2/" in line and "no space left" in line  # the cache file that failed, and why
    assert not list(tmp_path.glob("out-*"))


# ------------------------------------------------------------------ killed runs

def _compose(home: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "LOCALORA_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "localora", "compose", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_works)


def _named(run: Path) -> list[str]:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    return [e["image"] for e in events if "image" in e] + \
           [i for e in events for i in e.get("images", []) if isinstance(i, str)]


def _signal_at_candidate(proc: subprocess.Popen, run: Path, sig) -> None:
    """Send `sig` once the first candidate's render event is in events.jsonl (checked at each
    line the run prints, so no timing is guessed), then wait for the process to end."""
    for _ in proc.stdout:
        log = run / "events.jsonl"
        if log.is_file() and any(e.get("type") == "render" and e.get("role") == "candidate"
                                 for e in map(json.loads, log.read_text().splitlines()[:-1] or ["{}"])):
            proc.send_signal(sig)
            break
    proc.communicate(timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_run_killed_while_writes_are_pending_names_only_images_on_disk_and_resumes(demo_loras, localora_home,
                                                                                    tmp_path, sig):
    # A home of its own: an empty render cache, so the candidates are denoised and written in the background.
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(localora_home / "tiny", target_is_directory=True)
    run = tmp_path / "run"
    # Killed once the first candidate's event is logged: its batch's other writes may still be pending.
    proc = _compose(home, "a girl", "-l", "demo-character", "-l", "demo-style", "-n", "1", "-c", "3",
                    "--fewshot-levels", "1.0", "--seed", "21", "--plain", "--out", run)
    _signal_at_candidate(proc, run, sig)
    assert proc.returncode != 0
    assert not (run / "final.json").exists()
    named = _named(run)
    assert named and all((run / rel).is_file() for rel in named)
    # No half file among the cache entries: each one whole or none. A write the kill cut short
    # leaves only its temporary (files.atomic_write), which is not an entry and is cleaned later.
    for png in (home / "renders").rglob("*.png"):
        if not png.name.startswith(TMP_PREFIX):
            with Image.open(png) as im:
                im.load()

    resumed = _compose(home, "--resume", run, "--plain")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert (run / "final.png").is_file()
    assert all((run / rel).is_file() for rel in _named(run))
