"""The inference paths on a CUDA GPU (skipped without one): device placement, the lean decoder against the
transformers path, and CPU/GPU agreement. Run on a lent GPU machine; CI has none."""
import pytest
import torch
from PIL import Image

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
