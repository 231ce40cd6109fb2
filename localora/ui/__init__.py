"""What a person sees while localora works.

    live.py       a compose run: the Rich live view, or one plain line per event
    progress.py   a bench: a Rich progress bar, or one plain line per finished row
"""
