"""``python -m bench retries``'s report (bench/retries.py): one table per cell set, every retried cell listed with
what its abandoned tries lost, and the count of the others that equal their run once."""
from __future__ import annotations

from bench.retries import report


def _run(acc, asr, retune=0.1, tries=()):
    return {"acc": acc, "asr": asr, "retune_asr": retune, "wall_s": 10.0, "retries": list(tries)}


def test_report_lists_the_retried_cells_and_checks_the_others():
    before = {"acc": 0.9, "asr": 1.0}
    tried = [{"lrs": {"lr": 0.05}, "drop": 0.2}]
    results = [
        {"cells": "heldout", "cell": "a", "method": "fip", "before": before, "once": _run(0.5, 0.1),
         "retried": _run(0.85, 0.3, tries=tried)},
        {"cells": "heldout", "cell": "b", "method": "fip", "before": before, "once": _run(0.88, 0.02),
         "retried": _run(0.88, 0.02)},
        {"cells": "heldout", "cell": "c", "method": "fip", "before": before, "once": _run(0.87, 0.02),
         "retried": _run(0.86, 0.02)},      # not retried yet different: must not count as equal
    ]
    md = report(results)
    assert "| fip, once | 3 | -15.0 | 4.7 |" in md and "| fip, retries 2 | 3 | -3.7 | 11.3 |" in md
    assert "fip: 1 of 3 cells retried; of the others 1 of 2 equal the run once" in md
    assert "- a: once ΔACC -40.0 / ASR 10.0 / re-tuned 10.0; abandoned (lr 0.05 lost 20.0); returned ΔACC -5.0" in md
