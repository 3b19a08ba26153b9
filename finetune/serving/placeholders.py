"""Fill template slots in a bot reply, so a customer never sees ``{{…}}`` or ``[…]``.

Past replies, and so the model's, are full of slots: Bitext writes
``{{Customer Support Phone Number}}``, ``{{Website URL}}``, ``{{Order Number}}``,
sometimes ``[Live Chat]`` or a slot in brackets, ``[{{Website Name}}]`` (filled as one
slot, brackets and all); redacted tickets hold ``{{PHONE}}``, ``{{ORDER_ID}}``,
``{{NAME}}``. Each slot is filled, in this order of preference, from:

1. the company's facts (``facts``: ``company_name``, ``support_phone``,
   ``support_email``, ``website_url``, ``website_name``, ``support_hours``,
   ``returns_address``; the bot profile in the admin),
2. values the customer gave in this conversation (``values``: ``order``, ``invoice``,
   ``account``, ``tracking``, ``name``, ``email``, ``phone``, ``address``; see
   ``customer_values``),
3. neutral words: "our website", "your order", "during business hours"; a name
   nobody gave is left out with its comma ("No worries, {{NAME}}, I'm here" ->
   "No worries, I'm here"), and a slot naming a screen or button keeps its words
   ("open {{Order Details}}" -> "open Order Details").

**Language.** Neutral words are written in the reply's language: the language of the
reply's text before the slot when it is long enough to tell (20 letters), else the
conversation's (``language``, ISO 639-1; ``reply_language`` finds it), so an English past
answer to a question mistaken for German still gets English words. English, French, Spanish and German have
words of their own (``LANGUAGES``), one table each read by the same rules, so a French
reply says "votre commande" and "notre site web", never "your order". A determiner
before the slot takes the short form ("notre {{Website Name}}" -> "notre site web"),
an ID phrase becomes the customer's ("la commande {{Order Number}}" -> "votre
commande"), and a name nobody gave leaves a greeting alone ("Bonjour {{NAME}}," ->
"Bonjour,"). Any other language gets the English words.

``fill_placeholders(text, facts, values, language)`` fills a whole reply. ``PlaceholderFiller``
does the same on a stream: ``push(delta)`` returns the text that is final, holding
back a slot until it closes (across any token boundary) and the last few words,
which a following slot may still rewrite ("order {{ORDER_ID}}" -> "your order");
``flush()`` returns the rest. Whatever is pushed, the streamed text equals the
whole-reply result, and no ``{{`` or ``[slot]`` is ever returned.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FACT_KEYS = (
    "company_name",
    "support_phone",
    "support_email",
    "website_url",
    "website_name",
    "support_hours",
    "returns_address",
)
VALUE_KEYS = ("order", "invoice", "account", "tracking", "name", "email", "phone", "address")

_CURLY_RE = re.compile(r"\{\{\s*([^{}\n]{1,60}?)\s*\}\}")
# A curly slot inside square brackets is one slot, brackets included: Bitext writes
# "visit [{{Website Name}}]", which filled inside the brackets would still show "[our website]".
_BRACKETED_RE = re.compile(r"\[[ \t]*" + _CURLY_RE.pattern + r"[ \t]*\](?!\()")
# A square-bracket slot is a short label of words; "[text](url)" is a Markdown link, not a slot.
_SQUARE_BODY = r"[A-Za-z][A-Za-z0-9 _/.'&-]{0,40}"
_SQUARE_RE = re.compile(r"\[(" + _SQUARE_BODY + r")\](?!\()")
# Bracketed first: at a "[" the bracketed slot is tried before the curly slot inside it is reached.
_SLOT_RE = re.compile(_BRACKETED_RE.pattern + "|" + _CURLY_RE.pattern + "|" + _SQUARE_RE.pattern)
_SQUARE_PREFIX_RE = re.compile(r"\[(?:" + _SQUARE_BODY + r")?$")

_SEPARATOR_TAIL_RE = re.compile(r"[ \t]*,?[ \t]*$")


@dataclass(frozen=True)
class _Neutral:
    core: str  # used after a determiner: "our {{Website Name}}" -> "our website"
    full: str  # used elsewhere: "visit {{Website URL}}" -> "visit our website"


@dataclass(frozen=True)
class _Language:
    """The words the filler writes in one language, and the words before a slot that change them.

    One table per language, read by one set of rules (``_resolve``): the neutral words
    for each slot kind, and the patterns for what may stand just before a slot.
    """

    neutral: Mapping[str, _Neutral]  # by slot kind
    ids: Mapping[str, _Neutral]  # order, invoice, account, tracking numbers nobody gave
    # A determiner right before the slot: the short form follows ("our {{Website Name}}").
    determiner: re.Pattern
    # "the order number: " before an ID slot (group ``det``: the determiner with its space, ``noun``):
    # the phrase becomes the customer's ("your order"), as the slot alone would repeat it.
    id_phrase: re.Pattern
    # The same for an address, e-mail or phone slot ("à l'adresse {{ADDRESS}}" -> "à votre adresse");
    # None: such a slot takes its neutral words after whatever precedes it.
    contact_phrase: re.Pattern | None
    # The customer's possessive for a phrase's determiner (lower case, "’" as "'"); "": no determiner.
    possessive: Mapping[str, str]
    bare_possessive: Mapping[str, str]  # a noun's own possessive without a determiner (German "Ihr Konto")
    noun_words: Mapping[str, str]  # what a noun becomes after the possessive ("tracking" -> "tracking number")
    keep_noun_case: bool  # German nouns keep their capital; other languages' are lower-cased
    # A number word alone before an ID slot ("with ID {{Order Number}}") and what follows it instead.
    provided: tuple[re.Pattern, str] | None
    # Greetings that take a word in place of a name nobody gave ("Hi {{NAME}}" -> "Hi there");
    # after any other greeting the name is left out ("Bonjour {{NAME}}," -> "Bonjour,").
    greeting: re.Pattern
    greeting_words: Mapping[str, str]  # greeting (lower case, single spaces) -> the word for the name
    customer_phone: re.Pattern  # before {{PHONE}}: the customer's own number, not the company's
    capital_after_colon: bool  # "Note: Your order" in English; French and the others go on in lower case
    elisions: Mapping[str, str]  # a determiner before a vowel: "le"/"la" -> "l'", "au" -> "à l'"
    # Words a later slot may rewrite stay held while streaming: the longest phrase a slot
    # consumes ("le numéro de commande n° :" before {{ORDER_ID}} is six words) fits in them.
    hold_words: int


def _phrase(determiners: str, nouns: str, numbers: str, plural: str = "") -> re.Pattern:
    """A phrase before a slot: an optional determiner, a noun (``plural`` its optional plural ending),
    an optional number word, maybe ":" or "#"."""
    return re.compile(
        rf"(?i)(?<!\w)(?P<det>(?:{determiners})(?:\s+|(?<=['’])))?(?P<noun>(?:{nouns})(?:{plural})?)"
        rf"(?:\s*(?:{numbers}))?\s*[:#]?\s*$"
    )


_ENGLISH = _Language(
    neutral={
        "support_phone": _Neutral("customer support phone line", "our customer support phone line"),
        "support_email": _Neutral("support e-mail address", "our support e-mail address"),
        "website": _Neutral("website", "our website"),
        "support_hours": _Neutral("support hours", "during business hours"),
        "company_name": _Neutral("company", "our company"),
        "returns_address": _Neutral("returns address", "our returns address"),
        "email": _Neutral("e-mail address", "your e-mail address"),
        "phone": _Neutral("phone number", "your phone number"),
        "address": _Neutral("address", "your address"),
        "card": _Neutral("card", "your card"),
        "iban": _Neutral("bank account", "your bank account"),
        "days": _Neutral("few days", "a few days"),
        "amount": _Neutral("applicable amount", "the applicable amount"),
        "date": _Neutral("date shown in your account", "the date shown in your account"),
    },
    ids={
        "order": _Neutral("order number", "your order number"),
        "invoice": _Neutral("invoice number", "your invoice number"),
        "account": _Neutral("account", "your account"),
        "tracking": _Neutral("tracking number", "your tracking number"),
    },
    determiner=re.compile(r"(?i)\b(?:our|the|your|its|their|this|that)\s+$"),
    id_phrase=re.compile(
        r"(?i)\b(?P<det>(?:the|your|this|that)\s+)?"
        r"(?P<noun>order|purchase|invoice|bill|account|refund|reservation|booking|tracking|ticket|reference|case)"
        r"(?:\s+(?:number|no\.?|#|id))?\s*[:#]?\s*$"
    ),
    contact_phrase=None,
    possessive={"": "your", "the": "your", "your": "your", "this": "your", "that": "your"},
    bare_possessive={},
    noun_words={"tracking": "tracking number"},
    keep_noun_case=False,
    provided=(re.compile(r"(?i)\b(?:number|no\.?|#|id)\s*[:#]?\s*$"), "you provided"),
    greeting=re.compile(r"(?i)\b(hi|hello|hey|dear)\s+$"),
    greeting_words={"hi": "there", "hello": "there", "hey": "there", "dear": "customer"},
    customer_phone=re.compile(r"(?i)\b(?:you at|your)\s*$"),
    capital_after_colon=True,
    elisions={},
    hold_words=4,
)

_FRENCH_DETERMINERS = r"la|le|les|l['’]|cette|ce|cet|ces|votre|vos|ta|ton|tes|du|au|aux"
_FRENCH = _Language(
    neutral={
        "support_phone": _Neutral("numéro du service client", "notre service client par téléphone"),
        "support_email": _Neutral("adresse e-mail du service client", "l'adresse e-mail de notre service client"),
        "website": _Neutral("site web", "notre site web"),
        "support_hours": _Neutral("horaires d'ouverture", "pendant nos horaires d'ouverture"),
        "company_name": _Neutral("entreprise", "notre entreprise"),
        "returns_address": _Neutral("adresse de retour", "notre adresse de retour"),
        "email": _Neutral("adresse e-mail", "votre adresse e-mail"),
        "phone": _Neutral("numéro de téléphone", "votre numéro de téléphone"),
        "address": _Neutral("adresse", "votre adresse"),
        "card": _Neutral("carte", "votre carte"),
        "iban": _Neutral("compte bancaire", "votre compte bancaire"),
        "days": _Neutral("quelques jours", "quelques jours"),
        "amount": _Neutral("montant applicable", "le montant applicable"),
        "date": _Neutral("date indiquée dans votre compte", "la date indiquée dans votre compte"),
    },
    ids={
        "order": _Neutral("numéro de commande", "votre numéro de commande"),
        "invoice": _Neutral("numéro de facture", "votre numéro de facture"),
        "account": _Neutral("compte", "votre compte"),
        "tracking": _Neutral("numéro de suivi", "votre numéro de suivi"),
    },
    determiner=re.compile(
        r"(?i)(?<!\w)(?:notre|nos|votre|vos|le|la|les|ce|cet|cette|ces|son|sa|ses|leur|leurs|du|au|aux)\s+$"
        r"|(?<!\w)l['’]$"
    ),
    id_phrase=_phrase(
        _FRENCH_DETERMINERS,
        r"(?:numéro|n°)\s+de\s+(?:commande|facture|suivi|compte|dossier|réservation|ticket)|commande|achat|facture"
        r"|compte|remboursement|réservation|suivi|dossier|ticket|référence|numéro|n°",
        r"n°|no\.?|numéro|#",
        plural="s",
    ),
    contact_phrase=_phrase(
        _FRENCH_DETERMINERS,
        r"adresse(?:\s+(?:e-mail|mail|électronique|de livraison|de facturation|postale))?|e-mail|courriel"
        r"|numéro\s+de\s+(?:téléphone|portable|mobile)|téléphone",
        r"(?!)",
    ),
    possessive={
        **dict.fromkeys(("", "la", "le", "l'", "cette", "ce", "cet", "votre", "ta", "ton"), "votre"),
        **dict.fromkeys(("les", "ces", "vos", "tes"), "vos"),
        "du": "de votre",
        "au": "à votre",
        "aux": "à vos",
    },
    bare_possessive={},
    noun_words={"n°": "numéro", "suivi": "numéro de suivi"},
    keep_noun_case=False,
    provided=None,  # "numéro" is a noun of the phrase: "le numéro {{ORDER_ID}}" -> "votre numéro"
    greeting=re.compile(r"(?i)\b(cher|chère)\s+$"),
    greeting_words={"cher": "client", "chère": "cliente"},
    customer_phone=re.compile(r"(?i)(?:\bvotre|\bvous\s+(?:au|à))\s*$"),
    capital_after_colon=False,
    elisions={"le": "l'", "la": "l'", "au": "à l'", "du": "de l'"},
    hold_words=7,
)

_SPANISH_DETERMINERS = r"el|la|los|las|su|sus|tu|tus|este|esta|estos|estas|ese|esa|del|al"
_SPANISH = _Language(
    neutral={
        "support_phone": _Neutral("teléfono de atención al cliente", "nuestro teléfono de atención al cliente"),
        "support_email": _Neutral(
            "correo electrónico de atención al cliente", "nuestro correo electrónico de atención al cliente"
        ),
        "website": _Neutral("sitio web", "nuestro sitio web"),
        "support_hours": _Neutral("horario de atención", "en nuestro horario de atención"),
        "company_name": _Neutral("empresa", "nuestra empresa"),
        "returns_address": _Neutral("dirección de devoluciones", "nuestra dirección de devoluciones"),
        "email": _Neutral("correo electrónico", "su correo electrónico"),
        "phone": _Neutral("número de teléfono", "su número de teléfono"),
        "address": _Neutral("dirección", "su dirección"),
        "card": _Neutral("tarjeta", "su tarjeta"),
        "iban": _Neutral("cuenta bancaria", "su cuenta bancaria"),
        "days": _Neutral("pocos días", "unos días"),
        "amount": _Neutral("importe correspondiente", "el importe correspondiente"),
        "date": _Neutral("fecha que figura en su cuenta", "la fecha que figura en su cuenta"),
    },
    ids={
        "order": _Neutral("número de pedido", "su número de pedido"),
        "invoice": _Neutral("número de factura", "su número de factura"),
        "account": _Neutral("cuenta", "su cuenta"),
        "tracking": _Neutral("número de seguimiento", "su número de seguimiento"),
    },
    determiner=re.compile(
        r"(?i)(?<!\w)(?:nuestro|nuestra|nuestros|nuestras|su|sus|el|la|los|las|este|esta|estos|estas|ese|esa"
        r"|del|al)\s+$"
    ),
    id_phrase=_phrase(
        _SPANISH_DETERMINERS,
        r"(?:número|n\.?º)\s+de\s+(?:pedido|factura|seguimiento|cuenta|reserva|referencia|ticket)|pedido|compra"
        r"|factura|cuenta|reembolso|devolución|reserva|seguimiento|ticket|referencia|caso|número|n\.?º",
        r"n\.?º|no\.?|número|#",
        plural="e?s",
    ),
    contact_phrase=_phrase(
        _SPANISH_DETERMINERS,
        r"dirección(?:\s+de\s+(?:correo(?:\s+electrónico)?|envío|entrega|facturación))?|correo(?:\s+electrónico)?"
        r"|número\s+de\s+(?:teléfono|móvil)|teléfono",
        r"(?!)",
    ),
    possessive={
        **dict.fromkeys(("", "el", "la", "su", "tu", "este", "esta", "ese", "esa"), "su"),
        **dict.fromkeys(("los", "las", "sus", "tus", "estos", "estas"), "sus"),
        "del": "de su",
        "al": "a su",
    },
    bare_possessive={},
    noun_words={"nº": "número", "n.º": "número", "seguimiento": "número de seguimiento"},
    keep_noun_case=False,
    provided=None,
    greeting=re.compile(r"(?i)\b(estimado|estimada|querido|querida)\s+$"),
    greeting_words={"estimado": "cliente", "estimada": "clienta", "querido": "cliente", "querida": "clienta"},
    customer_phone=re.compile(r"(?i)\b(?:su|tu)\s*$"),
    capital_after_colon=False,
    elisions={},
    hold_words=7,
)

# German articles fix the possessive's case and gender ("der Bestellung" -> "Ihrer Bestellung"),
# so the phrase nouns are feminine or neuter only: a masculine noun's "der" would read as dative.
_GERMAN_DETERMINERS = (
    r"die|der|das|dem|des|den|diese|dieser|dieses|diesem|Ihre|Ihr|Ihrer|Ihrem|Ihres|Ihren|eine|einer|zur|zum|im|vom"
    r"|beim"
)
_GERMAN = _Language(
    neutral={
        "support_phone": _Neutral("Kundenservice-Hotline", "unsere Kundenservice-Hotline"),
        "support_email": _Neutral("E-Mail-Adresse des Kundenservice", "die E-Mail-Adresse unseres Kundenservice"),
        "website": _Neutral("Website", "unsere Website"),
        "support_hours": _Neutral("Geschäftszeiten", "während unserer Geschäftszeiten"),
        "company_name": _Neutral("Unternehmen", "unser Unternehmen"),
        "returns_address": _Neutral("Rücksendeadresse", "unsere Rücksendeadresse"),
        "email": _Neutral("E-Mail-Adresse", "Ihre E-Mail-Adresse"),
        "phone": _Neutral("Telefonnummer", "Ihre Telefonnummer"),
        "address": _Neutral("Adresse", "Ihre Adresse"),
        "card": _Neutral("Karte", "Ihre Karte"),
        "iban": _Neutral("Bankverbindung", "Ihre Bankverbindung"),
        "days": _Neutral("Tage", "wenige Tage"),
        "amount": _Neutral("entsprechenden Betrag", "den entsprechenden Betrag"),
        "date": _Neutral("in Ihrem Konto angezeigte Datum", "das in Ihrem Konto angezeigte Datum"),
    },
    ids={
        "order": _Neutral("Bestellnummer", "Ihre Bestellnummer"),
        "invoice": _Neutral("Rechnungsnummer", "Ihre Rechnungsnummer"),
        "account": _Neutral("Konto", "Ihr Konto"),
        "tracking": _Neutral("Sendungsnummer", "Ihre Sendungsnummer"),
    },
    determiner=re.compile(
        r"(?i)(?<!\w)(?:der|die|das|den|dem|des|unser|unsere|unseren|unserem|unserer|unseres|Ihr|Ihre|Ihren"
        r"|Ihrem|Ihrer|Ihres|diese|dieser|dieses|diesen|diesem|zur|zum|im|vom|beim)\s+$"
    ),
    id_phrase=_phrase(
        _GERMAN_DETERMINERS,
        r"Bestellnummer|Bestellung|Auftragsnummer|Rechnungsnummer|Rechnung|Kundennummer|Kundenkonto|Kontonummer"
        r"|Konto|Rückerstattung|Erstattung|Buchungsnummer|Buchung|Reservierungsnummer|Reservierung"
        r"|Sendungsnummer|Trackingnummer|Sendungsverfolgung|Sendung|Ticketnummer|Ticket|Vorgangsnummer"
        r"|Referenznummer|Referenz|Nummer|Nr\.?",
        r"Nr\.?|Nummer|#|ID",
    ),
    contact_phrase=_phrase(
        _GERMAN_DETERMINERS,
        r"E-Mail-Adresse|Lieferadresse|Rechnungsadresse|Adresse|Anschrift|Telefonnummer|Handynummer|Rufnummer"
        r"|E-Mail",
        r"(?!)",
    ),
    possessive={
        **dict.fromkeys(("", "die", "diese", "ihre", "eine"), "Ihre"),
        **dict.fromkeys(("der", "dieser", "ihrer", "einer"), "Ihrer"),
        **dict.fromkeys(("das", "dieses", "ihr"), "Ihr"),
        **dict.fromkeys(("dem", "diesem", "ihrem"), "Ihrem"),
        **dict.fromkeys(("des", "ihres"), "Ihres"),
        **dict.fromkeys(("den", "ihren"), "Ihren"),
        "zur": "zu Ihrer",
        "zum": "zu Ihrem",
        "im": "in Ihrem",
        "vom": "von Ihrem",
        "beim": "bei Ihrem",
    },
    bare_possessive={"konto": "Ihr", "kundenkonto": "Ihr", "ticket": "Ihr"},
    noun_words={"nr.": "Nummer", "nr": "Nummer"},
    keep_noun_case=True,
    provided=None,
    greeting=re.compile(r"(?i)\b(sehr geehrter|sehr geehrte|lieber|liebe)\s+$"),
    greeting_words={"sehr geehrter": "Kunde", "sehr geehrte": "Kundin", "lieber": "Kunde", "liebe": "Kundin"},
    customer_phone=re.compile(r"(?i)(?:\bIhre|\bIhrer|\bSie\s+unter)\s*$"),
    capital_after_colon=False,
    elisions={},
    hold_words=6,
)

# The languages with neutral words of their own; a reply in any other language gets the English ones.
_LANGUAGES = {"en": _ENGLISH, "fr": _FRENCH, "es": _SPANISH, "de": _GERMAN}
LANGUAGES = tuple(_LANGUAGES)
DEFAULT_LANGUAGE = "en"
# Words a stream holds back: the longest phrase any language's rules rewrite.
_HOLD_WORDS_ANY = max(lang.hold_words for lang in _LANGUAGES.values())
# A reply's text before a slot decides the slot's language from this many letters on; a
# shorter start ("Bonjour, ") leaves it to the conversation's language.
_MIN_REPLY_LETTERS = 20


def _language(code: str | None) -> _Language:
    return _LANGUAGES.get((code or "").lower(), _ENGLISH)


def slot_kind(name: str) -> str:
    """What a slot stands for, from its name ("Customer Support Phone Number" -> "support_phone")."""
    raw = name.strip()
    upper = raw.upper()
    redaction = {
        "EMAIL": "email",
        "PHONE": "phone_any",
        "CARD": "card",
        "IBAN": "iban",
        "URL": "website",
        "NUMBER": "order",
        "NAME": "name",
        "ADDRESS": "address",
        "ACCOUNT_ID": "account",
        "ORDER_ID": "order",
        "INVOICE_ID": "invoice",
    }
    if raw == upper and upper in redaction:
        return redaction[upper]
    n = " " + re.sub(r"[^a-z0-9]+", " ", raw.lower().replace("anonymized", "")).strip() + " "
    has = lambda *words: any(f" {w} " in n for w in words)  # noqa: E731 - a one-line local helper
    customer = has("customer", "client", "your", "user") and not has("support", "service", "care", "help")
    if has("phone", "telephone", "hotline", "helpline", "toll"):
        return "phone" if customer else "support_phone"
    if has("email", "e mail", "mail"):
        return "email" if customer else "support_email"
    if has("url", "website", "site", "webpage", "web"):
        return "website"
    if has("hours", "availability", "available", "opening"):
        return "support_hours"
    if has("company", "store", "business", "brand") and has("name") or n.strip() in {"company", "store"}:
        return "company_name"
    if has("address"):
        if has("return", "returns", "warehouse", "office", "our", "company"):
            return "returns_address"
        if has("shipping", "delivery", "billing") and not customer:
            return "label"
        return "address"
    if has("tracking") and has("number", "id", "code"):
        return "tracking"
    if has("order", "purchase", "transaction") and has("number", "id", "no"):
        return "order"
    if has("invoice", "bill", "receipt") and has("number", "id", "no"):
        return "invoice"
    if has("account") and has("number", "id", "no"):
        return "account"
    if has("name") and (has("customer", "client", "person", "field", "first", "last", "full", "user") or n == " name "):
        return "name"
    if has("days", "day", "weeks"):
        return "days"
    if has("amount", "fee", "price", "cost", "sum", "total"):
        return "amount"
    if has("date"):
        return "date"
    return "label"


def _capitalise_if_sentence_start(text: str, before: str, lang: _Language) -> str:
    stripped = before.rstrip(" \t")
    ends = (".", "!", "?", "\n", ":") if lang.capital_after_colon else (".", "!", "?", "\n")
    if text and (not stripped or stripped.endswith(ends)) and not before.endswith(":"):
        return text[0].upper() + text[1:]
    return text


def _after_determiner(core: str, before: str, lang: _Language) -> tuple[str, int]:
    """The short form after a determiner, the determiner elided where the language does
    ("au {{Customer Support Email}}" -> "à l'adresse e-mail du service client")."""
    if core[:1].lower() in "aeiouéèêh" and lang.elisions:
        determiner = lang.determiner.search(before)
        word = determiner.group().strip() if determiner else ""
        elided = lang.elisions.get(word.lower())
        if elided:
            elided = elided[0].upper() + elided[1:] if word[:1].isupper() else elided
            return elided + core, len(before) - determiner.start()
    return core, 0


def _resolve(name: str, before: str, after: str, facts: Mapping[str, str], values: Mapping[str, str], lang: _Language):
    """``(replacement, characters of before to remove)`` for one slot, in ``lang``'s words."""
    kind = slot_kind(name)
    if kind == "phone_any":  # {{PHONE}} is the company's line unless the reply addresses the customer's
        kind = "phone" if lang.customer_phone.search(before) else "support_phone"
    fact_key = {"website": None}.get(kind, kind)
    if kind == "website":
        value = facts.get("website_url") or facts.get("website_name")
        if value:
            # "our {{Website URL}}" -> "https://acme.example", not "our https://acme.example".
            determiner = lang.determiner.search(before) if "." in value else None
            return value, (len(before) - determiner.start()) if determiner else 0
    elif fact_key in FACT_KEYS and facts.get(fact_key):
        return facts[fact_key], 0
    if kind in {"email", "phone", "address"} and values.get(kind):
        return values[kind], 0
    if kind in lang.ids:
        if values.get(kind):
            return values[kind], 0
        phrase = lang.id_phrase.search(before)
        if phrase:
            return _customers_phrase(phrase, before, lang)
        if lang.provided is not None and lang.provided[0].search(before):
            return lang.provided[1], 0
        if lang.determiner.search(before):  # "check the {{Order Number}}" -> "check the order number"
            return _after_determiner(lang.ids[kind].core, before, lang)
        return _capitalise_if_sentence_start(lang.ids[kind].full, before, lang), 0
    if kind == "name":
        if values.get("name"):
            return values["name"], 0
        greeting = lang.greeting.search(before)
        if greeting:
            return lang.greeting_words[" ".join(greeting.group(1).lower().split())], 0
        tail = _SEPARATOR_TAIL_RE.search(before)
        consumed = len(tail.group()) if tail else 0
        if after[:1].isalnum():
            return (", " if "," in tail.group() else " ") if consumed else "", consumed
        return "", consumed
    if kind in {"email", "phone", "address"} and lang.contact_phrase is not None:
        phrase = lang.contact_phrase.search(before)
        if phrase:  # "à l'adresse {{ADDRESS}}" -> "à votre adresse"
            return _customers_phrase(phrase, before, lang)
    if kind in lang.neutral:
        neutral = lang.neutral[kind]
        if lang.determiner.search(before):
            return _after_determiner(neutral.core, before, lang)
        return _capitalise_if_sentence_start(neutral.full, before, lang), 0
    # A screen, button or section name: its own words.
    words = " ".join(re.sub(r"[_]+", " ", name).split())
    return (words.lower() if words.isupper() else words), 0


def _customers_phrase(phrase: re.Match, before: str, lang: _Language) -> tuple[str, int]:
    """The phrase before a slot nobody could fill, made the customer's: "the order number:" -> "your order".

    The phrase (from its determiner on) is replaced, so its number word and colon go too.
    """
    noun = " ".join(phrase.group("noun").split())
    key = noun.lower()
    det = " ".join((phrase.group("det") or "").split()).lower().replace("’", "'")
    possessive = lang.possessive[det] if det else lang.bare_possessive.get(key, lang.possessive[""])
    words = lang.noun_words.get(key, noun if lang.keep_noun_case else key)
    text = f"{possessive} {words}"
    return _capitalise_if_sentence_start(text, before[: phrase.start()], lang), len(before) - phrase.start()


def fill_placeholders(
    text: str,
    facts: Mapping[str, str] | None = None,
    values: Mapping[str, str] | None = None,
    language: str | None = None,
) -> str:
    """``text`` with every complete slot filled (see the module docstring) and stray braces removed.

    ``language`` (ISO 639-1, the conversation's) chooses the neutral words; English when
    it is None or a language without words of its own here (``LANGUAGES``).
    """
    return _sanitise(_fill(text, facts or {}, values or {}, _language(language)), final=True)


def _fill(text: str, facts: Mapping[str, str], values: Mapping[str, str], lang: _Language) -> str:
    """Fill every complete slot; each slot's words are in the language of the reply before it
    when that text is long enough to tell (``_text_language``), else in ``lang`` (the
    conversation's). A reply can differ from its conversation: an English past answer sent to
    a question the detector took for German ("reinburse $3") must not get German words."""
    out = ""
    last = 0
    for match in _SLOT_RE.finditer(text):
        out += text[last : match.start()]
        name = next(group for group in match.groups() if group is not None)
        spoken = _text_language(out)
        slot_lang = _LANGUAGES[spoken] if spoken in _LANGUAGES else lang
        replacement, consumed = _resolve(name, out, text[match.end() : match.end() + 1], facts, values, slot_lang)
        if consumed:
            out = out[:-consumed]
        out += replacement
        last = match.end()
    return out + text[last:]


@functools.lru_cache(maxsize=1024)
def _text_language(text: str) -> str | None:
    """The language of a reply's text so far, or None when it is too short to tell. Cached: a
    stream fills the same prefix again at every piece."""
    from finetune.ml.segments import UNDETERMINED_LANGUAGE, detect_language

    if sum(c.isalpha() for c in text) < _MIN_REPLY_LETTERS:
        return None
    language = detect_language(text)
    return None if language == UNDETERMINED_LANGUAGE else language


def _sanitise(text: str, *, final: bool) -> str:
    """Remove what is left of a slot: a brace pair's debris, and at the end an unclosed slot."""
    if final:
        text = re.sub(r"\{\{[^{}\n]*$", "", text)  # a slot cut off by the end of generation
        text = _SQUARE_PREFIX_RE.sub("", text) if _SQUARE_PREFIX_RE.search(text) else text
    text = text.replace("{{", "").replace("}}", "")
    return text


def reply_language(messages: Iterable[Mapping[str, str]], stored: str | None = None) -> str:
    """The conversation's language (ISO 639-1): a reply's neutral words are written in it
    unless the reply's own text before a slot tells another (see ``_fill``).

    ``stored`` is the label saved with the customer's latest message when it was written
    (``finetune.ml.segments.message_segments``); when it names a language it is used as
    is. Otherwise the customer's turns are detected here, newest first, until one is long
    enough to tell ("1234" after a French message is still a French conversation); English
    when none is. Call it once per reply, not per token.
    """
    from finetune.ml.segments import UNDETERMINED_LANGUAGE, detect_language

    if stored and stored != UNDETERMINED_LANGUAGE:
        return stored
    for message in reversed(list(messages)):
        if message.get("role") != "customer" or not (message.get("content") or "").strip():
            continue
        language = detect_language(message["content"])
        if language != UNDETERMINED_LANGUAGE:
            return language
    return DEFAULT_LANGUAGE


def customer_values(messages: Iterable[Mapping[str, str]], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """Values the customer gave in the conversation (their latest mention wins), over ``known``.

    ``known`` holds what the help desk already knows (the customer's name and e-mail);
    an order number the customer wrote in this chat is found here.
    """
    values = {k: v for k, v in (known or {}).items() if v}
    for message in messages:
        if message.get("role") != "customer":
            continue
        text = message.get("content") or ""
        for match in _VALUE_RE.finditer(text):
            noun = match.group("noun").lower()
            key = {"purchase": "order", "bill": "invoice", "receipt": "invoice"}.get(noun, noun)
            values[key] = match.group("value")
        email = _EMAIL_RE.search(text)
        if email:
            values["email"] = email.group()
        if "order" not in values:
            bare = _BARE_NUMBER_RE.search(text)
            if bare:
                values["order"] = bare.group()
    return values


_VALUE_RE = re.compile(
    r"(?i)\b(?P<noun>order|purchase|invoice|bill|receipt|account|tracking)"
    r"(?:\s+(?:number|no\.?|#|id|code))?\s*[:#]?\s*(?P<value>(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{2,})\b"
)
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_BARE_NUMBER_RE = re.compile(r"(?<![\w+])\d{5,}(?![\w])")


class PlaceholderFiller:
    """``fill_placeholders`` on a stream of text pieces; see the module docstring."""

    def __init__(
        self,
        facts: Mapping[str, str] | None = None,
        values: Mapping[str, str] | None = None,
        language: str | None = None,
    ):
        self.facts = dict(facts or {})
        self.values = dict(values or {})
        self.language = language
        self._lang = _language(language)
        self.raw = ""
        self._sent = ""

    def push(self, delta: str) -> str:
        self.raw += delta
        filled = _sanitise(_fill(self.raw[: self._stable_end()], self.facts, self.values, self._lang), final=False)
        # The last words of the filled text wait: a slot still to come may rewrite them
        # ("your order number: " before {{ORDER_ID}} becomes "your order").
        hold = _HOLD_WORDS_ANY  # a slot's words may be in any language's (see ``_fill``)
        words = list(re.finditer(r"\S+", filled))
        stable = filled[: words[-hold].start()] if len(words) >= hold else ""
        if len(stable) <= len(self._sent) or not stable.startswith(self._sent):
            return ""
        out = stable[len(self._sent) :]
        self._sent = stable
        return out

    def flush(self) -> str:
        """The rest of the reply: call once when generation has ended."""
        final = fill_placeholders(self.raw, self.facts, self.values, self.language)
        if not final.startswith(self._sent):  # cannot happen for text built by push; kept safe anyway
            final = self._sent + final[len(self._sent) :]
        out = final[len(self._sent) :]
        self._sent = final
        return out

    @property
    def text(self) -> str:
        """Everything returned so far (the filled reply once ``flush`` was called)."""
        return self._sent

    def _stable_end(self) -> int:
        """How much of ``raw`` holds only complete slots, each with the character after it."""
        raw = self.raw
        end = len(raw)
        # An unclosed "{" or "[" may still become a slot.
        brace = raw.rfind("{")
        # (Not a slot once it runs past a line break or a slot's length.)
        if brace != -1 and "}}" not in raw[brace:] and "\n" not in raw[brace:] and len(raw) - brace <= 66:
            opening = brace - 1 if brace > 0 and raw[brace - 1] == "{" else brace
            end = min(end, opening)
        square = _SQUARE_PREFIX_RE.search(raw)
        if square:
            end = min(end, square.start())
        # A slot that just closed waits for the next character ("[Live Chat](" is a link;
        # an omitted name needs to know whether punctuation follows).
        for match in _SLOT_RE.finditer(raw[:end]):
            if match.end() == end:
                end = match.start()
        return end
