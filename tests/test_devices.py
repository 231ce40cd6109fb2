"""The device manager's placements with real modules, and a compose run's model events: every
model loads once, the 4-bit VLM is moved and never reloaded, and each load is announced first."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from localora import devices, estimates
from localora.cli import main
from localora.devices import DeviceManager, plan_for
from support import one_error_line

SIZE = 400  # bytes of a Linear(10, 10) without bias in float32


def linear(device):
    return torch.nn.Linear(10, 10, bias=False).to(device)


@pytest.fixture
def small_reserve(monkeypatch):
    monkeypatch.setattr(estimates, "RESERVE_FRACTION", 0.0)
    monkeypatch.setattr(estimates, "RESERVE_BYTES", 100)


def managed(capacity: int, placement: str = "auto") -> DeviceManager:
    """A manager whose 'accelerator' holds `capacity` bytes: free = capacity - resident sizes."""
    m = DeviceManager(device=torch.device("cpu"), placement=placement)
    m.free_memory = lambda: capacity - sum(m.sizes().get(n, 0) for n in m.resident())
    for name in ("diffusion", "vlm", "clip"):
        m.register(name, linear, source=name, estimate=SIZE)
    return m


def actions(m: DeviceManager) -> list[tuple[str, str]]:
    return [(p.component, p.action) for p in m.history]


def test_auto_keeps_everything_resident_when_it_fits(small_reserve):
    m = managed(capacity=3 * SIZE + 100)
    for name in ("diffusion", "vlm", "clip", "diffusion", "vlm"):
        m.acquire(name)
    assert actions(m) == [("diffusion", "load"), ("vlm", "load"), ("clip", "load")]
    assert set(m.resident()) == {"diffusion", "vlm", "clip"}


def test_auto_moves_the_least_recently_used_model_when_memory_runs_short(small_reserve):
    m = managed(capacity=2 * SIZE + 100)
    m.acquire("diffusion")
    m.acquire("vlm")
    m.acquire("diffusion")  # vlm is now the least recently used
    m.acquire("clip")
    assert actions(m)[-2:] == [("vlm", "offload"), ("clip", "load")]
    m.acquire("vlm")
    assert actions(m)[-2:] == [("diffusion", "offload"), ("vlm", "to-device")]
    assert Counter(a for _, a in actions(m))["load"] == 3 and "drop" not in {a for _, a in actions(m)}


def test_reload_drops_and_resident_never_evicts(small_reserve):
    m = managed(capacity=SIZE + 100, placement="reload")
    m.acquire("diffusion")
    m.acquire("vlm")
    m.acquire("diffusion")
    assert actions(m) == [("diffusion", "load"), ("diffusion", "drop"), ("vlm", "load"), ("vlm", "drop"),
                          ("diffusion", "load")]
    r = managed(capacity=0, placement="resident")
    for name in ("diffusion", "vlm", "clip"):
        r.acquire(name)
    assert len(r.resident()) == 3


def test_each_change_is_announced_before_it_happens(small_reserve):
    seen = []
    m = managed(capacity=10 * SIZE)
    m.log = seen.append
    m.acquire("vlm")
    assert [(p.component, p.action, p.done) for p in seen] == [("vlm", "load", False), ("vlm", "load", True)]
    assert seen[1].bytes == SIZE


def test_plan_for_a_card():
    gib = 2**30
    sizes = {"diffusion": 7 * gib, "vlm": 5 * gib, "clip": gib}
    assert plan_for(sizes, free=None).startswith("resident")
    assert plan_for(sizes, free=24 * gib) == "resident"
    assert plan_for(sizes, free=12 * gib, free_ram=32 * gib) == "moving"
    assert plan_for(sizes, free=12 * gib, free_ram=2 * gib) == "reload"
    assert plan_for(sizes, free=6 * gib) == "too large"


@pytest.fixture(scope="module")
def compose_run(demo):
    """A compose run's folder and plain output: the conftest demo's first run (the demo is compose
    on the tiny profile, few-shot stage included), shared with the other tests that read it."""
    _, run, _ = demo
    return run, run.with_suffix(".log").read_text()


def test_a_compose_run_loads_each_model_once_and_the_vlm_in_4_bit(compose_run):
    out, _ = compose_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    model = [e for e in events if e["type"] == "model"]
    assert Counter(e["model"] for e in model if e["action"] == "load") == {"diffusion": 1, "vlm": 1, "clip": 1}
    assert not any(e["action"] == "drop" for e in model)
    vlm = next(e for e in model if e["model"] == "vlm" and e["action"] == "load")
    assert "nf4" in vlm["detail"] and vlm["bytes"] > 0
    assert json.loads((out / "run.json").read_text())["profile_spec"]["vlm"]["quantization"] == "nf4"


def test_plain_output_announces_a_load_before_it_finishes(compose_run):
    _, stdout = compose_run
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "loading vlm" in line)
    done = next(i for i, line in enumerate(lines) if "model  vlm load in" in line)
    assert start < done


def test_pull_while_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_error_line(CliRunner().invoke(main, ["pull", "sdxl-realistic"]), "pull sdxl-realistic", "HF_HUB_OFFLINE")


def test_pull_builds_the_tiny_profile():
    result = CliRunner().invoke(main, ["pull", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.output.count("built") == 3
