"""The lmms-eval plug-in. Its own logic (prompts, decoding settings, batching, log-likelihoods, the entry point)
runs against a minimal stand-in for the two lmms-eval names it imports, so it is checked without lmms-eval; the
registry lookup and a run of lmms-eval's evaluator are in test_eval_lmms_installed.py (skipped without lmms-eval)."""
import importlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def plugin():
    """mobilevlm.eval.lmms_plugin imported against a stand-in lmms-eval: the `lmms` base class and `ModelManifest`."""
    names = ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.models", "lmms_eval.models.registry_v2")
    stand_in = {name: types.ModuleType(name) for name in names}
    stand_in["lmms_eval.api.model"].lmms = type("lmms", (), {})
    stand_in["lmms_eval.models.registry_v2"].ModelManifest = SimpleNamespace
    with pytest.MonkeyPatch.context() as patch:
        for name, module in stand_in.items():
            patch.setitem(sys.modules, name, module)
        patch.delitem(sys.modules, "mobilevlm.eval.lmms_plugin", raising=False)
        yield importlib.import_module("mobilevlm.eval.lmms_plugin")
        sys.modules.pop("mobilevlm.eval.lmms_plugin", None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mobilevlm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("lmms") / "tiny-model")


@pytest.fixture(scope="module")
def model(plugin, checkpoint):
    return plugin.MobileVLM(pretrained=str(checkpoint), conv_template="v1", batch_size=2)


def _image(colour):
    from PIL import Image

    return Image.new("RGB", (30, 20), colour)


def _request(context, second, doc_id, visual=lambda doc: [_image(doc["colour"])]):
    return SimpleNamespace(args=(context, second, visual, doc_id, "local", "test"))


def test_entry_point_names_the_manifests(plugin):
    import tomllib
    from importlib.metadata import entry_points
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["lmms_eval.models"]["mobilevlm"] == "mobilevlm.eval.lmms_plugin:manifests"
    [manifest] = plugin.manifests()
    assert manifest.model_id == "mobilevlm" and manifest.simple_class_path == "mobilevlm.eval.lmms_plugin.MobileVLM"
    found = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "mobilevlm"]
    if not found:
        pytest.skip("the installed package metadata predates the entry point (reinstall: pip install -e .)")
    assert found[0].load() is plugin.manifests


def test_unknown_model_args_are_refused(plugin, checkpoint):
    with pytest.raises(TypeError, match="unknown mobilevlm model_args: temprature"):
        plugin.MobileVLM(pretrained=str(checkpoint), temprature=0)


def test_task_settings_become_pipeline_settings(plugin):
    assert plugin.MobileVLM._settings({"until": "\n\n", "temperature": 0.7, "do_sample": False}) == dict(
        temperature=0, top_p=None, num_beams=1, max_new_tokens=plugin.DEFAULT_MAX_NEW_TOKENS, stop=["\n\n"])
    assert plugin.MobileVLM._settings({"temperature": 0.5, "top_p": 0.9, "num_beams": None, "max_new_tokens": 7}) == dict(
        temperature=0.5, top_p=0.9, num_beams=1, max_new_tokens=7, stop=[])


def test_generate_until_matches_the_pipeline(model):
    docs = [{"q": "What colour is it?", "colour": "red"}, {"q": "<image>\nIs it blue?", "colour": "blue"},
            {"q": "Describe it.", "colour": "green"}, {"q": "Name the colour.", "colour": "red"}]
    model.task_dict = {"local": {"test": docs}}
    # request 0 goes alone (1 has other settings); 1-2 fill a batch of two; 3 is text only
    settings = [{"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}] + [{"max_new_tokens": 3, "until": "."}] * 3
    requests = [_request(doc["q"], settings[i], i) for i, doc in enumerate(docs[:3])]
    requests.append(_request(docs[3]["q"], settings[3], 3, visual=None))
    outputs = model.generate_until(requests)
    pipe = model.pipe
    expected = [pipe.generate(pipe.build_prompt(doc["q"].replace("<image>\n", "")), [_image(doc["colour"])],
                              max_new_tokens=s["max_new_tokens"], stop=[s["until"]] if isinstance(s["until"], str) else s["until"])
                for doc, s in zip(docs[:3], settings)]
    expected.append(pipe.generate(pipe.build_prompt(docs[3]["q"], num_images=0), max_new_tokens=3, stop=["."]))
    assert outputs == expected


def test_loglikelihood_is_the_continuation_log_probability(model):
    from mobilevlm.processing import tokenizer_image_token

    model.task_dict = {"local": {"test": [{"colour": "red"}]}}
    [(logprob, greedy)] = model.loglikelihood([_request("What colour is it?", "red square", 0)])
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
