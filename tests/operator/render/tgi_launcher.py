"""TGI's launcher options as TGI documents them (text-generation-inference, docs/source/reference/
launcher.md: `text-generation-launcher --help`). TGI is a Rust launcher that is not on PyPI, so the
rendered TGI commands are checked against this list rather than a parser: render only."""

from __future__ import annotations

from typing import Final

# flag -> takes a value (False: a switch)
TGI_LAUNCHER_OPTIONS: Final[dict[str, bool]] = {
    "--model-id": True,
    "--revision": True,
    "--validation-workers": True,
    "--sharded": True,
    "--num-shard": True,
    "--quantize": True,
    "--speculate": True,
    "--dtype": True,
    "--kv-cache-dtype": True,
    "--trust-remote-code": False,
    "--max-concurrent-requests": True,
    "--max-best-of": True,
    "--max-stop-sequences": True,
    "--max-top-n-tokens": True,
    "--max-input-tokens": True,
    "--max-input-length": True,
    "--max-total-tokens": True,
    "--waiting-served-ratio": True,
    "--max-batch-prefill-tokens": True,
    "--max-batch-total-tokens": True,
    "--max-waiting-tokens": True,
    "--max-batch-size": True,
    "--cuda-graphs": True,
    "--hostname": True,
    "--port": True,
    "--shard-uds-path": True,
    "--master-addr": True,
    "--master-port": True,
    "--huggingface-hub-cache": True,
    "--weights-cache-override": True,
    "--disable-custom-kernels": False,
    "--cuda-memory-fraction": True,
    "--rope-scaling": True,
    "--rope-factor": True,
    "--json-output": False,
    "--otlp-endpoint": True,
    "--otlp-service-name": True,
    "--cors-allow-origin": True,
    "--api-key": True,
    "--watermark-gamma": True,
    "--watermark-delta": True,
    "--ngrok": False,
    "--ngrok-authtoken": True,
    "--ngrok-edge": True,
    "--tokenizer-config-path": True,
    "--disable-grammar-support": False,
    "--env": False,
    "--max-client-batch-size": True,
    "--lora-adapters": True,
    "--usage-stats": True,
    "--payload-limit": True,
    "--enable-prefill-logprobs": False,
}
TGI_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "--dtype": ("float16", "bfloat16"),
    "--sharded": ("true", "false"),
}
