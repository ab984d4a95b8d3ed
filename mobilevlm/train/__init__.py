"""Training: stage I / II recipes of MobileVLM and V2, LoRA, MobileLLaMA chat SFT, on transformers' Trainer.

`run_training(args)` runs one stage; `run_pipeline(recipe, ...)` chains stage I, stage II and evaluation.
"""


def run_training(args=None, callbacks=None) -> str:
    from mobilevlm.train.train import run_training as _run

    return _run(args, callbacks)


def run_pipeline(*args, **kwargs):
    from mobilevlm.train.pipeline import run_pipeline as _run

    return _run(*args, **kwargs)
