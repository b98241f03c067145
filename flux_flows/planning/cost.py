"""What an image costs, in one table, so every estimate, plan and budget uses the same figures.

Figures (USD): Fireworks bills FLUX.1 serverless per inference step: schnell about $0.00035/step
(4 steps = $0.0014/image), dev about $0.0005/step; Kontext pro/max about $0.04/$0.08 per image
(third-party figures). Source: docs/fireworks-api.md, gathered from Fireworks' pricing page and
third-party clients, 2025-11. Override per run (`prices=`) or with FLUX_FLOWS_PRICES as JSON,
e.g. FLUX_FLOWS_PRICES='{"flux-1-dev-fp8": 0.0006}'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from flux_flows.models import DEV, SCHNELL, ImageRequest

PRICES_ENV = "FLUX_FLOWS_PRICES"
PER_STEP_USD: dict[str, float] = {SCHNELL: 0.00035, DEV: 0.0005}
PER_IMAGE_USD: dict[str, float] = {"flux-kontext-pro": 0.04, "flux-kontext-max": 0.08}


def price_table(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-step (FLUX.1) and per-image (Kontext) prices, with env and call overrides applied."""
    table = {**PER_STEP_USD, **PER_IMAGE_USD}
    env = os.environ.get(PRICES_ENV)
    if env:
        try:
            parsed = json.loads(env)
        except ValueError as exc:
            raise ValueError(f"{PRICES_ENV} is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"{PRICES_ENV} must be a JSON object of model name to USD")
        table.update({str(k): float(v) for k, v in parsed.items()})
    table.update({k: float(v) for k, v in (overrides or {}).items()})
    for model, price in table.items():
        if price < 0:
            raise ValueError(f"price for {model} must not be negative, got {price}")
    return table


def estimate_cost(request: ImageRequest, prices: Mapping[str, float] | None = None) -> float:
    """USD for one generation: steps x per-step price, or the per-image price for Kontext."""
    table = prices if prices is not None else price_table()
    if request.model in PER_IMAGE_USD:
        return table.get(request.model, PER_IMAGE_USD[request.model])
    return request.num_inference_steps * table.get(
        request.model, PER_STEP_USD.get(request.model, 0.0)
    )
