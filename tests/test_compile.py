"""--compile: the compiled denoiser renders what eager does; its warm-up is counted apart."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from click.testing import CliRunner

from localora.cli import main
from localora.diffusion import compiling
from localora.diffusion.job import RenderJob
from localora.diffusion.sampling import Sampling


@pytest.mark.parametrize("command", ["compose", "generate", "bench", "demo"])
def test_compile_is_an_option_of_the_rendering_commands(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--compile" in result.output and "torch.compile the denoiser" in result.output


def test_without_a_cpp_compiler_it_says_so_and_renders_eagerly(monkeypatch, tmp_path, demo_loras, caplog):
    import torch
    from localora.diffusion.render import Renderer
    from localora.profiles import load_profile

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    note = compiling.unavailable(torch.device("cpu"))
    assert "no C++ compiler (no-such-compiler-xyz)" in note and "\n" not in note
    r = Renderer(load_profile("tiny"), cache_dir=tmp_path, compile=True)
    with caplog.at_level(logging.WARNING):
        r.render(RenderJob(prompt="a girl", loras=tuple(demo_loras["sdxl"][:2]), weights=(1.0, 0.5), method="merge",
                           sampling=Sampling(seed=0, steps=2, width=32, height=32)))
    assert any("--compile: no C++ compiler" in m and "without it" in m for m in caplog.messages)
    assert r.stats.compiles == 0 and r.stats.compile_seconds == 0.0


@pytest.mark.slow  # inductor compiles the tiny UNet in one to two minutes per graph on 2 shared cores
@pytest.mark.own_pipelines  # compiling changes the pipeline it is given
@pytest.mark.parametrize("profile, arch", [("tiny", "sdxl"), ("tiny-flux", "flux"), ("tiny-zimage", "zimage")])
def test_compiled_merge_and_composite_equal_eager(tmp_path, localora_home, profile, arch):
    """The UNet, and the flow-matching transformers of Flux.1 and Z-Image behind the same seam."""
    from localora import tiny
    from localora.diffusion import loras as lora_files
    from localora.diffusion.render import Renderer
    from localora.profiles import load_profile

    loras = tuple(lora_files.read_catalog(tiny.ensure(f"loras-{arch}") / "catalog.toml").values())[:2]
    s = Sampling(seed=0, steps=2, width=32, height=32)
    jobs = [RenderJob(prompt="a girl", loras=loras, weights=(1.0, 0.6), method=m, sampling=s)
            for m in ("merge", "composite")]
    eager = Renderer(load_profile(profile), cache_dir=tmp_path / "eager")
    compiled = Renderer(load_profile(profile), cache_dir=tmp_path / "compiled", compile=True)
    for job in jobs:
        want = np.asarray(eager.render(job).image, dtype=np.int16)
        before = compiled.stats.compile_seconds
        start = time.perf_counter()
        got = compiled.render(job)
        wall = time.perf_counter() - start
        warmup = compiled.stats.compile_seconds - before
        # Float rounding of other kernels: at most one level of 255 in a pixel.
        assert np.abs(np.asarray(got.image, dtype=np.int16) - want).max() <= 1, job.method
        # Each job compiles (Merge first, Composite's per-row hooks recompile), and that warm-up is
        # not in the render's own seconds.
        assert warmup > 0, job.method
        assert got.seconds <= wall - warmup + 0.05, (job.method, got.seconds, wall, warmup)
    assert compiled.stats.compiles >= 2 and eager.stats.compiles == 0


@pytest.mark.own_pipelines  # compiling changes the pipeline it is given
def test_a_compile_that_fails_while_rendering_is_one_error_line(monkeypatch, tmp_path, demo_loras):
    """A backend that fails (as inductor does without headers, or on an op it cannot lower) ends
    the render with one RuntimeFailure line naming --compile, not dynamo's traceback."""
    import torch

    from localora.diffusion.render import Renderer
    from localora.errors import RuntimeFailure
    from localora.profiles import load_profile

    def failing(graph, example_inputs):
        raise RuntimeError("no kernel for this op")

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend=failing, **kw))
    r = Renderer(load_profile("tiny"), cache_dir=tmp_path, compile=True)
    job = RenderJob(prompt="a girl", loras=tuple(demo_loras["sdxl"][:1]), weights=(1.0,), method="merge",
                    sampling=Sampling(seed=0, steps=1, width=32, height=32))
    try:
        with pytest.raises(RuntimeFailure) as raised:
            r.render(job)
    finally:
        torch.compiler.reset()  # nothing compiled stays for later tests
    message = str(raised.value)
    assert "\n" not in message and "--compile" in message and "no kernel for this op" in message
    assert "render without --compile" in message
    assert not list(tmp_path.rglob("*.png"))  # nothing cached
