"""Scoring images the way the papers do.

    clip.py    CLIP-T (image vs prompt) and CLIP-I (image vs reference images), raw cosines
    judge.py   the pairwise VLM judge, asked in both orders to cancel position bias
"""
