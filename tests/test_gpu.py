"""The inference paths on a CUDA GPU (skipped without one): device placement, the lean decoder against the
transformers path, and CPU/GPU agreement. Run on a lent GPU machine; CI has none."""
import pytest
import torch
from PIL import Image

from mobilevlm.fast.decoder import LeanDecoder
from mobilevlm.fast.pipeline import FastPipeline
from mobilevlm.generation import GenerationSettings, Pipeline
from mobilevlm.testing import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMAGE = Image.new("RGB", (120, 90), (200, 30, 40))
QUESTION = "Is there a blue triangle? Please answer yes or no."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "tiny_v2", "tiny_v2", seed=5)


def _ids(pipe, n=24):
    ids, pixels, budget = pipe.encode(pipe.build_prompt(QUESTION, num_images=1), [IMAGE], n)
    return pipe._generate_ids([ids], pixels, GenerationSettings(max_new_tokens=n), budget)[0].tolist()


def test_default_dtype_on_gpu_is_fp16_and_everything_is_on_the_gpu(checkpoint):
    pipe = Pipeline.from_pretrained(checkpoint, device="cuda")
    assert {p.device.type for p in pipe.model.parameters()} == {"cuda"}
    assert pipe.model.dtype == torch.float16
    assert len(_ids(pipe)) == 24


def test_gpu_logits_equal_cpu_logits_in_fp32(checkpoint):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = Pipeline.from_pretrained(checkpoint, device="cpu", dtype="float32")
    gpu = Pipeline.from_pretrained(checkpoint, device="cuda", dtype="float32")
    ids, pixels, _ = cpu.encode(cpu.build_prompt(QUESTION, num_images=1), [IMAGE], 8)
    with torch.inference_mode():
        expected = cpu.model(input_ids=torch.tensor([ids]), images=pixels).logits
        got = gpu.model(input_ids=torch.tensor([ids], device="cuda"), images=pixels.cuda()).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decoder_on_gpu_gives_the_transformers_greedy_tokens(checkpoint, dtype):
    reference = Pipeline.from_pretrained(checkpoint, device="cuda", dtype=dtype)
    fast = FastPipeline.from_pretrained(checkpoint, device="cuda", dtype=dtype)
    assert fast.decoder.k_cache.device.type == "cuda"
    assert _ids(fast) == _ids(reference)


def test_cuda_graph_steps_equal_eager_steps(checkpoint):
    fast = FastPipeline.from_pretrained(checkpoint, device="cuda", dtype="float32")
    assert fast.decoder.cuda_graph
    eager = LeanDecoder(fast.model, fast.decoder.max_len, cuda_graph=False)
    embeds = fast.decoder.embed_prompt(list(range(3, 40)), None)
    for decoder in (fast.decoder, eager):  # two sequences: the graph outlives a new prefill
        decoder.prefill(embeds[:5])
        decoder.step(7)
    graphed, plain = fast.decoder.prefill(embeds), eager.prefill(embeds)
    for token in range(50, 70):
        torch.testing.assert_close(graphed, plain, atol=1e-4, rtol=1e-4)
        graphed, plain = fast.decoder.step(token), eager.step(token)
    assert fast.decoder._graph is not None


def test_generate_command_on_gpu_streams_the_lean_decoders_answer(checkpoint, tmp_path, capsys):
    # `mobilevlm generate --device cuda` runs FastPipeline; its streaming runs generation in a second thread, where
    # the CUDA graph is captured
    from mobilevlm.cli import main

    IMAGE.save(tmp_path / "red.png")
    reference = Pipeline.from_pretrained(checkpoint, device="cuda")  # fp16, the GPU default
    expected = reference.generate(reference.build_prompt(QUESTION, num_images=1), [IMAGE], max_new_tokens=16)
    assert main(["generate", "--model", str(checkpoint), "--image", str(tmp_path / "red.png"), "--prompt", QUESTION,
                 "--device", "cuda", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
