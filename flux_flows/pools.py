"""The work-pool chunk flow under its first path, for deployments made before the stages moved.

`deployments/prefect.yaml` used to name `flux_flows/pools.py:render_chunk`; a chunk deployment
created then keeps that entrypoint until it is deployed again, so the flow stays reachable here.
New deployments name `flux_flows/rendering/work_pools.py:render_chunk`.
"""

from flux_flows.rendering.work_pools import render_chunk

__all__ = ["render_chunk"]
