"""Run exported GGUF files in llama.cpp itself (through llama-cpp-python) to prove an export works.

Greedy decoding only: the point is a deterministic comparison with this project's model, not a chat client
(use llama.cpp's `llama-mtmd-cli` for that, see docs/export.md). The multimodal path is llama.cpp's own:
`mtmd_tokenize` splits the prompt at the media marker, `mtmd_helper_eval_chunks` encodes the image with the
mmproj and feeds text and image embeddings to the language model, exactly as `llama-mtmd-cli` does.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from mobilevlm.constants import IMAGE_TOKEN_INDEX
from mobilevlm.errors import CheckpointError

MEDIA_MARKER = "<__media__>"  # llama.cpp's default marker; MobileVLM's "<image>" is plain text to llama.cpp


class LlamaCppVLM:
    """A language-model GGUF (+ optional mmproj GGUF) loaded in llama.cpp on the CPU."""

    def __init__(self, model_path: str | os.PathLike, mmproj_path: str | os.PathLike | None = None,
                 n_ctx: int = 1024, n_threads: int = 1):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._lib, self._mtmd_lib = llama_cpp, mtmd_cpp
        try:
            self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                                       logits_all=True, verbose=False)
        except ValueError as err:  # llama-cpp-python's way of saying the loader rejected the file
            raise CheckpointError(f"{model_path}: llama.cpp could not load it ({err})") from err
        self.n_batch = n_ctx
        self.mtmd = None
        if mmproj_path is not None:
            from llama_cpp._logger import llama_log_callback

            # mtmd logs straight to stderr by default; llama-cpp-python's callback honours verbose=False.
            mtmd_cpp.mtmd_log_set(llama_log_callback, None)
            mtmd_cpp.mtmd_helper_log_set(llama_log_callback, None)
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu = False
            params.n_threads = n_threads
            params.print_timings = False
            self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
            if not self.mtmd:
                raise CheckpointError(f"{mmproj_path}: llama.cpp could not load it as an mmproj for {model_path}")

    def close(self) -> None:
        if self.mtmd:
            self._mtmd_lib.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llm.close()

    def __enter__(self) -> "LlamaCppVLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization with BOS, special tokens such as `</s>` parsed."""
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def text_logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] logits of a text-only prompt."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def greedy_text(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        return self._greedy(lambda: self.llm.scores[self.llm.n_tokens - 1], lambda t: self.llm.eval([t]), max_new_tokens)

    def _eos(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._lib.llama_model_get_vocab(self.llm.model), token))

    def _greedy(self, last_logits, feed, max_new_tokens: int) -> list[int]:
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(last_logits()))
            out.append(token)
            if self._eos(token):
                break
            feed(token)
        return out

    # --- multimodal -------------------------------------------------------------------------------------
    def _chunks(self, prompt: str, image):
        m = self._mtmd_lib
        if self.mtmd is None:
            raise CheckpointError("no mmproj loaded: pass mmproj_path to use images")
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        chunks = m.mtmd_input_chunks_init()
        encoded = prompt.encode()
        text = m.mtmd_input_text(text=encoded, text_len=len(encoded), add_special=True, parse_special=True)
        status = m.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        m.mtmd_bitmap_free(bitmap)
        if status != 0:
            m.mtmd_input_chunks_free(chunks)
            raise CheckpointError(f"llama.cpp could not tokenize the prompt with one image (status {status}); "
                                  f"the prompt needs exactly one {MEDIA_MARKER}")
        return chunks

    def _each_chunk(self, chunks):
        m = self._mtmd_lib
        for i in range(m.mtmd_input_chunks_size(chunks)):
            yield m.mtmd_input_chunks_get(chunks, i)

    def prompt_ids(self, prompt: str, image) -> list[int]:
        """The ids llama.cpp feeds for `prompt`, with one IMAGE_TOKEN_INDEX where the image embeddings go."""
        m = self._mtmd_lib
        chunks = self._chunks(prompt, image)
        ids: list[int] = []
        try:
            for chunk in self._each_chunk(chunks):
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    tokens = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    ids += [tokens[i] for i in range(n.value)]
                else:
                    ids.append(IMAGE_TOKEN_INDEX)
        finally:
            m.mtmd_input_chunks_free(chunks)
        return ids

    def image_embeddings(self, image) -> np.ndarray:
        """[n_image_tokens, n_embd]: the mmproj's output for `image` (vision tower + projector)."""
        m = self._mtmd_lib
        chunks = self._chunks(MEDIA_MARKER, image)
        try:
            chunk = next(c for c in self._each_chunk(chunks)
                         if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            if m.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                raise CheckpointError("llama.cpp failed to encode the image")
            n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
            n_embd = self._lib.llama_model_n_embd(self.llm.model)
            flat = np.ctypeslib.as_array(m.mtmd_get_output_embd(self.mtmd), shape=(n_tokens * n_embd,))
            return flat.copy().reshape(n_tokens, n_embd)
        finally:
            m.mtmd_input_chunks_free(chunks)

    def greedy_multimodal(self, prompt: str, image, max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt` (containing MEDIA_MARKER) with `image`, through mtmd's eval path."""
        lib, m = self._lib, self._mtmd_lib
        ctx = self.llm.ctx
        self.llm.reset()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        chunks = self._chunks(prompt, image)
        n_past = lib.llama_pos(0)
        try:
            status = m.mtmd_helper_eval_chunks(self.mtmd, ctx, chunks, 0, 0, self.n_batch, True, ctypes.byref(n_past))
        finally:
            m.mtmd_input_chunks_free(chunks)
        if status != 0:
            raise CheckpointError(f"llama.cpp failed to evaluate the image prompt (status {status})")
        n_vocab = self.llm.n_vocab()

        def last_logits():
            return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

        def feed(token: int) -> None:
            if lib.llama_decode(ctx, lib.llama_batch_get_one((lib.llama_token * 1)(token), 1)) != 0:
                raise CheckpointError("llama.cpp failed to decode a generated token")

        return self._greedy(last_logits, feed, max_new_tokens)
