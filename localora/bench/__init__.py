"""The benchmark: every method on a testbed's composition sets, scored, judged, stored.

    testbeds.py   testbed TOML files and the ComposLoRA composition-set rule
    plan.py       BenchConfig -> Plan: inputs checked and cases listed before any model loads
    store.py      DIR/bench.sqlite with append-only schema migrations
    runner.py     yields the rows not stored yet; `run` stores each as it arrives
    report.py     report.md and plots from the store
"""
