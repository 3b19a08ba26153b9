"""Stream historical tickets out of files: Bitext CSV, any CSV with a field map, or JSONL.

Plain Python, no Django: :func:`read_tickets` yields a :class:`ParsedTicket` per good
record and a :class:`RowError` (line number, reason) per broken one, reading the file
a line at a time so a 1 GB export costs as much memory as its longest record. The
service ``finetune.services.ticket_import`` writes what this yields.

A file that is not what its format says (a JSONL file read as CSV, a CSV without the
columns the format needs, a gzip archive, an empty file) raises :class:`FormatError`
before the first ticket is yielded, so nothing is imported from it.

Field names are the ``Ticket`` model's (``external_id``, ``subject``, ``intent``,
``category``, ``tags``, ``language``, ``customer_segment``, ``customer_name``,
``customer_email``, ``customer_phone``, ``customer_address``,
``customer_identifiers``, ``created_at``, ``resolved_at``), plus, for single-exchange
CSV rows, ``customer_message`` and ``agent_reply``. A file without ids gets
``row-<n>`` (its n-th record), so importing the same file again finds the same ids.

    python -m finetune.ml.importers path/to/tickets.jsonl jsonl

Why one module of ~600 lines: the three formats share the line reader (encoding and
length problems per line) and the value parsers, which is where a file's mistakes
become the reasons a person reads; each format's own part is short.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

FORMATS = ("bitext", "csv", "jsonl")

ROLE_CUSTOMER = "customer"
ROLE_AGENT = "agent"
# Other exports name the two sides differently; anything else is refused rather than guessed.
ROLE_ALIASES = {
    "customer": ROLE_CUSTOMER,
    "user": ROLE_CUSTOMER,
    "client": ROLE_CUSTOMER,
    "agent": ROLE_AGENT,
    "assistant": ROLE_AGENT,
    "support": ROLE_AGENT,
}

# Longest message body accepted. Support messages are a few hundred characters; a
# body of 20,000+ is a pasted log or a mail loop, useless as training text.
MAX_BODY_CHARS = 20_000
# Longest physical line read: more than a thread of MAX_MESSAGES bodies at their limit.
MAX_LINE_BYTES = 8 << 20
MAX_MESSAGES = 200  # a thread longer than this is an export error, not a conversation
# The Ticket model's column widths: longer values would fail on PostgreSQL (and be
# stored silently on SQLite), so they are refused here with a clear reason.
FIELD_LIMITS = {
    "external_id": 128,
    "subject": 300,
    "category": 64,
    "intent": 64,
    "language": 16,
    "customer_segment": 64,
    "customer_name": 200,
    "customer_email": 254,
    "customer_phone": 64,
    "customer_address": 2_000,
}
MAX_TAGS = 32
MAX_IDENTIFIERS = 50

CSV_REQUIRED = ("customer_message", "agent_reply")
BITEXT_REQUIRED = ("instruction", "response", "intent", "category")
BITEXT_ENTITY_IDENTIFIERS = {"order_id": "order", "invoice_id": "invoice"}

# Python's csv module refuses fields over 128 KiB by default; a bigger (but bounded)
# limit lets an over-long body be reported with its length instead of as a parse error.
_CSV_FIELD_LIMIT = 1_000_000
_PROGRESS_EVERY_BYTES = 1 << 16


class FormatError(ValueError):
    """The file is not in the format it was said to be; nothing should be imported from it."""


@dataclass(frozen=True)
class ParsedMessage:
    role: str
    body: str


@dataclass
class ParsedTicket:
    """One good record, with the Ticket model's field names."""

    line: int
    external_id: str
    messages: list[ParsedMessage]
    subject: str = ""
    category: str = ""
    intent: str = ""
    language: str = "en"
    tags: list[str] = field(default_factory=list)
    customer_segment: str = ""
    customer_name: str = ""
    customer_email: str = ""
    customer_phone: str = ""
    customer_address: str = ""
    customer_identifiers: list[Any] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    resolved_at: datetime | None = None

    def fingerprint(self) -> str:
        """sha256 of everything stored from this record, to tell an unchanged re-import from an update."""
        data = asdict(self)
        data.pop("line")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# The Ticket fields a record carries, in ParsedTicket's order: the one list the CSV field
# map, the JSONL reader and the import service (finetune.services.tickets) derive theirs from.
TICKET_FIELDS = tuple(f.name for f in fields(ParsedTicket) if f.name not in {"line", "messages"})
# Fields a --map may name, for CSV files of one customer message and one reply per row.
CSV_FIELDS = ("external_id", "customer_message", "agent_reply", *(f for f in TICKET_FIELDS[1:] if f != "metadata"))


@dataclass(frozen=True)
class RowError:
    """A record that was skipped, and why, in words a person can act on."""

    line: int
    code: str  # missing_reply, bad_encoding, unknown_role, too_long, bad_value, bad_json, bad_row
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class _RowProblem(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- reading lines -------------------------------------------------------------------------


class _Lines:
    """Decode a binary file line by line, remembering which lines were unusable and why.

    Decoding per line (not the whole stream) lets one badly encoded row be skipped
    while the rest of the file imports. A line longer than MAX_LINE_BYTES is skipped
    without ever being held whole (a 1 GB file without newlines costs no more memory
    than any other) and stands in as an empty line.
    """

    def __init__(self, handle: BinaryIO, on_progress: Callable[[int], None] | None):
        self._handle = handle
        self._on_progress = on_progress
        self._unreported = 0
        self.line_no = 0
        self.problems: dict[int, str] = {}  # line number -> "bad_encoding" or "too_long"

    def _progress(self, size: int) -> None:
        self._unreported += size
        if self._on_progress is not None and self._unreported >= _PROGRESS_EVERY_BYTES:
            self._on_progress(self._unreported)
            self._unreported = 0

    def __iter__(self) -> Iterator[str]:
        decoder_strict = codecs.getdecoder("utf-8")
        while raw := self._handle.readline(MAX_LINE_BYTES + 1):
            self.line_no += 1
            self._progress(len(raw))
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while chunk := self._handle.readline(1 << 20):  # skip the rest of the line, a MiB at a time
                    self._progress(len(chunk))
                    if chunk.endswith(b"\n"):
                        break
                self.problems[self.line_no] = "too_long"
                yield "\n"
                continue
            if self.line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = decoder_strict(raw)[0]
            except UnicodeDecodeError:
                self.problems[self.line_no] = "bad_encoding"
                text = raw.decode("utf-8", errors="replace")
            yield text
        if self._on_progress is not None and self._unreported:
            self._on_progress(self._unreported)
            self._unreported = 0

    def take_problem(self, first: int, last: int) -> _RowProblem | None:
        """The problem of any line from ``first`` to ``last`` (one record), forgetting those lines."""
        found = None
        for number in range(first, last + 1):
            code = self.problems.pop(number, None)
            if code is not None and found is None:
                found = _LINE_PROBLEMS[code]
        return found


_LINE_PROBLEMS = {
    "bad_encoding": _RowProblem("bad_encoding", "not valid UTF-8 (bad encoding); re-save the file as UTF-8"),
    "too_long": _RowProblem("too_long", f"the line is over {MAX_LINE_BYTES >> 20} MiB; the limit for one record"),
}


# --- value parsing -------------------------------------------------------------------------


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _RowProblem("bad_value", f"field {name!r} should be text, not {type(value).__name__}")
    if "\x00" in value:
        raise _RowProblem("bad_value", f"field {name!r} contains a NUL character")
    value = value.strip()
    limit = FIELD_LIMITS.get(name)
    if limit is not None and len(value) > limit:
        raise _RowProblem("too_long", f"field {name!r} is {len(value):,} characters; the limit is {limit:,}")
    return value


def _body(value: Any, name: str) -> str:
    text = _text(value, name)
    if len(text) > MAX_BODY_CHARS:
        raise _RowProblem("too_long", f"{name} is {len(text):,} characters; the limit is {MAX_BODY_CHARS:,}")
    return text


def _datetime(value: Any, name: str) -> datetime | None:
    text = _text(value, name)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace(" UTC", "+00:00"))
    except ValueError:
        raise _RowProblem(
            "bad_value", f"field {name!r} is not an ISO 8601 date ({text[:40]!r}); write e.g. 2024-05-01T09:30:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _tags(value: Any, *, letters: bool = False) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        # Bitext writes its register tags as one string of letters ("BILQ").
        items = list(value.strip()) if letters and value.strip().isalpha() else re.split(r"[,;|\s]+", value)
    elif isinstance(value, list):
        items = value
    else:
        raise _RowProblem("bad_value", f"field 'tags' should be a list or a string, not {type(value).__name__}")
    tags = [_text(item, "tags") for item in items]
    tags = list(dict.fromkeys(tag for tag in tags if tag))
    if len(tags) > MAX_TAGS or any(len(tag) > 64 for tag in tags):
        raise _RowProblem("too_long", f"field 'tags' has more than {MAX_TAGS} tags or a tag over 64 characters")
    return tags


def _identifiers(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [item for item in re.split(r"[,;|]+", value) if item.strip()]
    if not isinstance(value, list):
        raise _RowProblem("bad_value", "field 'customer_identifiers' should be a list")
    out: list[Any] = []
    for item in value:
        if isinstance(item, Mapping):
            kind, ident = _text(item.get("type", ""), "identifier type"), _text(item.get("value", ""), "identifier")
            if ident:
                out.append({"type": kind, "value": ident})
        else:
            ident = _text(item, "identifier")
            if ident:
                out.append(ident)
    if len(out) > MAX_IDENTIFIERS or any(len(str(i)) > 200 for i in out):
        raise _RowProblem(
            "too_long", f"field 'customer_identifiers' has more than {MAX_IDENTIFIERS} items or one over 200 characters"
        )
    return out


def _field_values(get: Callable[[str], Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The Ticket fields ``names`` of one record, each parsed by its kind; ``get(name)`` gives the raw value."""
    values: dict[str, Any] = {}
    for name in names:  # in TICKET_FIELDS' order, so a record's first bad field is the one reported
        raw = get(name)
        if name == "tags":
            values[name] = _tags(raw)
        elif name == "customer_identifiers":
            values[name] = _identifiers(raw)
        elif name in {"created_at", "resolved_at"}:
            values[name] = _datetime(raw, name)
        else:
            values[name] = _text(raw, name)
    if "language" in values:
        values["language"] = values["language"] or "en"
    return values


# The fields of a record read by ``_field_values`` (the id, the thread and the metadata are read apart).
_RECORD_FIELDS = tuple(f for f in TICKET_FIELDS if f not in {"external_id", "metadata"})


def _check_thread(messages: list[ParsedMessage]) -> None:
    if not messages:
        raise _RowProblem("missing_reply", "the ticket has no messages")
    if len(messages) > MAX_MESSAGES:
        raise _RowProblem("too_long", f"the thread has {len(messages)} messages; the limit is {MAX_MESSAGES}")
    first_customer = next((i for i, m in enumerate(messages) if m.role == ROLE_CUSTOMER), None)
    if first_customer is None:
        raise _RowProblem("missing_message", "the ticket has no customer message")
    if not any(m.role == ROLE_AGENT for m in messages[first_customer + 1 :]):
        raise _RowProblem("missing_reply", "the ticket has no agent reply after the customer's message")


# --- CSV (Bitext and mapped) ---------------------------------------------------------------


def parse_field_map(items: list[str] | str | None) -> dict[str, str]:
    """``["intent=topic", "customer_message=question,agent_reply=answer"]`` -> {field: column}."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    mapping: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            ours, sep, theirs = pair.partition("=")
            ours, theirs = ours.strip(), theirs.strip()
            if not sep or not ours or not theirs:
                raise ValueError(f"--map entry {pair!r} is not FIELD=COLUMN (e.g. customer_message=question).")
            if ours not in CSV_FIELDS:
                raise ValueError(f"--map names unknown field {ours!r}; fields are: {', '.join(CSV_FIELDS)}.")
            mapping[ours] = theirs
    return mapping


def _csv_records(
    lines: _Lines, required: tuple[str, ...], fmt: str
) -> Iterator[tuple[int, dict[str, str] | None, _RowProblem | None]]:
    """Yield (first line, row dict, problem) for each CSV record after validating the header."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(iter(lines))
    try:
        header = next(reader)
    except StopIteration:
        raise FormatError("The file is empty; a CSV file starts with a header row.") from None
    except csv.Error as exc:
        raise FormatError(f"The first line is not a CSV header ({exc}).") from None
    if lines.problems.get(1) == "bad_encoding":
        raise FormatError("The file is not UTF-8 text (is it compressed or in another encoding?); save it as UTF-8.")
    if lines.problems.get(1) == "too_long":
        raise FormatError(f"The first line is over {MAX_LINE_BYTES >> 20} MiB: this is not a CSV header.")
    header = [column.strip() for column in header]
    missing = [column for column in required if column not in header]
    if missing:
        shown = ", ".join(repr(c) for c in header[:12]) + (" …" if len(header) > 12 else "")
        hint = (
            " It looks like JSON; use --format jsonl."
            if header and header[0].lstrip().startswith(("{", "["))
            else (" Name the columns with --map FIELD=COLUMN." if fmt == "csv" else "")
        )
        raise FormatError(
            f"This is not a {fmt} file: it lacks the column(s) {', '.join(repr(m) for m in missing)}. "
            f"Its header has {shown}.{hint}"
        )
    previous_end = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            start, previous_end = previous_end + 1, reader.line_num
            problem = lines.take_problem(start, reader.line_num)
            yield start, None, problem or _RowProblem("bad_row", f"unreadable CSV record ({exc})")
            continue
        start, end, previous_end = previous_end + 1, reader.line_num, reader.line_num
        problem = lines.take_problem(start, end)
        if problem is not None:
            yield start, None, problem
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            yield (
                start,
                None,
                _RowProblem(
                    "bad_row",
                    f"expected {len(header)} columns, found {len(row)} (a stray quote or delimiter?)",
                ),
            )
            continue
        yield start, dict(zip(header, row, strict=True)), None


def _bitext_ticket(line: int, index: int, row: dict[str, str]) -> ParsedTicket:
    instruction = _body(row.get("instruction"), "instruction")
    response = _body(row.get("response"), "response")
    if not instruction:
        raise _RowProblem("missing_message", "missing customer message (column 'instruction' is empty)")
    if not response:
        raise _RowProblem("missing_reply", "missing reply (column 'response' is empty)")
    identifiers: list[Any] = []
    customer_name = ""
    entity_type = (row.get("entity_type") or "").strip()
    entity_value = (row.get("entity_value") or "").strip()
    if entity_value and entity_type in BITEXT_ENTITY_IDENTIFIERS:
        identifiers.append({"type": BITEXT_ENTITY_IDENTIFIERS[entity_type], "value": entity_value})
    elif entity_value and entity_type == "person_name":
        customer_name = _text(entity_value, "customer_name")
    metadata = {
        key: row[key]
        for key in ("context", "role", "entity_type", "entity_value", "start_offset", "end_offset")
        if row.get(key)
    }
    return ParsedTicket(
        line=line,
        external_id=f"row-{index}",
        messages=[ParsedMessage(ROLE_CUSTOMER, instruction), ParsedMessage(ROLE_AGENT, response)],
        intent=_text(row.get("intent"), "intent"),
        category=_text(row.get("category"), "category"),
        tags=_tags(row.get("tags", row.get("flags")), letters=True),
        customer_name=customer_name,
        customer_identifiers=identifiers,
        metadata=metadata,
    )


def _mapped_ticket(line: int, index: int, row: dict[str, str], field_map: dict[str, str]) -> ParsedTicket:
    def get(name: str) -> str | None:
        column = field_map.get(name)
        return row.get(column) if column else None

    question = _body(get("customer_message"), "customer message")
    answer = _body(get("agent_reply"), "agent reply")
    if not question:
        raise _RowProblem("missing_message", f"missing customer message (column {field_map['customer_message']!r})")
    if not answer:
        raise _RowProblem("missing_reply", f"missing reply (column {field_map['agent_reply']!r} is empty)")
    external_id = _text(get("external_id"), "external_id") or f"row-{index}"
    return ParsedTicket(
        line=line,
        external_id=external_id,
        messages=[ParsedMessage(ROLE_CUSTOMER, question), ParsedMessage(ROLE_AGENT, answer)],
        **_field_values(get, _RECORD_FIELDS),
    )


# --- JSONL ---------------------------------------------------------------------------------

# What a JSONL record may hold besides the Ticket fields; anything else is kept in its metadata.
_JSONL_KNOWN = {"id", "messages", *TICKET_FIELDS}


def _jsonl_ticket(line: int, index: int, record: dict[str, Any]) -> ParsedTicket:
    raw_messages = record.get("messages")
    if not isinstance(raw_messages, list):
        raise _RowProblem("bad_row", "no 'messages' list (each line needs messages: [{role, body}, …])")
    messages: list[ParsedMessage] = []
    for number, message in enumerate(raw_messages, start=1):
        if not isinstance(message, Mapping):
            raise _RowProblem("bad_row", f"message {number} is not an object with role and body")
        raw_role = message.get("role")
        role = ROLE_ALIASES.get(str(raw_role).strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise _RowProblem(
                "unknown_role", f"message {number} has unknown role {raw_role!r}; use 'customer' or 'agent'"
            )
        body = _body(message.get("body", message.get("content")), f"message {number}")
        if not body:
            code = "missing_reply" if role == ROLE_AGENT else "missing_message"
            raise _RowProblem(code, f"message {number} ({role}) is empty")
        messages.append(ParsedMessage(role, body))
    _check_thread(messages)
    ident = record.get("external_id", record.get("id"))
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _RowProblem("bad_value", "field 'metadata' should be an object")
    # Fields this importer does not know are kept, not dropped: the import loses nothing.
    extra = {key: value for key, value in record.items() if key not in _JSONL_KNOWN}
    if extra:
        metadata = {**metadata, "extra": extra}
    return ParsedTicket(
        line=line,
        external_id=_text(ident, "external_id") or f"row-{index}",
        messages=messages,
        metadata=metadata,
        **_field_values(record.get, _RECORD_FIELDS),
    )


def _read_jsonl(lines: _Lines) -> Iterator[ParsedTicket | RowError]:
    index = 0
    checked_format = False
    for text in lines:
        line = lines.line_no
        problem = lines.take_problem(line, line)
        if problem is None and not text.strip():
            continue
        if checked_format:
            index += 1  # broken records count too, so fixing one later does not shift the ids after it
        if problem is not None:
            if not checked_format:
                raise FormatError(
                    "The file is not UTF-8 text (is it compressed or in another encoding?)."
                    if problem.code == "bad_encoding"
                    else f"Line {line} is over {MAX_LINE_BYTES >> 20} MiB: is this one JSON document rather "
                    "than one ticket per line?"
                )
            yield RowError(line, problem.code, problem.reason)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            if not checked_format:
                hint = " It looks like CSV; use --format csv or bitext." if "," in text else ""
                raise FormatError(f"This is not a JSONL file: line {line} is not JSON ({exc.msg}).{hint}") from None
            yield RowError(line, "bad_json", f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not checked_format:
            if not isinstance(record, dict):
                raise FormatError(
                    f"This is not a JSONL file of tickets: line {line} is a JSON {type(record).__name__}, "
                    "not an object. Write one ticket object per line."
                )
            if not isinstance(record.get("messages"), list):
                raise FormatError(
                    f"This is not a JSONL file of tickets: the record on line {line} has no 'messages' list. "
                    'Each line should look like {"external_id": "T-1", "messages": [{"role": "customer", '
                    '"body": "…"}, {"role": "agent", "body": "…"}]}.'
                )
            checked_format = True
            index += 1
        if not isinstance(record, dict):
            yield RowError(line, "bad_row", f"a JSON {type(record).__name__}, not a ticket object")
            continue
        try:
            yield _jsonl_ticket(line, index, record)
        except _RowProblem as problem:
            yield RowError(line, problem.code, problem.reason)
    if not checked_format:
        raise FormatError("The file is empty; a JSONL file has one ticket object per line.")


# --- entry point ---------------------------------------------------------------------------


def read_tickets(
    path: str | Path,
    fmt: str,
    *,
    field_map: dict[str, str] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[ParsedTicket | RowError]:
    """Yield each record of ``path`` as a ParsedTicket, or a RowError saying why it was skipped.

    ``on_progress`` receives byte counts as the file is read (for a progress bar).
    Raises FormatError (before yielding anything) when the file is not ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    field_map = dict(field_map or {})
    if fmt == "csv":
        missing = [name for name in CSV_REQUIRED if name not in field_map]
        if missing:
            raise ValueError(
                f"--format csv needs --map for {', '.join(missing)} "
                "(e.g. --map customer_message=question,agent_reply=answer)."
            )
    elif field_map:
        raise ValueError("--map applies to --format csv only.")
    path = Path(path)
    with path.open("rb") as handle:
        lines = _Lines(handle, on_progress)
        if fmt == "jsonl":
            yield from _read_jsonl(lines)
            return
        required = BITEXT_REQUIRED if fmt == "bitext" else tuple(dict.fromkeys(field_map.values()))
        index = 0
        for line, row, problem in _csv_records(lines, required, fmt):
            index += 1  # broken records count too, so fixing one later does not shift the ids after it
            if problem is not None:
                yield RowError(line, problem.code, problem.reason)
                continue
            try:
                if fmt == "bitext":
                    yield _bitext_ticket(line, index, row)
                else:
                    yield _mapped_ticket(line, index, row, field_map)
            except _RowProblem as exc:
                yield RowError(line, exc.code, exc.reason)


if __name__ == "__main__":
    good = bad = 0
    for item in read_tickets(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "jsonl"):
        if isinstance(item, RowError):
            bad += 1
            print(item, file=sys.stderr)  # noqa: T201
        else:
            good += 1
    print(f"{good} tickets, {bad} skipped")  # noqa: T201
