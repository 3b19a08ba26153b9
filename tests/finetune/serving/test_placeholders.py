"""Template slots are filled from company facts and the customer's values, also across token boundaries."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.serving.placeholders import (
    PlaceholderFiller,
    customer_values,
    fill_placeholders,
    reply_language,
    slot_kind,
)

FACTS = {
    "company_name": "Acme",
    "support_phone": "0800 555 0199",
    "support_email": "support@acme.example",
    "website_url": "acme.example",
    "support_hours": "Monday to Friday, 8:00 to 18:00",
}
SLOT = re.compile(r"\{\{|\}\}|\[[A-Za-z][A-Za-z0-9 _/.'&-]{0,40}\](?!\()")
# Words only the English filler writes: never in a French, Spanish or German reply.
ENGLISH_FILLER = re.compile(r"(?i)\b(?:your|our|there|customer|during|number|you provided)\b")

BITEXT_REPLY = (
    "I understand how unnerving it can be to cancel an order, especially if it's order number "
    "{{Order Number}}. No worries, {{NAME}}, here's how:\n\n1. Log into our {{Website Name}}.\n"
    "2. Spot the {{Order Details}} section.\n\nOur team is available {{Customer Support Availability}} "
    "on {{Customer Support Phone Number}}, via {{Live Chat}} or at [Customer Support Email]. "
    "Call {{PHONE}} or visit {{Website URL}}. See [our guide](https://acme.example/help)."
)


def test_known_slots_take_company_facts_and_the_customers_values():
    values = customer_values([{"role": "customer", "content": "please cancel order 4512-77, I'm Dana"}])

    reply = fill_placeholders(BITEXT_REPLY, FACTS, values)

    assert values["order"] == "4512-77"
    assert "order number 4512-77." in reply
    assert "Log into acme.example." in reply
    assert (
        "available Monday to Friday, 8:00 to 18:00 on 0800 555 0199, via Live Chat or at support@acme.example" in reply
    )
    assert "Call 0800 555 0199 or visit acme.example." in reply
    assert "Spot the Order Details section" in reply
    assert "[our guide](https://acme.example/help)" in reply  # a Markdown link is not a slot
    assert not SLOT.search(reply)


def test_unknown_slots_become_neutral_words():
    reply = fill_placeholders(BITEXT_REPLY)

    assert "especially if it's your order." in reply
    assert "No worries, here's how" in reply  # the unknown name leaves with its comma
    assert "Log into our website." in reply
    assert "available during business hours on our customer support phone line" in reply
    assert not SLOT.search(reply)


def test_an_unknown_number_after_a_determiner_takes_no_second_determiner():
    # "the your order number" read as a slot filled by a machine.
    assert fill_placeholders("for your order with the {{NUMBER}}.") == "for your order with the order number."
    assert fill_placeholders("Check your {{Order Number}} first.") == "Check your order number first."
    assert fill_placeholders("About this {{Invoice Number}}.") == "About this invoice number."
    assert fill_placeholders("Regarding {{Order Number}}.") == "Regarding your order number."
    assert fill_placeholders("Check the {{Order Number}}.", values={"order": "4512"}) == "Check the 4512."


def test_redaction_placeholders_and_a_cut_off_slot():
    reply = fill_placeholders("Hi {{NAME}}, we e-mailed {{EMAIL}} about invoice {{INVOICE_ID}}. See {{Order Num")

    assert reply == "Hi there, we e-mailed your e-mail address about your invoice. See "


BRACKETED_REPLY = (
    'To reach us, please visit [{{Website Name}}] and navigate to the "Contact Us" page, '
    "or quote [ {{Order Number}} ] when you call. See [{{Website Name}}](https://acme.example/help)."
)


def test_a_slot_in_square_brackets_is_filled_brackets_and_all():
    # Bitext writes "visit [{{Website Name}}]"; filling inside the brackets left "[our website]".
    neutral = fill_placeholders(BRACKETED_REPLY)
    known = fill_placeholders(BRACKETED_REPLY, FACTS, {"order": "4512-77"})

    assert neutral.startswith("To reach us, please visit our website and navigate")
    assert "or quote your order number when you call" in neutral
    assert "please visit acme.example and navigate" in known
    assert "or quote 4512-77 when you call" in known
    assert "See [our website](https://acme.example/help)." in neutral  # a Markdown link keeps its brackets
    assert not SLOT.search(neutral)
    assert not SLOT.search(known)


def test_slot_names_map_to_kinds():
    assert slot_kind("Customer Support Phone Number") == "support_phone"
    assert slot_kind("Order Number Anonymized") == "order"
    assert slot_kind("Website URL") == "website"
    assert slot_kind("ORDER_ID") == "order"
    assert slot_kind("Live Chat") == "label"
    assert slot_kind("address") == "address"


def _stream(text: str, cuts: list[int], facts=None, values=None, language=None) -> tuple[str, list[str]]:
    filler = PlaceholderFiller(facts, values, language)
    pieces, last = [], 0
    for cut in [*sorted(set(cuts)), len(text)]:
        pieces.append(filler.push(text[last:cut]))
        last = cut
    pieces.append(filler.flush())
    return "".join(pieces), pieces


def test_streaming_fills_a_slot_split_across_tokens():
    text = "Call us on {{Customer Support Phone Number}} today, or write to us any time you like."
    cuts = [11, 12, 13, 20, 44, 45, 46]  # "{", "{", inside the name, "}", "}"

    streamed, pieces = _stream(text, cuts, FACTS)

    assert (
        streamed
        == fill_placeholders(text, FACTS)
        == ("Call us on 0800 555 0199 today, or write to us any time you like.")
    )
    assert all("{" not in p and "}" not in p for p in pieces)
    assert pieces[0] == ""  # "Call us on " is held: a slot may start
    assert any(pieces[:-1])  # text went out before the end: streaming stays incremental


def test_streaming_a_bracketed_slot_split_across_tokens():
    text = "Please visit [{{Website Name}}] and navigate to the Contact Us page for more help."
    # "[" alone, "{" "{", inside the name, "}}" then "]" in its own token, then the next word.
    cuts = [13, 14, 15, 20, 28, 29, 30, 31, 35]

    streamed, pieces = _stream(text, cuts)

    assert (
        streamed
        == fill_placeholders(text)
        == "Please visit our website and navigate to the Contact Us page for more help."
    )
    sent = ""
    for piece in pieces:
        sent += piece
        assert "[" not in sent
        assert "{" not in sent
    assert any(pieces[:-1])


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(BRACKETED_REPLY)), max_size=40), known=st.booleans())
def test_any_token_split_of_bracketed_slots_streams_the_same_text(cuts, known):
    facts = FACTS if known else {}

    streamed, pieces = _stream(BRACKETED_REPLY, cuts, facts)

    assert streamed == fill_placeholders(BRACKETED_REPLY, facts)
    sent = ""
    for piece in pieces:
        sent += piece
        assert not SLOT.search(sent)  # "[our website]" would be one; "[our website](url)" is a link


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(BITEXT_REPLY)), max_size=60), known=st.booleans())
def test_any_token_split_streams_the_same_text_and_never_a_slot(cuts, known):
    values = {"order": "4512-77", "name": "Dana"} if known else {}
    facts = FACTS if known else {}

    streamed, pieces = _stream(BITEXT_REPLY, cuts, facts, values)

    assert streamed == fill_placeholders(BITEXT_REPLY, facts, values)
    sent = ""
    for piece in pieces:
        sent += piece
        assert not SLOT.search(sent)


# --- neutral words in the conversation's language ---------------------------------------------

FRENCH_REPLY = (
    "Bonjour {{NAME}}, c'est fait : la commande {{ORDER_ID}} sera livrée à l'adresse {{ADDRESS}}. "
    "Suivez-la sur notre {{Website Name}} ou appelez-nous au {{Customer Support Phone Number}} "
    "{{Customer Support Availability}}. Écrivez au {{Customer Support Email}} en rappelant le numéro "
    "de commande n° : {{Order Number}}, et consultez {{Website URL}}. Cher {{NAME}}, merci !"
)


def test_a_french_reply_gets_french_neutral_words():
    reply = fill_placeholders(FRENCH_REPLY, language="fr")

    assert reply == (
        "Bonjour, c'est fait : votre commande sera livrée à votre adresse. "
        "Suivez-la sur notre site web ou appelez-nous au numéro du service client "
        "pendant nos horaires d'ouverture. Écrivez à l'adresse e-mail du service client en rappelant votre "
        "numéro de commande, et consultez notre site web. Cher client, merci !"
    )
    assert not ENGLISH_FILLER.search(reply)


def test_the_english_rules_hold_in_french():
    fr = lambda text, **kw: fill_placeholders(text, language="fr", **kw)  # noqa: E731
    # A determiner before the slot: the short form, not "notre notre site web".
    assert fr("Connectez-vous à notre {{Website Name}}.") == "Connectez-vous à notre site web."
    assert fr("Visitez {{Website Name}}.") == "Visitez notre site web."
    assert fr("Vérifiez le {{Order Number}}.") == "Vérifiez le numéro de commande."
    # An ID phrase becomes the customer's, whatever its determiner.
    assert fr("La commande {{Order Number}} est partie.") == "Votre commande est partie."
    assert fr("Le suivi de la facture {{Invoice Number}}.") == "Le suivi de votre facture."
    assert fr("Le statut du numéro de suivi {{Tracking Number}}.") == "Le statut de votre numéro de suivi."
    assert fr("Les commandes {{Order Number}} sont parties.") == "Vos commandes sont parties."
    assert fr("Concernant {{Order Number}}.") == "Concernant votre numéro de commande."
    # An unknown name after a greeting is left out; "Cher" takes a word in its place.
    assert fr("Bonjour {{NAME}}, merci.") == "Bonjour, merci."
    assert fr("Bonjour {{NAME}} !") == "Bonjour !"
    assert fr("Chère {{NAME}}, merci.") == "Chère cliente, merci."
    # Known values still win, in any language.
    assert fr("La commande {{Order Number}}.", values={"order": "4512"}) == "La commande 4512."
    assert fr("Bonjour {{NAME}},", values={"name": "Léa"}) == "Bonjour Léa,"
    # A determiner before a vowel is elided.
    assert fr("Écrivez au {{Customer Support Email}}.") == "Écrivez à l'adresse e-mail du service client."
    # {{PHONE}} is the customer's own number after "votre", the company's line otherwise.
    assert fr("Nous vous appellerons sur votre {{PHONE}}.") == "Nous vous appellerons sur votre numéro de téléphone."
    assert fr("Appelez {{PHONE}}.") == "Appelez notre service client par téléphone."


def test_spanish_neutral_words_and_rules():
    es = lambda text, **kw: fill_placeholders(text, language="es", **kw)  # noqa: E731
    assert es("Hola {{NAME}}, el pedido {{ORDER_ID}} llegará a la dirección {{ADDRESS}}.") == (
        "Hola, su pedido llegará a su dirección."
    )
    assert es("Visite {{Website URL}} o llame a {{Customer Support Phone Number}}.") == (
        "Visite nuestro sitio web o llame a nuestro teléfono de atención al cliente."
    )
    assert es("Inicie sesión en nuestro {{Website Name}}.") == "Inicie sesión en nuestro sitio web."
    assert es("El estado del número de pedido {{Order Number}}.") == "El estado de su número de pedido."
    assert es("Consulte {{Invoice Number}}.") == "Consulte su número de factura."
    assert es("Estimada {{NAME}}, gracias.") == "Estimada clienta, gracias."


def test_german_neutral_words_and_rules():
    de = lambda text, **kw: fill_placeholders(text, language="de", **kw)  # noqa: E731
    assert de("Hallo {{NAME}}, die Bestellung {{ORDER_ID}} wird an die Adresse {{ADDRESS}} geliefert.") == (
        "Hallo, Ihre Bestellung wird an Ihre Adresse geliefert."
    )
    # The article fixes the possessive's case and gender.
    assert de("Zur Bestellung Nr. {{Order Number}} gibt es Neuigkeiten.") == "Zu Ihrer Bestellung gibt es Neuigkeiten."
    assert de("Das Konto {{Account Number}} ist gesperrt.") == "Ihr Konto ist gesperrt."
    assert de("Konto {{Account Number}} ist gesperrt.") == "Ihr Konto ist gesperrt."
    assert de("Melden Sie sich auf unserer {{Website Name}} an.") == "Melden Sie sich auf unserer Website an."
    assert de("Rufen Sie {{Customer Support Phone Number}} an.") == "Rufen Sie unsere Kundenservice-Hotline an."
    assert de("Sehr geehrte {{NAME}}, danke.") == "Sehr geehrte Kundin, danke."


def test_english_and_languages_without_words_of_their_own_keep_the_english_words():
    english = fill_placeholders(BITEXT_REPLY)

    assert fill_placeholders(BITEXT_REPLY, language="en") == english
    assert fill_placeholders(BITEXT_REPLY, language="it") == english  # no Italian table: English, as before
    assert fill_placeholders(BITEXT_REPLY, language="und") == english


def test_the_reply_language_is_the_stored_label_or_the_customers_latest_that_tells():
    french = [
        {"role": "customer", "content": "Bonjour, je voudrais changer l'adresse de livraison de ma commande."},
        {"role": "agent", "content": "Could you give me the order number?"},
        {"role": "customer", "content": "12345678"},  # too short to tell: the message before decides
    ]

    assert reply_language(french) == "fr"
    assert reply_language(french, "de") == "de"  # a stored label is used as is, not detected again
    assert reply_language(french, "und") == "fr"
    assert reply_language([{"role": "customer", "content": "ok"}]) == "en"
    assert reply_language([]) == "en"


FRENCH_ENDINGS = (
    "Votre remboursement arrive sous cinq jours ouvrés.",
    "Merci de votre patience, à bientôt !",
)
# The longest phrases the Spanish and German rules rewrite, streamed with each language's table.
OTHER_PHRASES = (
    "Consulte el estado del número de pedido n.º : {{Order Number}} en {{Website URL}}.",
    "Zur Bestellung Nr. : {{ORDER_ID}} senden wir an die Adresse {{ADDRESS}}.",
)
STREAMED = FRENCH_REPLY + " " + " ".join(OTHER_PHRASES) + " " + " ".join(FRENCH_ENDINGS)


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(STREAMED)), max_size=80),
    known=st.booleans(),
    language=st.sampled_from(["fr", "es", "de"]),
)
def test_any_token_split_of_a_non_english_reply_streams_the_same_text(cuts, known, language):
    values = {"order": "4512-77", "name": "Léa"} if known else {}
    facts = FACTS if known else {}

    # The longest phrases a slot rewrites ("le numéro de commande n° :") are held back until they cannot change.
    streamed, pieces = _stream(STREAMED, cuts, facts, values, language)

    assert streamed == fill_placeholders(STREAMED, facts, values, language)
    sent = ""
    for piece in pieces:
        sent += piece
        assert not SLOT.search(sent)
    assert any(pieces[:-1])  # text went out before the end


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_french_streaming_stays_incremental(size):
    cuts = list(range(size, len(STREAMED), size))

    streamed, pieces = _stream(STREAMED, cuts, language="fr")

    assert streamed == fill_placeholders(STREAMED, language="fr")
    assert sum(1 for p in pieces if p) > 10  # many pieces, not one block at the end


def test_a_slot_takes_the_language_of_the_reply_before_it_when_that_tells():
    # An English past answer sent to a question the detector took for German ("reinburse $3").
    english = "You can check the refund status on {{Website URL}} at any time."
    assert fill_placeholders(english, language="de") == "You can check the refund status on our website at any time."
    french = "Vous pouvez suivre le remboursement sur {{Website URL}} à tout moment."
    assert (
        fill_placeholders(french, language="en")
        == "Vous pouvez suivre le remboursement sur notre site web à tout moment."
    )
    # Fewer than 20 letters before the slot: the conversation's language decides.
    assert fill_placeholders("Voir {{Website Name}}.", language="fr") == "Voir notre site web."
    assert fill_placeholders("See {{Website Name}}.", language="fr") == "See notre site web."
