"""The router: the OpenAI-compatible front door of a deployment (`kubemoe-runtime serve --role router`).

main.py      flags -> RouterSettings; runs uvicorn
proxy.py     the HTTP app: colocated forwarding, or vLLM's P/D proxy protocol (prefill, then decode)
backends.py  each role's backends: DNS discovery (a headless Service, refreshed), health, ejection
policies.py  round-robin, least-load (fewest outstanding requests), prefix-hash (consistent hashing
             with bounded load)
auth.py      optional API keys from a file (a mounted Secret), re-read when it changes
metrics.py   Prometheus series: requests, TTFT, ITL, in flight, per-backend errors and health
"""
