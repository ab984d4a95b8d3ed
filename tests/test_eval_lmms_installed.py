"""The lmms-eval plug-in inside lmms-eval itself: its registry finds it, and its evaluator runs a local task with it.
Skipped where lmms-eval (the `lmms` extra) is not installed; test_eval_lmms.py checks the plug-in's own logic."""
import json
import textwrap

import pytest

pytest.importorskip("lmms_eval")


def _image(colour):
    from PIL import Image

    return Image.new("RGB", (30, 20), colour)


@pytest.fixture(scope="module")
def lmms_model(tmp_path_factory):
    from mobilevlm.eval.lmms_plugin import MobileVLM
    from mobilevlm.testing import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("lmms") / "tiny-model")
    return MobileVLM.create_from_arg_string(f"pretrained={checkpoint},conv_template=v1", {"batch_size": 2})


def test_registered_as_mobilevlm():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from mobilevlm.eval.lmms_plugin import MobileVLM, manifests

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    assert get_model("mobilevlm") is MobileVLM
    assert MobileVLM.is_simple


def test_lmms_eval_runs_a_local_task(lmms_model, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for i, colour in enumerate(("red", "blue")):
        _image(colour).save(tmp_path / f"{i}.png")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"image": str(tmp_path / f"{i}.png"), "question": "Colour?", "answer": c}) + "\n"
                                                 for i, c in enumerate(("red", "blue"))))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(textwrap.dedent("""
        from PIL import Image
        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]
        def doc_to_text(doc):
            return doc["question"]
        def process_results(doc, results):
            return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
    """))
    (tasks / "local_colour.yaml").write_text(textwrap.dedent(f"""
        task: mobilevlm_local_colour
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "docs.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """))
    results = simple_evaluate(model=lmms_model, tasks=["mobilevlm_local_colour"], task_manager=TaskManager(include_path=str(tasks)),
                              log_samples=True)
    task_results = results["results"]["mobilevlm_local_colour"]
    assert task_results["exact_match,none"] in (0.0, 0.5, 1.0)
    samples = results["samples"]["mobilevlm_local_colour"]
    assert len(samples) == 2 and all(isinstance(s["resps"][0][0], str) for s in samples)
