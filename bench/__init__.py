"""hpk's benchmark harness: how much hpk adds on top of Slurm, and what it costs slurmctld.

`python -m bench.run` (or `make bench`) starts a private Slurm test bed, a control plane and
an hpk-kubelet of its own, measures submission throughput, status lag, Slurm load, the
kubelet's footprint and the pod start breakdown, writes `bench/results/<date>.json` and draws
the chart next to it (`bench.chart`). See README.md, section Performance.
"""
