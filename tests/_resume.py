"""One interrupted-then-resumed purification, the way the resume tests need it (tests/ is on sys.path)."""
from __future__ import annotations

from typing import Any, Callable, Tuple

import pytest

from fip_fast import pipeline as P


class _Stop(Exception):
    """Raised by the crashing eval_fn: the stand-in for a killed process."""


def uninterrupted_and_resumed(make_model: Callable[[], Any], clean: Any, tmp_path: Any, evals_before_crash: int,
                              **kw: Any) -> Tuple[Tuple[Any, Any], Tuple[Any, Any]]:
    """``((model, report) of an uninterrupted run, (model, report) of a run stopped at evaluation number
    ``evals_before_crash + 1`` (θ0's evaluation counts) and resumed from its last checkpoint)``.  ``kw`` goes to
    :func:`fip_fast.pipeline.purify` unchanged in all three calls."""
    full = P.purify(make_model(), clean, checkpoint_dir=str(tmp_path / "full"), **kw)
    seen = []

    def crash(m):
        seen.append(1)
        if len(seen) > evals_before_crash:
            raise _Stop
        return {}

    with pytest.raises(_Stop):
        P.purify(make_model(), clean, checkpoint_dir=str(tmp_path / "cut"), eval_fn=crash, **kw)
    resumed = P.purify(make_model(), clean, checkpoint_dir=str(tmp_path / "cut"), resume=True, **kw)
    return full, resumed
