"""The table-driven bad-input suite of issue #9 (item 2): every public entry point and every command line, fed bad
input, must answer with a clear error that names the argument and the fix (see :mod:`._case`)."""
