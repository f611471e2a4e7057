"""Charged service: the cost, in tokens, that the fair policies charge a client and that every
fairness figure counts. One formula for the policies' meter, the simulator, the server's per-client
counter and the metrics, so that they always measure the same thing."""

from __future__ import annotations

# The default weights, those of VTC's evaluation (Sheng et al., OSDI'24): an output token costs
# more to produce than a prompt token, which a prefill computes in bulk with many others.
W_IN = 1.0
W_OUT = 2.0


def charged_service(uncached_tokens: float, output_tokens: float, w_in: float, w_out: float) -> float:
    """`w_in` per prompt token the server computed (cached ones are free) + `w_out` per output token."""
    return w_in * uncached_tokens + w_out * output_tokens
