"""Rendering the plan: the in-flight window, the work per image (generate, store, thumbnail,
spill), and where images run (threads in one process, chunks on a task runner or a work pool),
with the account's limits, Ctrl-C and overlapping runs handled on the way.
"""
