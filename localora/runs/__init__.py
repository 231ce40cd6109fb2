"""One compose run on disk and the wiring around it.

    folder.py    the run folder: run.json, the append-only events.jsonl, images, the final pick
    session.py   builds the components for a profile and drives a compose run (the CLI calls it)
    report.py    report.html from a run folder's events
"""
