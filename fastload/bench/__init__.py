"""The benchmark harness behind ``fastload bench`` (nothing here runs or imports extras at import).

- ``checkpoint`` — cached Llama-shaped synthetic checkpoint (shards + index + config.json)
- ``servers`` — nginx / Python Range server (HTTP), SeaweedFS (S3) on 127.0.0.1
- ``loaders`` — ``Source``, fastload and the baselines, the loader registry
- ``others`` — transformers, Run:ai Model Streamer, fastsafetensors, tensorizer
- ``measure`` — one child process per loader and source: malloc settings, eviction, faults, peak RSS
- ``suite`` — rows × loaders, ``run(Options)``
- ``report`` — JSON lines, Markdown, PNG
- ``command`` — the ``fastload bench`` arguments

``import fastload`` does not import this package.
"""
