"""bench.throughput: the fast trainer (the engine's Trainer itself) against the naive reference trainer, run as
`python -m bench.throughput` (compare.py). trainers.py: both trainers stepped in place, the timer; setup.py: config,
paper-size data, FLOPs per step, matmul rate; scaling.py: 1 and N processes; report.py: the summary and the chart.
"""
