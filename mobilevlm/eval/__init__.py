"""Benchmark evaluation as MobileVLM reports it: GQA, ScienceQA-IMG, TextVQA, POPE, MME, MMBench.

Kept import-light (the CLI imports this package to register its verbs); see `scoring` for the
scorers, `benchmarks` for the question readers, `generate`/`launcher` for answer files and
`evaluate.run_evaluation` for the whole model-zoo row.
"""

# Model-zoo column order.
BENCHMARKS = ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")
