"""What every benchmark script shares, so that each script says only what it measures.

The scripts run as files (`python benchmarks/bench_batch.py ...`), so Python puts `benchmarks/`
first on `sys.path` and `import harness` finds this package without any path juggling.

- `procs`: starting, stopping and waiting on child processes, loopback HTTP helpers;
- `servers`: the stand-in servers (the library's emulator, a zero-cost stand-in API, moto, a
  `prefect server start`), launched one way, and the environment their clients get;
- `serve`: the two API servers' own code, run as a file in their own process;
- `cpu`: the one definition of client CPU and server CPU, peak RSS, machine load;
- `timing`: wall time and client CPU of one measured run;
- `report`: medians and ranges over `--repeat`, RESULT lines, the run's header facts and the
  raw-output convention (`benchmarks/raw/<date>-<script>.txt`);
- `workload`: the prompts every contender generates.
"""
