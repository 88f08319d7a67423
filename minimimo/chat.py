r"""Chat format: how a conversation becomes one string for MiMo-V2-Flash, and a reply goes back.

MiMo speaks Qwen-style ChatML (SPEC §6). Every turn is framed by two special tokens, and the
prompt ends by opening the assistant's turn, so that the model's next tokens *are* the reply:

    <|im_start|>system\n
    You are MiMo, an AI assistant developed by Xiaomi.\n
    \n
    Today's date: 2025-12-16 Tuesday. Your knowledge cutoff date is December 2024.<|im_end|>\n
    <|im_start|>user\n
    What is 2+2?<|im_end|>\n
    <|im_start|>assistant\n
    <think>\n
    \n
    </think>\n
    \n
                                    <- the model writes "4<|im_end|>" from here

MiMo-V2-Flash is a reasoning model: a reply may start with its reasoning inside
`<think> ... </think>`, then the answer. The Flash template turns thinking **off** by default
(`enable_thinking=False`); following the Qwen3 convention, "off" is spelled by putting an empty
think block in the prompt, so the model skips straight to the answer. That exact spelling for
MiMo is the Qwen3 one and is *not verified* against MiMo's own template (SPEC §6 marks it so).

The checkpoint also ships the template as a Jinja program (`chat_template` in
`tokenizer_config.json`); we write the format out in Python instead, where each rule can be read
and tested. Tool calls (Qwen3-Coder-style XML) are not covered here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from .tokenizer import ENDOFTEXT, IM_END, IM_START, THINK_END, THINK_START

ROLES = ("system", "user", "assistant")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# The official English system prompt (SPEC §6, from the model card). Chinese variant not included.
DEFAULT_SYSTEM_PROMPT = (
    "You are MiMo, an AI assistant developed by Xiaomi.\n\n"
    "Today's date: {date} {weekday}. Your knowledge cutoff date is December 2024."
)
EMPTY_THINK_BLOCK = f"{THINK_START}\n\n{THINK_END}\n\n"  # "thinking off": the model answers at once


def default_system_prompt(date: datetime.date | None = None) -> str:
    """The official system prompt for `date` (default: today), e.g. "... 2025-12-16 Tuesday. ..."

    The weekday comes from a fixed English table, not `strftime("%A")`, which follows the locale.
    """
    date = date or datetime.date.today()
    return DEFAULT_SYSTEM_PROMPT.format(date=date.isoformat(), weekday=WEEKDAYS[date.weekday()])


def format_chat(
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    system_prompt: str | None = None,
    date: datetime.date | None = None,
) -> str:
    """Render `messages` (dicts with "role", "content", optional "reasoning_content") as a prompt.

    - Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
    - With no system message first, the official one (`default_system_prompt(date)`) is used, or
      `system_prompt` when given. A system message may only come first.
    - An assistant turn with `reasoning_content` is written `<think>\\n{reasoning}\\n</think>\\n\\n
      {content}`. Earlier turns keep their reasoning: the model card asks for previous turns'
      `reasoning_content` to be sent back in multi-turn tool use (Qwen3's template drops it).
    - `add_generation_prompt` opens the assistant's turn: `<|im_start|>assistant\\n`, followed by
      an empty think block when `enable_thinking` is False (the Flash default; Qwen3 spelling, not
      verified for MiMo), or nothing when it is True, leaving the model to open `<think>` itself.
    """
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a string, got {message.get('content')!r}")
        if role == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
    if messages and messages[0]["role"] == "system":
        if system_prompt is not None:
            raise ValueError("system_prompt given twice: as an argument and as the first message")
    else:
        system = system_prompt if system_prompt is not None else default_system_prompt(date)
        messages = [{"role": "system", "content": system}, *messages]

    parts = []
    for message in messages:
        content = message["content"]
        reasoning = message.get("reasoning_content")
        if message["role"] == "assistant" and reasoning:
            content = f"{THINK_START}\n{reasoning.strip()}\n{THINK_END}\n\n{content}"
        parts.append(f"{IM_START}{message['role']}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
        if not enable_thinking:
            parts.append(EMPTY_THINK_BLOCK)
    return "".join(parts)


@dataclass
class Reply:
    """An assistant reply split in two. `reasoning` is None when there was none (no think block,
    or an empty one); `complete` is False when the reasoning never closed (the model was cut off
    while thinking), in which case `answer` is empty."""

    reasoning: str | None
    answer: str
    complete: bool = True


def parse_reply(text: str) -> Reply:
    """Split generated text into reasoning and answer.

    Accepted shapes (after cutting at the first `<|im_end|>` or `<|endoftext|>`):
        "<think>\\nR\\n</think>\\n\\nA"   reasoning R, answer A
        "R\\n</think>\\n\\nA"             the same, when the prompt already opened `<think>`
        "<think>\\nR ..."                 reasoning cut off: answer "", complete=False
        "A"                              no reasoning
    """
    for end_marker in (IM_END, ENDOFTEXT):
        text = text.split(end_marker, 1)[0]
    text = text.strip()
    if THINK_END in text:
        reasoning, answer = text.split(THINK_END, 1)
        complete = True
    elif text.startswith(THINK_START):
        reasoning, answer, complete = text, "", False
    else:
        return Reply(reasoning=None, answer=text)
    reasoning = reasoning.strip().removeprefix(THINK_START).strip()
    return Reply(reasoning=reasoning or None, answer=answer.strip(), complete=complete)


@dataclass
class Conversation:
    """The message list of an interactive chat.

        chat = Conversation()
        chat.add_user("What is 2+2?")
        prompt = chat.prompt()                    # -> encode, generate until an eos id, decode
        chat.add_assistant(reply_text)            # stores the answer and its reasoning

    The date is fixed when the conversation starts, so the system prompt (and with it every
    cached key and value of the prompt's prefix) stays the same from turn to turn.
    """

    system_prompt: str | None = None
    date: datetime.date = field(default_factory=datetime.date.today)
    messages: list[dict] = field(default_factory=list)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def prompt(self, *, enable_thinking: bool = False) -> str:
        """The whole conversation so far, ending with the opened assistant turn."""
        return format_chat(self.messages, add_generation_prompt=True, enable_thinking=enable_thinking,
                           system_prompt=self.system_prompt, date=self.date)

    def add_assistant(self, reply_text: str) -> Reply:
        """Parse the generated text and store it as the assistant's turn; return the parse."""
        reply = parse_reply(reply_text)
        message = {"role": "assistant", "content": reply.answer}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        self.messages.append(message)
        return reply
