"""Turn a support conversation into model text, identically for training and for chat.

The dataset builder, the LoRA trainer and the inference engine all call these
functions, so the text the model learns from is exactly the text it is later asked
to continue. Plain Python: no Django, no database.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts with roles
``system``, ``customer`` and ``agent``. Tokenizers that ship a chat template
(SmolLM2, Llama-style models) render through it, with customer -> user and
agent -> assistant. Tokenizers without one (GPT-2) use a plain template::

    System: You are the support assistant of Acme.
    Customer: Where is my order?
    Agent: It left our warehouse yesterday.<|endoftext|>
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ROLE_SYSTEM = "system"
ROLE_CUSTOMER = "customer"
ROLE_AGENT = "agent"
ROLES = (ROLE_SYSTEM, ROLE_CUSTOMER, ROLE_AGENT)

# Who speaks in a live chat (the chat's message roles) as the model knows them: the bot
# and human agents both speak for the company. System notices are for people only and
# have no entry: they never reach the model.
CHAT_SPEAKER_ROLES = {"customer": ROLE_CUSTOMER, "bot": ROLE_AGENT, "agent": ROLE_AGENT}

_PLAIN_LABELS = {ROLE_SYSTEM: "System", ROLE_CUSTOMER: "Customer", ROLE_AGENT: "Agent"}
_CHAT_ROLES = {ROLE_SYSTEM: "system", ROLE_CUSTOMER: "user", ROLE_AGENT: "assistant"}

# Label prefixes that end a reply in the plain template: the model starting a new
# turn means the reply is over.
PLAIN_STOP_SEQUENCES = ("\nCustomer:", "\nAgent:", "\nSystem:")

# Token ids of the prompt that the loss ignores (PyTorch's CrossEntropyLoss default).
IGNORE_INDEX = -100

# Stands in for the reply when a chat template renders a whole example at once.
_REPLY_MARK = "\u2063SUPPORTBOT-REPLY\u2063"
# (chat template, roles of the turns) -> whether the one-render split matches two renders.
_SPLIT_CHECKED: dict[tuple[str, tuple[str, ...]], bool] = {}


@dataclass(frozen=True)
class RenderedExample:
    """A training example split where the loss starts: only ``completion`` is learned."""

    prompt: str
    completion: str


def normalise_messages(messages: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """Validate roles, strip text, drop empty turns and merge consecutive same-role turns.

    Chat templates of Llama-style models reject two user turns in a row; ticket
    threads often have them (a customer writing twice), so they are joined.
    """
    merged: list[dict[str, str]] = []
    for message in messages:
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"Unknown role {role!r}; expected one of {', '.join(ROLES)}.")
        content = (message.get("content") or "").strip()
        if not content:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n\n" + content
        else:
            merged.append({"role": role, "content": content})
    return merged


def system_prompt_text(*, template: str, company: str, policy: str = "") -> str:
    """The system turn of every example and every chat: the prompt with ``{company}``
    filled in, then the policy text. Training and chat both call this, so they agree.
    """
    # str.replace, not str.format: admins may write other braces (JSON, placeholders).
    prompt = (template or "").replace("{company}", company or "").strip()
    policy = (policy or "").strip()
    return f"{prompt}\n\nPolicies:\n{policy}".strip() if policy else prompt


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_turn(role: str, content: str) -> str:
    return f"{_PLAIN_LABELS[role]}: {content}\n"


def render_prompt(messages: Iterable[Mapping[str, str]], tokenizer) -> str:
    """The text a model continues with the agent's next reply.

    ``messages`` is the conversation so far (optionally starting with a system
    turn); it normally ends with a customer turn.
    """
    turns = normalise_messages(messages)
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": _CHAT_ROLES[t["role"]], "content": t["content"]} for t in turns],
            add_generation_prompt=True,
            tokenize=False,
        )
    return "".join(_plain_turn(t["role"], t["content"]) for t in turns) + "Agent:"


def render_example(messages: Iterable[Mapping[str, str]], tokenizer) -> RenderedExample:
    """Split a conversation whose last turn is the agent's reply into prompt and target."""
    turns = normalise_messages(messages)
    if not turns or turns[-1]["role"] != ROLE_AGENT:
        raise ValueError("The last turn of a training example must be a non-empty agent reply.")
    if not any(t["role"] == ROLE_CUSTOMER for t in turns[:-1]):
        raise ValueError("A training example needs at least one customer turn before the reply.")
    reply = turns[-1]["content"]
    if not uses_chat_template(tokenizer):
        prompt = render_prompt(turns[:-1], tokenizer)
        return RenderedExample(prompt=prompt, completion=" " + reply + (tokenizer.eos_token or ""))
    chat = [{"role": _CHAT_ROLES[t["role"]], "content": t["content"]} for t in turns]
    # One template render instead of two (the dataset builder renders every ticket):
    # render with a marker as the reply and split there. Trusted only once this
    # template and conversation shape have been checked against the two-render way.
    shape = (tokenizer.chat_template, tuple(t["role"] for t in turns))
    if _SPLIT_CHECKED.get(shape):
        marked = tokenizer.apply_chat_template([*chat[:-1], {**chat[-1], "content": _REPLY_MARK}], tokenize=False)
        at = marked.find(_REPLY_MARK)
        if at != -1 and marked.count(_REPLY_MARK) == 1:
            return RenderedExample(prompt=marked[:at], completion=reply + marked[at + len(_REPLY_MARK) :])
    prompt = render_prompt(turns[:-1], tokenizer)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The tokenizer's chat template renders history differently with a reply.")
    example = RenderedExample(prompt=prompt, completion=full[len(prompt) :])
    if shape not in _SPLIT_CHECKED:
        marked = tokenizer.apply_chat_template([*chat[:-1], {**chat[-1], "content": _REPLY_MARK}], tokenize=False)
        at = marked.find(_REPLY_MARK)
        _SPLIT_CHECKED[shape] = (
            marked.count(_REPLY_MARK) == 1
            and marked[:at] == example.prompt
            and reply + marked[at + len(_REPLY_MARK) :] == example.completion
        )
    return example


def stop_sequences(tokenizer) -> tuple[str, ...]:
    """Strings that end a generated reply (besides the EOS token id)."""
    if uses_chat_template(tokenizer):
        return tuple(dict.fromkeys(s for s in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>") if s))
    return PLAIN_STOP_SEQUENCES


def tokenize_example(example: RenderedExample, tokenizer, *, max_length: int) -> dict[str, list[int]]:
    """Token ids with ``labels`` masked to IGNORE_INDEX everywhere but the reply.

    Over-long examples keep the reply: the prompt loses its oldest tokens first, and
    only a reply longer than ``max_length`` minus a few prompt tokens is cut at its end.
    Prompt and completion are tokenized separately, as at inference time, where the
    prompt is tokenized alone and the reply generated after it.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    return assemble_tokens(prompt_ids, completion_ids, max_length=max_length)


def tokenize_examples(
    examples: list[RenderedExample], tokenizer, *, max_length: int
) -> list[dict[str, list[int]] | None]:
    """``tokenize_example`` for many examples at once; None where the reply tokenizes to nothing.

    One batch call per side lets a fast tokenizer encode on every core (and skips the
    per-call overhead), several times quicker than one call per example.
    """
    if not examples:
        return []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    return [
        assemble_tokens(p, c, max_length=max_length) if c else None for p, c in zip(prompts, completions, strict=True)
    ]


def assemble_tokens(prompt_ids: list[int], completion_ids: list[int], *, max_length: int) -> dict[str, list[int]]:
    """Join prompt and reply token ids, truncated to ``max_length`` keeping the reply (see above)."""
    if not completion_ids:
        raise ValueError("The reply tokenizes to nothing.")
    min_prompt = min(len(prompt_ids), 16)  # keep some context even for a very long reply
    completion_ids = completion_ids[: max(1, max_length - min_prompt)]
    room = max_length - len(completion_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - room) :] if room > 0 else []
    input_ids = prompt_ids + completion_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }
