"""The papers' figures: one compute, plot and summary function per figure, a registry, ``python -m paper_figs``.

Figures are grouped by source paper (``yang2022_*``, ``ormaniec2024``) plus the ``bridge*`` figures that connect
the two views; :mod:`paper_figs.registry` lists the modules and explains how to add a figure.
"""
