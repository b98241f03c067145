"""A local stand-in for the Fireworks FLUX text_to_image API, speaking the real wire protocol.

The library, its tests, the demo and the benchmarks talk to this server exactly as they talk to
Fireworks (same route, headers, Accept negotiation, error bodies), so the code under test is the
code users run (the stripe-mock / moto idea). It binds to loopback only: it accepts any key when
unconfigured, so it must never be reachable from another machine.

Images are cheap, deterministic placeholders: a seeded gradient and shapes with the prompt and
seed written on them. They depend only on (prompt, seed, width, height), so caching and
"nothing generated twice" can be asserted on bytes.

Knobs (`EmulatorConfig`) add latency, random 429/5xx, a requests-per-minute window and content
filtering. Prompt markers trigger deterministic faults for tests, and stay part of the prompt:

- `[[status:NNN]]`: answer NNN (400-599) with an error body; a 429 also gets `Retry-After`.
- `[[flaky:N]]`: the first N requests for this exact (prompt, seed) get 503.
- `[[fault:drop]]`: headers with the full Content-Length, half the body, then the connection drops.
- `[[fault:truncate]]`: 200 with a consistent Content-Length but the image cut in half.
- `[[fault:garbage]]`: 200 with an image content type whose bytes are not an image.
- `[[fault:html]]`: 200 `text/html` page, as a misbehaving proxy would send.
- `[[fault:json-no-images]]`: 200 JSON with `"base64": []`.
- `[[fault:slow=S]]`: wait S seconds before answering (on top of the configured latency).

FLUX Kontext (`flux-kontext-pro`, `flux-kontext-max`) is asynchronous, as on Fireworks: submit to
`.../models/{model}` answers `{"request_id"}`; `.../models/{model}/get_result` with `{"id"}` answers
`{id, status, result, progress, details}`: `Pending` for `kontext_pending_s`, then `Ready` with
`result.sample`, a URL on this emulator (`/_emulator/results/<id>.<ext>`, plain GET, no key needed,
like a signed URL) and `result.seed`. An unknown id is `Task not found`. An edit's picture is the
input image itself, fitted to the size, tinted per seed, with the prompt drawn on it; an input URL
is not fetched, only hashed. A prompt with a filter word is `Content Moderated` (Kontext always
moderates). Markers, for tests:

- `[[kontext:request-moderated]]`: `Request Moderated` at once (the input was refused).
- `[[kontext:error]]`: `Error` with `details` once pending time is over.
- `[[kontext:not-found-first=N]]`: the first N polls answer `Task not found` (transient).

`[[status:NNN]]` and `[[flaky:N]]` apply to the submit call. A `Ready` or `Content Moderated`
task counts as one generation, once, however often it is polled.

Control routes: `GET /_emulator/stats`, `GET|POST /_emulator/config`, `POST /_emulator/reset`.
They answer only requests addressed to this server (Host 127.0.0.1:PORT or localhost:PORT, no
foreign Origin), and a change needs the `X-Emulator-Token` header (`Emulator.control_token`,
printed by `flux-flows emulator`), so neither a web page nor another program can switch the key
check off. In-process code calls `Emulator.configure` instead. See `control`.
"""

from flux_flows.emulator.app import create_app
from flux_flows.emulator.config import API_PREFIX as API_PREFIX
from flux_flows.emulator.config import DEFAULT_ASPECT_RATIO as DEFAULT_ASPECT_RATIO
from flux_flows.emulator.config import DEFAULT_GUIDANCE as DEFAULT_GUIDANCE
from flux_flows.emulator.config import DEFAULT_JPEG_QUALITY as DEFAULT_JPEG_QUALITY
from flux_flows.emulator.config import DEFAULT_PORT as DEFAULT_PORT
from flux_flows.emulator.config import GENERATION_PATH, EmulatorConfig, EmulatorStats
from flux_flows.emulator.config import (
    KONTEXT_DEFAULT_SAFETY_TOLERANCE as KONTEXT_DEFAULT_SAFETY_TOLERANCE,
)
from flux_flows.emulator.config import KONTEXT_MAX_BODY_BYTES as KONTEXT_MAX_BODY_BYTES
from flux_flows.emulator.config import KONTEXT_MAX_TASKS as KONTEXT_MAX_TASKS
from flux_flows.emulator.config import KONTEXT_RESULT_PATH as KONTEXT_RESULT_PATH
from flux_flows.emulator.config import KONTEXT_SUBMIT_PATH as KONTEXT_SUBMIT_PATH
from flux_flows.emulator.config import MAX_BODY_BYTES as MAX_BODY_BYTES
from flux_flows.emulator.config import RATE_WINDOW_S as RATE_WINDOW_S
from flux_flows.emulator.config import RESULTS_PATH as RESULTS_PATH
from flux_flows.emulator.config import Mode as Mode
from flux_flows.emulator.control import CONTROL_TOKEN_HEADER as CONTROL_TOKEN_HEADER
from flux_flows.emulator.parsing import negotiate as negotiate
from flux_flows.emulator.pictures import draw_picture
from flux_flows.emulator.server import Emulator, serve

# `__all__` is unchanged by the split into modules. The names re-exported `X as X` above were
# public names of the single-file module, read by tests and tools as `flux_flows.emulator.X`;
# they stay importable from here, and stay out of `import *` as before.
__all__ = [
    "GENERATION_PATH",
    "Emulator",
    "EmulatorConfig",
    "EmulatorStats",
    "create_app",
    "draw_picture",
    "serve",
]
