"""Scoring images the way the papers do.

    clip.py    CLIP-T (image vs prompt) and CLIP-I (image vs reference images), raw cosines
    clipscore.py  CLIPScore x 100 from a cosine (no torch)
    judge.py   the pairwise VLM judge: both orders, every repeat an outcome, explanations first
"""
