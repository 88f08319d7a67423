r"""Chat format: how a conversation becomes one string for MiMo-V2-Flash, and a reply goes back.

MiMo speaks Qwen-style ChatML (the model card, huggingface.co/XiaomiMiMo/MiMo-V2-Flash). Every
turn is framed by two special tokens, and the prompt ends by opening the assistant's turn, so that
the model's next tokens *are* the reply:

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
(`enable_thinking=False`; SGLang's `mimo` reasoning parser, github.com/sgl-project/sglang/pull/21414,
assumes the same); following the Qwen3 convention, "off" is spelled by putting an empty think block
in the prompt, so the model skips straight to the answer. That exact spelling is Qwen3's and is
*not verified* against MiMo's own template.

**Markers are the template's, never the user's.** The markers above are special tokens, one id
each; a message's content is text. Someone who types `<|im_start|>system` into a message must not
open a system turn, so `chat_segments` keeps the two apart, and `Tokenizer.encode_chat` encodes
the markers as their ids and every content as plain text (the string `<|im_start|>` inside a
message becomes the ordinary tokens `<`, `|`, `im`, ...). `format_chat` joins the same segments
into one string for reading; encoding that string with `Tokenizer.encode` would turn marker
strings inside messages into markers, so a prompt is always encoded with `encode_chat`.

The checkpoint also ships the template as a Jinja program (`chat_template` in
`tokenizer_config.json`); we write the format out in Python instead, where each rule can be read
and tested. Tool calls (Qwen3-Coder-style XML) are not covered here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

# The special tokens of the format. Their ids are not fixed here: the tokenizer reads them from
# the checkpoint's files (`tokenizer.py`).
ENDOFTEXT = "<|endoftext|>"  # end of a document; eos and pad in the Qwen family
IM_START = "<|im_start|>"  # opens a chat turn: <|im_start|>role\n ...
IM_END = "<|im_end|>"  # closes a chat turn; a reply ends here
THINK_START = "<think>"  # opens the reasoning block
THINK_END = "</think>"  # closes it

ROLES = ("system", "user", "assistant")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# The official English system prompt, from the model card. Its Chinese variant is not included.
DEFAULT_SYSTEM_PROMPT = (
    "You are MiMo, an AI assistant developed by Xiaomi.\n\n"
    "Today's date: {date} {weekday}. Your knowledge cutoff date is December 2024."
)
# A prompt as (text, is_marker) pieces: markers are special tokens, the rest is plain text.
Segment = tuple[str, bool]
EMPTY_THINK_BLOCK: list[Segment] = [(THINK_START, True), ("\n\n", False), (THINK_END, True), ("\n\n", False)]


def default_system_prompt(date: datetime.date | None = None) -> str:
    """The official system prompt for `date` (default: today), e.g. "... 2025-12-16 Tuesday. ..."

    The weekday comes from a fixed English table, not `strftime("%A")`, which follows the locale.
    """
    date = date or datetime.date.today()
    return DEFAULT_SYSTEM_PROMPT.format(date=date.isoformat(), weekday=WEEKDAYS[date.weekday()])


def chat_segments(
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    system_prompt: str | None = None,
    date: datetime.date | None = None,
) -> list[Segment]:
    """The prompt of `messages` (dicts with "role", "content", optional "reasoning_content") as
    (text, is_marker) segments; `format_chat` joins them, `Tokenizer.encode_chat` encodes them.

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

    segments: list[Segment] = []
    for message in messages:
        segments += [(IM_START, True), (f"{message['role']}\n", False)]
        reasoning = message.get("reasoning_content")
        if message["role"] == "assistant" and reasoning:
            segments += [(THINK_START, True), (f"\n{reasoning.strip()}\n", False), (THINK_END, True), ("\n\n", False)]
        segments += [(message["content"], False), (IM_END, True), ("\n", False)]
    if add_generation_prompt:
        segments += [(IM_START, True), ("assistant\n", False)]
        if not enable_thinking:
            segments += EMPTY_THINK_BLOCK
    return segments


def format_chat(
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    system_prompt: str | None = None,
    date: datetime.date | None = None,
) -> str:
    """The prompt of `messages` as one string, for reading (the options: see `chat_segments`).

    To give it to the model, encode the messages with `Tokenizer.encode_chat`, not this string
    with `Tokenizer.encode`: only the former keeps marker strings typed inside a message as text.
    """
    segments = chat_segments(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                             system_prompt=system_prompt, date=date)
    return "".join(text for text, _ in segments)


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


class ContextFull(ValueError):
    """A message that does not fit the model's context even as the only turn after the system prompt."""


@dataclass
class Conversation:
    """The message list of an interactive chat.

        chat = Conversation()
        chat.add_user("What is 2+2?")
        ids = chat.prompt_ids(tokenizer, max_tokens=4096 - 256)  # -> generate until an eos id, decode
        chat.add_assistant(reply_text)                            # stores the answer and its reasoning

    The date is fixed when the conversation starts, so the system prompt (and with it every
    cached key and value of the prompt's prefix) stays the same from turn to turn.

    A conversation outgrows any context. `prompt_ids` then forgets the oldest exchanges, keeping
    the system prompt, the way chat front-ends do (a sliding window over turns); a single message
    too long for the context is refused (`ContextFull`) and the conversation goes on without it.
    """

    system_prompt: str | None = None
    date: datetime.date = field(default_factory=datetime.date.today)
    messages: list[dict] = field(default_factory=list)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def prompt(self, *, enable_thinking: bool = False) -> str:
        """The whole conversation so far, ending with the opened assistant turn, as a string to read."""
        return format_chat(self.messages, add_generation_prompt=True, enable_thinking=enable_thinking,
                           system_prompt=self.system_prompt, date=self.date)

    def prompt_ids(self, tokenizer, *, enable_thinking: bool = False, max_tokens: int | None = None) -> list[int]:
        """The conversation as token ids (`tokenizer.encode_chat`), at most `max_tokens` of them.

        When it is longer, the oldest exchanges (a user message and the replies to it) are
        dropped for good until it fits; the system prompt always stays. When the last message
        alone is too long, it is removed and `ContextFull` is raised: the conversation is then
        what it was before that message.
        """
        def encode(messages: list[dict]) -> list[int]:
            return tokenizer.encode_chat(messages, enable_thinking=enable_thinking, system_prompt=self.system_prompt,
                                         date=self.date)

        ids = encode(self.messages)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        first = 1 if self.messages[0]["role"] == "system" else 0  # the system prompt stays
        alone = encode(self.messages[:first] + self.messages[-1:])
        if len(alone) > max_tokens:
            self.messages.pop()
            raise ContextFull(f"the message makes a prompt of {len(alone)} tokens, over the {max_tokens} "
                              "that fit in the context")
        while len(ids) > max_tokens:
            del self.messages[first]  # the oldest user message, then the replies to it
            while len(self.messages) - first > 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]
            ids = encode(self.messages)
        return ids

    def add_assistant(self, reply_text: str) -> Reply:
        """Parse the generated text and store it as the assistant's turn; return the parse.

        The reply is kept as text: a marker string in it (say `<|im_start|>`) is encoded as plain
        text in the next prompt, never as a marker."""
        reply = parse_reply(reply_text)
        message = {"role": "assistant", "content": reply.answer}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        self.messages.append(message)
        return reply
