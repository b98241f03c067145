"""`python -m flux_flows.cli`: the same as the `flux-flows` command."""

from flux_flows.cli import main

main()
