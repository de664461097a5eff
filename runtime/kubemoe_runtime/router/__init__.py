"""The router: the OpenAI-compatible front door of a deployment (`kubemoe-runtime serve --role router`).

main.py        flags -> RouterSettings; runs uvicorn
app.py         the HTTP app: the routes over a Router, OpenAI-shaped errors
proxy.py       the Router: colocated forwarding, or vLLM's P/D proxy protocol (prefill, then decode)
checks.py      what the router reads of a request: the API key, the body, the prompt's token estimate
dispatch.py    one request to a backend of a role: the policy's pick, retries on another, ejection
relay.py       a backend's answer back to the client: whole, as SSE events, or relayed as it comes
models.py      /v1/models: the served names with the backends' max_model_len
kv_release.py  P/D: a prefill's KV that no decode will fetch, released (a signed DELETE)
upstream.py    the HTTP/1.1 client to the backends: kept-alive connections, bounded reads
backends.py    each role's backends: DNS discovery (a headless Service, refreshed), health, ejection
policies.py    round-robin, least-load (fewest outstanding requests), prefix-hash (consistent hashing
               with bounded load)
auth.py        optional API keys from a file (a mounted Secret), re-read when it changes
metrics.py     Prometheus series: requests, TTFT, ITL, in flight, per-backend errors and health
"""
