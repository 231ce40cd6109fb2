"""Shared fixtures: one private $LOCALORA_HOME per test session, so tiny models are built once
per run from a clean state and the user's own cache is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP
# threads that spin-wait for each other make every op many times slower. Set before torch loads;
# subprocesses of the tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_xdist_auto_num_workers(config):
    """-n auto (pyproject.toml): one worker per core, but a run that selects the fullsize tests
    gets one worker, since two full-size builds at once (10-15 GB of RAM each) exceed a 24 GB machine."""
    import re

    if re.search(r"(?<!not )\bfullsize\b", config.getoption("markexpr") or ""):
        return 1
    return None  # xdist's own count


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(config, items):
    """Units of work for xdist (pyproject.toml: --dist loadgroup): each test file is one, so its
    module fixtures are built once; the files whose tests read the session's `demo` runs are one
    together, so those two end-to-end runs (about 35 s) happen once, not once per worker."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    for path, tests in files.items():
        group = "demo" if any("demo" in t.fixturenames for t in tests) else path.name
        for t in tests:
            t.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def localora_home(tmp_path_factory):
    """A private $LOCALORA_HOME and an empty $LOCALORA_CONFIG: a developer's own cache,
    ~/.config/localora (models.toml, prompts, config.toml) and $LOCALORA_LORA_DIRS never change
    what the tests see."""
    home = tmp_path_factory.mktemp("localora-home")
    config = tmp_path_factory.mktemp("localora-config")
    old = {k: os.environ.get(k) for k in ("LOCALORA_HOME", "LOCALORA_CONFIG", "LOCALORA_MODELS", "LOCALORA_LORA_DIRS")}
    os.environ["LOCALORA_HOME"] = str(home)
    os.environ["LOCALORA_CONFIG"] = str(config)
    os.environ.pop("LOCALORA_MODELS", None)
    os.environ.pop("LOCALORA_LORA_DIRS", None)
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def _tiny_pipelines(localora_home):
    """The session's loaded tiny diffusion pipelines, by (spec, device, dtype, folder)."""
    return {}


@pytest.fixture(autouse=True)
def shared_tiny_pipelines(request, _tiny_pipelines, localora_home, monkeypatch):
    """Every Renderer made in process (a CLI command run by CliRunner included) takes its tiny
    pipeline from the session's: each is read from disk once per run instead of once per
    command (about a second each, some fifty times).

    Safe to share because a pipeline is shared in the product too (a bench's renderers, several
    Renderers on one DeviceManager): adapters are keyed by file content and a render never depends
    on one before it (test_scheduler_state checks that on freshly loaded pipelines). Only tiny
    models, by their folder, device and dtype (LOCALORA_DTYPE), are shared; any other source (a
    broken copy, a missing folder) loads, or fails, as it always does. The adapters a test adds,
    other than the demo LoRAs', are deleted after it: nothing of one test's LoRAs stays, and
    renders do not slow down as adapters pile up. A test about separate loads is marked
    `own_pipelines`."""
    if request.node.get_closest_marker("own_pipelines"):
        yield
        return
    from localora import profiles
    from localora.diffusion import render
    from localora.diffusion.pipeline import dtype_for

    real = render.load_pipeline

    def load_pipeline(spec, device):
        if not spec.source.startswith("tiny:") or spec.vae:
            return real(spec, device)
        try:
            folder = profiles.locate(spec.source, spec.name)
        except Exception:
            return real(spec, device)  # its own error, as without sharing
        key = (spec, str(device), dtype_for(spec, device), str(folder))
        if key not in _tiny_pipelines:
            _tiny_pipelines[key] = real(spec, device)
        return _tiny_pipelines[key]

    def adapters(pipe) -> set[str]:
        return {name for names in pipe.get_list_adapters().values() for name in names}

    before = {id(pipe): adapters(pipe) for pipe in _tiny_pipelines.values()}
    monkeypatch.setattr(render, "load_pipeline", load_pipeline)
    yield
    if not _tiny_pipelines:
        return
    from localora import tiny
    from localora.diffusion.pipeline import adapter_name
    from localora.files import file_hash

    demo = {adapter_name(file_hash(path)) for arch in ("sdxl", "sd15", "flux", "zimage")
            for path in (localora_home / "tiny" / f"v{tiny.VERSION}" / f"loras-{arch}").glob("*.safetensors")}
    for pipe in _tiny_pipelines.values():
        added = adapters(pipe) - demo - before.get(id(pipe), set())
        if added:
            # peft says which adapter it makes active instead; every render sets its own anyway.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
                pipe.delete_adapters(sorted(added))


@pytest.fixture(scope="session")
def sdxl_renderer(localora_home):
    from localora.profiles import load_profile
    from localora.diffusion.render import Renderer

    return Renderer(load_profile("tiny"))


@pytest.fixture(scope="session")
def sd15_renderer(localora_home):
    from localora.profiles import load_profile
    from localora.diffusion.render import Renderer

    return Renderer(load_profile("tiny-sd15"))


@pytest.fixture(scope="session")
def demo_loras(localora_home):
    """arch -> the demo LoRAs (character, clothing, style) from the tiny build."""
    from localora import tiny
    from localora.diffusion import loras

    return {arch: list(loras.read_catalog(tiny.ensure(f"loras-{arch}") / "catalog.toml").values())
            for arch in ("sdxl", "sd15")}


@pytest.fixture(scope="session")
def demo(tmp_path_factory, localora_home):
    """`localora demo` twice in a clean LOCALORA_HOME: (home, first run folder, second run folder).

    The first is a new user's first run: it builds the tiny models, and writes to --out. The second
    reuses them and the first run's few-shot library, and finds its folder through config.toml's
    `out` (in support.DEMO_CONFIG, beside the home), started from an empty support.DEMO_CWD. Both
    are subprocesses whose sockets cannot connect (support.no_network_env: every attempt is logged
    in support.DEMO_NETWORK_LOG beside the home), without HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE.
    Each run's output (plain: stdout is a pipe) is kept as demo-N.log beside the home. One pair of
    end-to-end runs for every test that reads a finished demo (or a compose run's events and output)."""
    from support import DEMO_CONFIG, DEMO_CWD, DEMO_NETWORK_LOG, no_network_env

    root = tmp_path_factory.mktemp("demo")
    home, config, cwd = root / "home", root / DEMO_CONFIG, root / DEMO_CWD
    config.mkdir()
    (config / "config.toml").write_text('out = "demo-runs"\n')
    cwd.mkdir()
    env = no_network_env(root / "site", root / DEMO_NETWORK_LOG, {**os.environ, "LOCALORA_HOME": str(home)})
    runs = []
    for n, (extra, run_env) in enumerate([(["--out", str(root / "demo-1")], env),
                                          ([], {**env, "LOCALORA_CONFIG": str(config)})], 1):
        proc = subprocess.run([sys.executable, "-m", "localora", "demo", *extra], env=run_env, cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        assert proc.returncode == 0, proc.stdout
        (root / f"demo-{n}.log").write_text(proc.stdout)
        runs.append(root / "demo-1" if extra else next((config / "demo-runs").iterdir()))
    return home, runs[0], runs[1]
