"""The cases the library does not answer clearly yet (issue #9), by case id, with what is missing.

The table test marks each of these ``xfail(strict=True)``: the day a fix lands, the case passes, the XPASS fails the
run, and its line here must be removed. ``python -m tests.bad_inputs.census`` counts them honestly either way.
"""

NOT_YET: dict[str, str] = {
}
