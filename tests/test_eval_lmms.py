"""The lmms-eval plug-in: registry entry, generate_until / loglikelihood on a tiny model, and a run of
lmms-eval's evaluator on a local task. Skipped where lmms-eval (the `lmms` extra) is not installed."""
import json
import textwrap

import pytest

lmms_eval = pytest.importorskip("lmms_eval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mobilevlm.eval.lmms_plugin import MobileVLM
    from mobilevlm.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("lmms")
    checkpoint = make_tiny_checkpoint(root / "tiny-model")
    return checkpoint, MobileVLM.create_from_arg_string(f"pretrained={checkpoint},conv_template=v1", {"batch_size": 2})


def _image(colour):
    from PIL import Image

    return Image.new("RGB", (30, 20), colour)


def test_registered_as_mobilevlm():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from mobilevlm.eval.lmms_plugin import MobileVLM, manifests

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    assert get_model("mobilevlm") is MobileVLM
    assert MobileVLM.is_simple


def test_entry_point_is_declared_and_found():
    import tomllib
    from importlib.metadata import entry_points
    from pathlib import Path

    from mobilevlm.eval.lmms_plugin import MobileVLM

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["lmms_eval.models"]["mobilevlm"] == "mobilevlm.eval.lmms_plugin:manifests"
    if not [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "mobilevlm"]:
        pytest.skip("the installed package metadata predates the entry point (reinstall: pip install -e .)")
    from lmms_eval.models import _initialize_model_registry

    assert _initialize_model_registry().get_model_class("mobilevlm") is MobileVLM


def test_generate_until_matches_the_pipeline(tiny):
    from lmms_eval.api.instance import Instance

    _, model = tiny
    docs = [{"q": "What colour is it?", "colour": "red"}, {"q": "Is it blue?", "colour": "blue"},
            {"q": "Describe it.", "colour": "green"}]
    model.task_dict = {"local": {"test": docs}}
    to_visual = lambda doc: [_image(doc["colour"])]
    requests = [Instance("generate_until", (doc["q"], {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]},
                                            to_visual, i, "local", "test"), i, {"task": "local", "doc_id": i, "repeats": 1})
                for i, doc in enumerate(docs)]
    outputs = model.generate_until(requests)
    pipe = model.pipe
    expected = [pipe.generate(pipe.build_prompt(doc["q"]), [_image(doc["colour"])], max_new_tokens=5, stop=["\n\n"])
                for doc in docs]
    assert outputs == expected


def test_loglikelihood_is_the_continuation_log_probability(tiny):
    import torch

    from lmms_eval.api.instance import Instance
    from mobilevlm.processing import tokenizer_image_token

    _, model = tiny
    model.task_dict = {"local": {"test": [{"colour": "red"}]}}
    args = ("What colour is it?", "red square", lambda doc: [_image(doc["colour"])], 0, "local", "test")
    [(logprob, greedy)] = model.loglikelihood([Instance("loglikelihood", args, 0, {"task": "local", "doc_id": 0, "repeats": 1})])
    pipe = model.pipe
    prompt = pipe.build_prompt("What colour is it?")
    prompt_ids = tokenizer_image_token(prompt, pipe.tokenizer)
    full_ids = tokenizer_image_token(prompt + " red square", pipe.tokenizer)
    _, pixels, _ = pipe.encode(prompt, [_image("red")], 1)
    with torch.inference_mode():
        logits = pipe.model(input_ids=torch.tensor([full_ids]), images=pixels).logits[0]
    n = len(full_ids) - len(prompt_ids)
    steps = torch.log_softmax(logits[-n - 1:-1].float(), -1)
    expected = steps.gather(1, torch.tensor(full_ids[-n:])[:, None]).sum().item()
    assert logprob == pytest.approx(expected, rel=1e-4, abs=1e-4) and logprob < 0
    assert greedy == bool((steps.argmax(-1) == torch.tensor(full_ids[-n:])).all())


def test_lmms_eval_runs_a_local_task(tiny, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, model = tiny
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
    results = simple_evaluate(model=model, tasks=["mobilevlm_local_colour"], task_manager=TaskManager(include_path=str(tasks)),
                              log_samples=True)
    task_results = results["results"]["mobilevlm_local_colour"]
    assert task_results["exact_match,none"] in (0.0, 0.5, 1.0)
    samples = results["samples"]["mobilevlm_local_colour"]
    assert len(samples) == 2 and all(isinstance(s["resps"][0][0], str) for s in samples)
