"""The tokenizer and chat template of the language-model GGUF.

llama.cpp re-implements SentencePiece from the vocabulary stored in the GGUF (pieces, scores, types), so
exporting `tokenizer.model` piece by piece gives the same ids as the project's legacy tokenizer. The chat
template is generated from the project's own `v1` conversation so the two cannot drift apart.
"""
from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFWriter, TokenType
from gguf.vocab import SentencePieceVocab

from mobilevlm.errors import CheckpointError

# The conversation every MobileVLM stage-II / inference prompt uses (mobilevlm.md section 5.3).
CHAT_CONV_MODE = "v1"


def chat_template(eos_piece: str) -> str:
    """A Jinja chat template that renders the `v1` conversation exactly as `Conversation.get_prompt` does.

    A leading `system` message replaces the default system prompt; user / assistant turns follow the
    TWO separator style (" " after a user turn, the EOS piece after an assistant turn).
    """
    from mobilevlm.conversation import conv_templates

    conv = conv_templates[CHAT_CONV_MODE]
    user, assistant = conv.roles
    lit = json.dumps  # a JSON string literal is a valid Jinja string literal
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {lit(conv.system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        f"{{{{- system + {lit(conv.sep)} -}}}}"
        "{%- for message in turns -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {lit(user + ': ')} + message['content'] + {lit(conv.sep)} -}}}}"
        f"{{%- else -%}}{{{{- {lit(assistant + ': ')} + message['content'] + {lit(eos_piece)} -}}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {lit(assistant + ':')} -}}}}{{%- endif -%}}"
    )


def add_tokenizer(writer: GGUFWriter, model_dir: Path, vocab_size: int, pad_token_id: int | None) -> None:
    """Write tokenizer.ggml.* (pieces, scores, types, special ids) and the chat template from `tokenizer.model`."""
    if not (model_dir / "tokenizer.model").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.model; the GGUF needs the SentencePiece vocabulary")
    try:
        vocab = SentencePieceVocab(model_dir)
    except Exception as err:  # sentencepiece raises bare RuntimeError/OSError for unreadable models
        raise CheckpointError(f"{model_dir / 'tokenizer.model'}: cannot load the SentencePiece model ({err})") from err
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(token_type))
    if len(tokens) > vocab_size:
        raise CheckpointError(
            f"{model_dir}: tokenizer has {len(tokens)} tokens but config.json vocab_size is {vocab_size} "
            "(the embedding has no row for the extra ids)"
        )
    # Embedding rows beyond the tokenizer (padded vocabularies) get placeholder pieces llama.cpp never emits.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    seen: dict[bytes, int] = {}
    for i, text in enumerate(tokens):
        if text in seen:
            raise CheckpointError(
                f"{model_dir}: token {text.decode(errors='replace')!r} appears twice (ids {seen[text]} and {i}); "
                "llama.cpp refuses vocabularies with duplicate pieces"
            )
        seen[text] = i

    sp = vocab.sentencepiece_tokenizer
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, token_id in ((writer.add_bos_token_id, sp.bos_id()), (writer.add_eos_token_id, sp.eos_id()),
                             (writer.add_unk_token_id, sp.unk_id()), (writer.add_pad_token_id, pad_token_id)):
        if token_id is not None and 0 <= token_id < vocab_size:
            setter(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if sp.eos_id() >= 0:
        writer.add_chat_template(chat_template(sp.id_to_piece(sp.eos_id())))
