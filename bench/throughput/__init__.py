"""bench.throughput: the fast trainer (the engine's Trainer itself) against the naive reference trainer.

    python -m bench.throughput [--smoke] [--config gta2cs --data paper] ...   (flags: see compare.py)

    compare    the command: both trainers alternated round by round, the ablations, the result JSON
    trainers   the reference trainer stepped in place, the engine's Trainer as timed (FastBench), the timer
    setup      the shared config, paper-size data, FLOPs per step, the matmul rate, provenance
    scaling    the Trainer on 1 and N processes (torchrun workers: python -m bench.throughput.scaling)
    report     the printed summary and the chart
"""
