"""Rendering: a diffusers pipeline, the LoRAs on it, the ways to combine them, the render cache.

    pipeline.py   load a pipeline and LoRA adapters through diffusers' own machinery
    sampling.py   Sampling: seed, steps, guidance, size, negative prompt (None: the profile's)
    methods.py    merge / switch / composite, one signature; the METHODS registry
    rows.py       per-row LoRA weights in one UNet batch (batched Composite and Merge candidates)
    job.py        RenderJob: what to render, torch-free (commands build it before torch loads)
    render.py     Renderer: a RenderJob -> an image, content-addressed, never denoised twice
    writer.py     the render cache's background writer: PNG encode + files off the denoising path
    loras.py      LoRA files: format, base, rank, trigger words, catalogs
    metadata/     what a render was (RenderInfo) and the PNG text chunks the cache writes:
                  A1111 infotext, ComfyUI graph; export/ reads them back
"""
