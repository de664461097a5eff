"""`kubemoe-runtime fill-cache`: fill a model cache folder once from the Hugging Face Hub, with progress.

    kubemoe-runtime fill-cache --source hf://ORG/NAME[@REVISION] --dir DIR [--port 8080] [--linger S]

The operator runs it in a Job that fills a volume before the serving groups start (#20); the groups then
load DIR as a local model path, as any engine can: DIR is a plain folder of the repository's top-level
files that an engine needs:

    *.safetensors   the weights: with `model.safetensors.index.json`, exactly the shards it names (a repo
                    that also ships another layout, e.g. Mistral's consolidated.safetensors, is not fetched
                    twice); without safetensors, the PyTorch weights (*.bin, *.pt, *.pth) instead
    *.json          config.json, generation_config.json, the index, tokenizer.json, tokenizer_config.json ...
    tokenizer files *.model, *.tiktoken, vocab.txt, merges.txt, *.jinja (chat templates), and *.py (the
                    code of a model that needs --trust-remote-code; inert otherwise)

Never hidden files (.gitattributes), subfolders (a repo's original/ or metal/ copies), *.gguf, *.onnx,
README, images. Files are fetched one at a time, in the listing's order, smallest first.

State, all in DIR:
    .kubemoe-cache.json   written last: {source, revision (the commit), files: [{path, size}], bytes}.
                          When it names this --source and every file it lists is there with its size, the
                          command exits 0 at once without reaching the Hub.
    .cache/huggingface/   huggingface_hub's record of each file's commit and etag: an interrupted fill
                          resumes (a complete file of the same commit is kept, not fetched again).
    .kubemoe-fill.lock    locked (flock) for the whole fill: a second fill of DIR (two ModelDeployments
                          sharing a claim and source, a new Job's pod while the old one terminates) says it
                          waits, waits, then finds the marker complete and exits 0 (or fills what is left).

Progress: one line per file on stderr and at least every PROGRESS_EVERY_S while downloading (files done of
total, bytes done of total), and `GET /progress` on --port (all addresses) for the whole run:
    {"phase": "listing"|"downloading"|"done"|"failed", "files", "filesTotal", "bytes", "bytesTotal",
     "message"}
--linger S keeps /progress up S seconds after the end, so a poller sees "done" or "failed".

Outcome: exit 0 and a one-line JSON summary on stdout; or ONE line on stderr naming the problem and the
fix (`kubemoe-runtime fill-cache: error: ...`), never a traceback (KUBEMOE_DEBUG=1 adds it), exit 1 (2
for a bad --source). Either line is also written to the termination log (Kubernetes'
terminationMessagePath, /dev/termination-log; KUBEMOE_TERMINATION_LOG names another) when that file
exists and is writable, so the operator can show it without reading logs.

Why huggingface_hub (the library transformers and vLLM download with, already in both runtime images):
it speaks the Hub as it is (HF_ENDPOINT, HF_TOKEN, redirects to the CDN, Xet storage through hf_xet,
retries with resume inside a file, the errors that tell a gated repo from a missing one), which a
hand-written client would have to chase. We use its public calls only: `HfApi.model_info` (the commit a
revision names), `HfApi.list_repo_tree` (file names with sizes, top level), and `hf_hub_download(...,
local_dir=DIR)` per file, counting bytes through its `tqdm_class` hook. `snapshot_download` is not used:
it downloads in parallel threads with no per-file hook, and cannot select the shards an index names.

The source and the listing are untrusted: --source must be hf://ORG/NAME[@REVISION] with the Hub's
characters; a listed name is used only if it is a plain file name (no separators, no `..`, not hidden), so
every path stays inside DIR; an index that names a shard the listing lacks is an error; an index the
listing says is over 64 MiB is refused before it is downloaded, and one refused after is removed.

The package, a module for each part:
    command.py   the command line: flags, main (the run, its outcome line), SIGTERM
    source.py    --source, checked; which listed files to fetch; the safetensors index's shards
    hub.py       which Hub: HF_ENDPOINT or huggingface.co
    fill.py      the fill: listing, space check, downloads (a size mismatch is an error), the marker last
    lock.py      DIR's lock: one fill of a folder at a time, the next one waiting
    marker.py    .kubemoe-cache.json: read, checked against DIR, written
    progress.py  Progress, GET /progress, the lines on stderr
    errors.py    FillError, UsageError; any error as one line that names the fix; the termination log
"""

from kubemoe_runtime.tools.model_cache.command import main
from kubemoe_runtime.tools.model_cache.errors import FillError, UsageError, explain
from kubemoe_runtime.tools.model_cache.marker import MARKER
from kubemoe_runtime.tools.model_cache.progress import Progress, ProgressServer, ticking
from kubemoe_runtime.tools.model_cache.source import (
    CacheFile,
    Source,
    index_shards,
    parse_source,
    select_files,
)

__all__ = [
    "MARKER",
    "CacheFile",
    "FillError",
    "Progress",
    "ProgressServer",
    "Source",
    "UsageError",
    "explain",
    "index_shards",
    "main",
    "parse_source",
    "select_files",
    "ticking",
]
