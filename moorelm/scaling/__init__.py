"""The scaling lab: do language models have their own Moore's law?

``fit`` fits scaling laws (L(N), L(D), the parametric L(N, D) and IsoFLOP minima) to measured
runs and derives compute-optimal allocations; ``trend`` fits exponential growth to a bundled
table of landmark models and sets it beside Moore's law; ``report`` writes CSV, JSON, plots and
a self-contained HTML page. Import the submodules directly; this package imports nothing heavy.
"""
