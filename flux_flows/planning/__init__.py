"""Planning a batch before anything is spent: prompt sources, the expansion into requests, what
the destination already holds, the cost, where each object lives, and the per-image leases that
keep overlapping runs from paying twice.

Everything here either reads or is pure, so `dry_run=True` and `flux-flows plan` run it whole.
"""
