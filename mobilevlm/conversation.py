"""Prompt templates of the original (`conv_templates`), with the exact strings and assembly rules.

`v1` / `vicuna_v1` is used for fine-tuning, inference and every benchmark; `plain` for stage-I pre-training;
`llava_llama_2` / `llama_2` and `default` (v0) are kept for completeness. MobileLLaMA-Chat's vicuna v1.1
template is string-identical to `v1`.
"""
from __future__ import annotations

import dataclasses
from enum import Enum, auto

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


@dataclasses.dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    messages: list[list]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False  # the original's field (its gradio demo sets it)

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    @property
    def stop_str(self) -> str:
        """The original scripts' `stop_str`: sep2 for the TWO style, else sep (so "<s>" for llama_2, whose
        replies end with EOS anyway)."""
        return self.sep2 if self.sep_style == SeparatorStyle.TWO else self.sep

    def _messages_for_prompt(self) -> list[list]:
        messages = [list(m) for m in self.messages]
        if messages and isinstance(messages[0][1], tuple):
            # GUI-style (text, image, ...) first message: the tag is moved to the front of the text, or for the
            # mmtag templates into a turn of its own that the assistant acknowledges.
            role, text = messages[0][0], messages[0][1][0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                messages[0] = [role, text]
                messages[:0] = [[self.roles[0], "<Image><image></Image>"], [self.roles[1], "Received."]]
            else:
                messages[0][1] = DEFAULT_IMAGE_TOKEN + "\n" + text
        # a later (text, image, mode) message contributes its text
        return [[role, m[0] if isinstance(m, tuple) else m] for role, m in messages]

    def get_prompt(self) -> str:
        messages = self._messages_for_prompt()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, message in messages:
                out += f"{role}: {message}{self.sep}" if message else f"{role}:"
            return out
        if style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
            return out
        if style == SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, message in messages:
                out += f"{role}{message}{self.sep}" if message else role
            return out
        if style == SeparatorStyle.PLAIN:
            # plain has no sep2 (the original would fail on a finished answer); an answer ends with its stop string
            seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
            out = self.system
            for i, (_, message) in enumerate(messages):
                out += f"{message}{seps[i % 2]}" if message else ""
            return out
        if style == SeparatorStyle.LLAMA_2:
            out = ""
            for i, (role, message) in enumerate(messages):
                if i == 0 and not message:
                    raise ValueError("the first message of a llama_2 conversation must not be empty")
                if i == 0 and role != self.roles[0]:
                    raise ValueError("a llama_2 conversation must start with the user")
                if message:
                    if i == 0:
                        message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}" if self.system else message
                    if i % 2 == 0:
                        out += f"{self.sep}[INST] {message} [/INST]"
                    else:
                        out += f" {message} {self.sep2}"
            return out.removeprefix(self.sep)
        raise ValueError(f"invalid separator style {style}")


VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")

conv_vicuna_v0 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("Human", "Assistant"),
    messages=[
        ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
        ["Assistant",
         "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
         "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, "
         "are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key "
         "differences between renewable and non-renewable energy sources:\n"
         "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
         "energy sources are finite and will eventually run out.\n"
         "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
         "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
         "and other negative effects.\n"
         "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
         "have lower operational costs than non-renewable sources.\n"
         "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
         "locations than non-renewable sources.\n"
         "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
         "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
         "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
         "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"],
    ],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = Conversation(
    system=VICUNA_V1_SYSTEM, roles=("USER", "ASSISTANT"), version="v1", messages=[], offset=0,
    sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>",
)

conv_llama_2 = Conversation(
    system="You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.",
    roles=("USER", "ASSISTANT"), version="llama_v2", messages=[], offset=0,
    sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"), version="llama_v2", messages=[], offset=0,
    sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>",
)

conv_llava_plain = Conversation(
    system="", roles=("", ""), messages=[], offset=0, sep_style=SeparatorStyle.PLAIN, sep="\n", version="plain",
)

# The original's other templates, kept under its names (none of its scripts selects them by default).
conv_vicuna_extra = dataclasses.replace(conv_vicuna_v1, version="extra", sep="<ques_end>")

conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt", messages=[], offset=0,
    sep_style=SeparatorStyle.MPT, sep="<|im_end|>",
)

conv_llava_v0 = dataclasses.replace(conv_vicuna_v0, messages=[], offset=0)

MMTAG_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant is able to "
                "understand the visual content that the user provides, and assist the user with a variety of tasks "
                "using natural language.The visual content will be provided with the following format: "
                "<Image>visual content</Image>.")

conv_llava_v0_mmtag = Conversation(system=MMTAG_SYSTEM, roles=("Human", "Assistant"), messages=[], offset=0,
                                   sep_style=SeparatorStyle.SINGLE, sep="###", version="v0_mmtag")

conv_llava_v1 = dataclasses.replace(conv_vicuna_v1, system=conv_vicuna_v0.system)

conv_llava_v1_mmtag = Conversation(system=MMTAG_SYSTEM, roles=("USER", "ASSISTANT"), messages=[], offset=0,
                                   sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>", version="v1_mmtag")

# The original's training code reassigns this to the template it trains with.
default_conversation = conv_vicuna_v0

conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "llava_llama_2": conv_llava_llama_2,
    "plain": conv_llava_plain,
}


def get_conv_template(name: str) -> Conversation:
    if name not in conv_templates:
        raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(conv_templates)}")
    return conv_templates[name].copy()
