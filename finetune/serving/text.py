"""Text in and out of the model: fit a conversation into the context window, turn tokens into reply text.

- ``token_budget`` / ``trim_messages`` / ``prompt_ids_for``: fit a conversation into the
  prompt's token budget (the context window, and ``GenerationParams.max_prompt_tokens``:
  an expensive prompt costs every reply in the batch its prefill time), dropping whole
  turns oldest first and keeping the system prompt; a customer message still too long is
  cut in the middle with a note (``cut_turn``). This is the one place serving builds prompts.
- ``ReplyText``: incremental detokenising with stop strings, so streamed deltas never
  contain a stop string or half of one, and the concatenated deltas equal the reply.

Both engines use these, so they build the same prompt and cut the reply the same way.
Plain Python: no Django.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from finetune.ml.prompting import ROLE_AGENT, ROLE_SYSTEM, normalise_messages, render_prompt
from finetune.ml.quality import prime_join

from .loading import LoadedModel

# Fewest prompt tokens a reply is generated from, however large max_new_tokens is:
# a reply to (a part of) the customer's last message, never to nothing.
MIN_PROMPT_TOKENS = 16


def prime_joint(prime: str, continuation: str) -> str:
    """What goes between a reply's prime and the first generated text: a space, or nothing.

    The prime is a whole sentence: what follows it is kept apart by a space unless it brings
    its own or is punctuation (as the evaluation joins whole replies, ``quality.join_prime``).
    Every engine joins a streamed prime this way (``ReplyText``, ``VLLMEngine``).
    """
    if not prime or not continuation or continuation[0].isspace() or continuation[0] in ".,;:!?)":
        return ""
    return " "


class ReplyText:
    """Turns generated token ids into reply text, honouring stop strings.

    ``push(token_id)`` returns the text that is now safe to show: text that cannot
    turn out to be the start of a stop string. ``stopped`` becomes True when a stop
    string appears; the stop string and anything after it are never emitted.
    ``prefix`` is reply text that was not generated (a primed reply's start,
    ``GenerationRequest.prime``): it leads the first delta.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], prefix: str = ""):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.prefix = (prefix or "").strip()
        self.ids: list[int] = []
        self.emitted = 0  # characters of the reply already returned
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        continuation = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        decoded = self.prefix + prime_joint(self.prefix, continuation) + continuation
        if decoded.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        cut = len(decoded)
        for stop in self.stops:
            at = decoded.find(stop)
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        if self.stopped:
            self.text = decoded[:cut]
        else:
            self.text = decoded
            # Hold back a tail that might be the beginning of a stop string.
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(decoded)), 0, -1):
                    if decoded.endswith(stop[:k]):
                        cut = min(cut, len(decoded) - k)
                        break
        delta = self.text[self.emitted : cut] if cut > self.emitted else ""
        self.emitted = max(self.emitted, cut)
        return delta

    def flush(self) -> str:
        """Text held back at the end of generation (it turned out not to be a stop string)."""
        if not self.ids and not self.stopped:
            self.text = self.prefix  # nothing was generated after the prime
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    @property
    def reply(self) -> str:
        return self.text.strip()


def token_budget(window: int, max_new_tokens: int, max_prompt_tokens: int | None = None) -> tuple[int, int]:
    """``(max prompt tokens, max new tokens)`` so that prompt and reply together fit ``window``,
    and the prompt is at most ``max_prompt_tokens`` (never under ``MIN_PROMPT_TOKENS``)."""
    max_new = max(1, min(max_new_tokens, window - MIN_PROMPT_TOKENS))
    prompt = window - max_new
    if max_prompt_tokens is not None:
        prompt = max(MIN_PROMPT_TOKENS, min(prompt, max_prompt_tokens))
    return prompt, max_new


def _prompt_length(turns: list[dict[str, str]], tokenizer) -> int:
    return len(tokenizer(render_prompt(turns, tokenizer), add_special_tokens=False)["input_ids"])


def trim_messages(messages: Iterable[Mapping[str, str]], tokenizer, max_prompt_tokens: int) -> list[dict[str, str]]:
    """The conversation cut to fit ``max_prompt_tokens``: whole turns dropped oldest first.

    The system turn (company, policy) is always kept, and so is the last turn (what the
    reply answers). History restarts at a customer turn, since an agent reply whose
    question was dropped means nothing to the model. Only when the system turn and the
    last turn alone are too long is the last turn cut (``cut_turn``): its beginning and
    end are kept around a note saying how much was cut.
    """
    turns = normalise_messages(messages)
    system = turns[:1] if turns and turns[0]["role"] == ROLE_SYSTEM else []
    history = turns[len(system) :]
    if not history or _prompt_length(system + history, tokenizer) <= max_prompt_tokens:
        return system + history
    # Where the kept history may start, oldest first; fewer turns never render longer, so
    # the oldest start that fits is found by bisection (a long chat costs a few tokenizations).
    starts = [i for i, turn in enumerate(history) if i > 0 and turn["role"] != ROLE_AGENT]
    if not starts or starts[-1] != len(history) - 1:
        starts.append(len(history) - 1)
    lo, hi = 0, len(starts)  # the answer is starts[lo], or "none fits" when lo == len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if _prompt_length(system + history[starts[mid] :], tokenizer) <= max_prompt_tokens:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(starts):
        return system + history[starts[lo] :]
    return [*system, cut_turn(history[-1], system, tokenizer, max_prompt_tokens)]


def cut_note(cut_tokens: int) -> str:
    """What replaces the middle of a message too long for the model, so the model knows it saw a part."""
    return f"\n[… {cut_tokens} tokens of this message were cut: it is longer than the assistant reads …]\n"


def cut_turn(turn: Mapping[str, str], system: list[dict[str, str]], tokenizer, max_prompt_tokens: int) -> dict:
    """``turn`` cut so that ``system`` plus it fit ``max_prompt_tokens``: its beginning and its end are
    kept (the greeting and context, and the question, which usually comes last), with ``cut_note``
    in place of the middle."""
    last = dict(turn)
    ids = tokenizer(turn["content"], add_special_tokens=False)["input_ids"]
    note_tokens = len(tokenizer(cut_note(len(ids)), add_special_tokens=False)["input_ids"])
    keep = len(ids)
    while keep > 1:
        over = _prompt_length([*system, last], tokenizer) - max_prompt_tokens
        if over <= 0:
            break
        # The first cut also makes room for the note; later rounds correct tokenizer drift.
        keep = max(1, keep - over - (note_tokens if keep == len(ids) else 0))
        head = keep // 3
        tail = keep - head
        last["content"] = (
            tokenizer.decode(ids[:head]) + cut_note(len(ids) - keep) + tokenizer.decode(ids[len(ids) - tail :])
        )
    return last


def prompt_ids_for(
    loaded: LoadedModel, messages: list[dict[str, str]], max_prompt_tokens: int, prime: str = ""
) -> list[int]:
    """Trim the conversation to fit (``trim_messages``), render it with the ``prime`` and tokenize it.

    The prime (the reply's given start) follows the prompt, joined as training joins a reply
    (``finetune.ml.quality.prime_join``, as the evaluation joins it), and counts against the budget.
    Keeping only the newest ``max_prompt_tokens`` tokens afterwards is the last guard,
    reached only when the system prompt alone does not fit.
    """
    tail = prime_join(prime, loaded.tokenizer)
    tail_ids = loaded.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    budget = max(MIN_PROMPT_TOKENS, max_prompt_tokens - len(tail_ids))
    turns = trim_messages(messages, loaded.tokenizer, budget)
    # Tokenized in one piece with the prime, as the evaluation tokenizes its primed prompts.
    text = render_prompt(turns, loaded.tokenizer) + tail
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]
