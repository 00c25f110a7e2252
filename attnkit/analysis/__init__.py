"""Analytic cost models (operation counts) used by the benchmarks and checked against torch's FLOP counter
(``flops``), and attention heat-maps (``attention_plots``)."""
