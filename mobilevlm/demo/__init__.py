"""The demo: train a tiny MobileVLM from nothing on generated shape-and-word images, then evaluate it.

Everything here is deterministic from one seed: the scenes (`scenes`), the questions about them (`questions`),
the training sets (`trainsets`), the six benchmark-format evaluation sets (`benchmarks`), the pre-trained
tokenizer / vision tower / language model (`bases`) and the orchestration of the real pipeline (`pipeline`).
"""
