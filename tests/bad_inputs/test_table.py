"""The bad-input table of issue #9 (item 2): every case must get a clear answer (see :mod:`._case`).

Cases listed in :data:`.known.NOT_YET` are ``xfail(strict=True)``: fixed ones XPASS and fail the run until their
line is removed. ``python -m tests.bad_inputs.census`` prints the clear / unclear / silent / traceback counts.
"""

from __future__ import annotations

import pytest

from ._case import classify
from .known import NOT_YET
from .table import ALL_CASES


def _param(case):
    marks = []
    if case.id in NOT_YET:
        marks.append(pytest.mark.xfail(strict=True, reason=f"issue #9: {NOT_YET[case.id]}"))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in ALL_CASES])
def test_bad_input_gets_a_clear_answer(case):
    status, detail = classify(case)
    if status == "skipped":
        pytest.skip(detail)
    assert status == "clear", f"{status}: {detail}"


def test_table_covers_at_least_200_cases_with_unique_ids():
    ids = [c.id for c in ALL_CASES]
    assert len(ids) >= 200
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})


def test_known_list_names_only_existing_cases():
    assert set(NOT_YET) <= {c.id for c in ALL_CASES}, sorted(set(NOT_YET) - {c.id for c in ALL_CASES})
