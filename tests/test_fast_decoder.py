"""The lean decoder and FastPipeline against the transformers path of Pipeline (tiny checkpoints)."""
import pytest
import torch
from PIL import Image
from transformers import LlamaForCausalLM

from mobilevlm.fast.decoder import LeanDecoder
from mobilevlm.fast.pipeline import FastPipeline, sample_next
from mobilevlm.generation import GenerationSettings, Pipeline
from mobilevlm.testing import make_tiny_checkpoint, make_tiny_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return {preset: make_tiny_checkpoint(root / preset, preset, seed=5) for preset in ("tiny_v2", "tiny_llama")}


def _ids(pipe, prompt, images, n=24):
    ids, pixels, budget = pipe.encode(prompt, images, n)
    return pipe._generate_ids([ids], pixels, GenerationSettings(max_new_tokens=n), budget)[0].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny_v2", "tiny_llama"])
def test_greedy_tokens_equal_transformers_path(checkpoints, preset, dtype):
    reference = Pipeline.from_pretrained(checkpoints[preset], dtype=dtype)
    fast = FastPipeline.from_pretrained(checkpoints[preset], dtype=dtype)
    images = [Image.new("RGB", (120, 90), (200, 30, 40))] if preset == "tiny_v2" else []
    for question in ("What is in the image?", "Is there a blue triangle? Please answer yes or no."):
        prompt = reference.build_prompt(question, num_images=len(images))
        expected = _ids(reference, prompt, images)
        assert len(expected) == 24
        assert _ids(fast, prompt, images) == expected


@pytest.mark.parametrize("fixed_shape", [False, True], ids=["sliced", "fixed-shape"])
def test_prefill_and_steps_match_full_forward(fixed_shape):
    # fixed-shape is the step a CUDA graph replays; on the CPU it runs eagerly and must compute the same
    model = make_tiny_model("tiny_llama", seed=2)
    decoder = LeanDecoder(model, max_len=64, cuda_graph=fixed_shape)
    ids = list(range(3, 40))
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0]
    logits = decoder.prefill(decoder.embed_prompt(ids[:30], None))
    torch.testing.assert_close(logits, full[29], atol=1e-4, rtol=1e-4)
    for position in range(30, len(ids)):
        logits = decoder.step(ids[position])
        torch.testing.assert_close(logits, full[position], atol=1e-4, rtol=1e-4)
    # a new prefill starts a new sequence (the cache is reused, not appended to)
    torch.testing.assert_close(decoder.prefill(decoder.embed_prompt(ids[:30], None)), full[29], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_fusion_keeps_model_weights_shared_and_unchanged(mode):
    from mobilevlm.fast import native
    from mobilevlm.fast.quantize import quantize_model

    if mode == "int8" and not native.available():
        pytest.skip("int8 weights are fused only on the native VNNI kernel")
    model = quantize_model(make_tiny_model("tiny_llama", seed=2), mode, group_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decoder = LeanDecoder(model, max_len=16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fused = decoder.layers[0].qkv._packed
    q_rows = model.model.layers[0].self_attn.q_proj._packed.shape[0]
    assert model.model.layers[0].self_attn.k_proj._packed.data_ptr() == fused[q_rows:].data_ptr()


def test_context_overflow_is_a_clear_error():
    from mobilevlm.errors import PromptError

    decoder = LeanDecoder(make_tiny_model("tiny_llama"), max_len=8)
    decoder.prefill(decoder.embed_prompt(list(range(3, 11)), None))
    with pytest.raises(PromptError, match="context is 8"):
        decoder.step(5)


def test_stream_stop_strings_and_sampling(checkpoints):
    fast = FastPipeline.from_pretrained(checkpoints["tiny_llama"], dtype="float32")
    prompt = fast.build_prompt("Hello world! How are you today?", num_images=0)
    full = fast.generate(prompt, max_new_tokens=16)
    assert "".join(fast.stream(prompt, max_new_tokens=16)) .strip() == full
    if len(full) > 4:
        stop = full[2:4]
        assert stop not in fast.generate(prompt, max_new_tokens=16, stop=[stop])
    torch.manual_seed(0)
    first = fast.generate(prompt, max_new_tokens=12, temperature=0.9, top_p=0.9)
    torch.manual_seed(0)
    assert fast.generate(prompt, max_new_tokens=12, temperature=0.9, top_p=0.9) == first
    # beam search and batches go through the transformers path: transformers' own beam search on the same weights
    ids = torch.tensor([fast.encode(prompt, None, 6)[0]])
    reference = Pipeline.from_pretrained(checkpoints["tiny_llama"], dtype="float32").model
    with torch.inference_mode():
        beams = [LlamaForCausalLM.generate(reference, ids, num_beams=n, do_sample=False, max_new_tokens=6,
                                           eos_token_id=fast.tokenizer.eos_token_id,
                                           pad_token_id=fast.tokenizer.pad_token_id)[0, ids.shape[1]:]
                 for n in (2, 1)]
    assert beams[0].tolist() != beams[1].tolist()  # the beams find another answer than greedy here
    assert fast.generate(prompt, max_new_tokens=6, num_beams=2) == fast.tokenizer.decode(beams[0], skip_special_tokens=True).strip()
    assert fast.generate_batch([(prompt, None), (prompt, None)], max_new_tokens=8) == [fast.generate(prompt, max_new_tokens=8)] * 2


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    settings = GenerationSettings(temperature=1.0, top_p=0.5)
    torch.manual_seed(0)
    assert {sample_next(logits, settings) for _ in range(50)} == {0}
    settings = GenerationSettings(temperature=1.0, top_p=0.99)
    assert {sample_next(logits, settings) for _ in range(200)} == {0, 1}
    assert sample_next(logits, GenerationSettings()) == 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_transformers_path_and_lean_path_agree(checkpoints, mode):
    """`mobilevlm chat --quantize` quantizes the Pipeline's model in place; FastPipeline decodes the same weights."""
    from mobilevlm.fast.quantize import quantize_model

    reference = Pipeline.from_pretrained(checkpoints["tiny_v2"], dtype="bfloat16")
    quantize_model(reference.model, mode, group_size=32)
    fast = FastPipeline.from_pretrained(checkpoints["tiny_v2"], quantize=mode, group_size=32)
    images = [Image.new("RGB", (50, 70), (20, 40, 220))]
    prompt = reference.build_prompt("What is in the image?")
    expected = _ids(reference, prompt, images, 12)
    assert _ids(fast, prompt, images, 12) == expected


def test_int_weights_on_a_gpu_are_refused_before_loading(checkpoints):
    from mobilevlm.errors import MobileVLMError

    with pytest.raises(MobileVLMError, match="CPU only"):
        FastPipeline.from_pretrained(checkpoints["tiny_llama"], device="cuda", quantize="int4")
