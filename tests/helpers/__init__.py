"""Test machinery shared by the test files: constants and small helpers (`common`), stand-in
runs (`runs`), fleets of CLI processes and a delaying proxy (`fleet`), the fault matrix
(`matrix`) and process kills (`kills`). Nothing in `flux_flows` imports it."""
