"""Export MobileVLM / MobileLLaMA checkpoints to the two GGUF files llama.cpp runs.

`mobilevlm.export.gguf_export.export_gguf` is the entry point; this package module stays import-light because
the CLI imports `mobilevlm.export.cli` (and so this file) just to list its verbs.
"""
