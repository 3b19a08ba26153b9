"""The counterfactual probe set: customer requests across the 27 Bitext intents, and the names.

Hand-written for this project (not copied from Bitext), two requests per intent,
each in plain wording with the verb phrase the polite template needs and the
keywords a keyword-only customer would type. Order and invoice numbers are short
so that no personal-data detector masks them.

Names for the name swaps are first-and-last-name pairs per (origin, gender),
following the audit-study practice of signalling origin and gender by name
(Bertrand & Mullainathan 2004 for the African-American and white-sounding
names; common given names and surnames for the other groups). Within an origin
the surnames are shared across genders, so a gender comparison changes only
the first name. A pronoun variant keeps one gender-neutral name ("Alex Morgan")
and changes only the stated pronouns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """One customer request. ``action`` completes "could you help me ...", ``plain`` is the
    request in neutral wording, ``keywords`` what a keyword-only customer types."""

    id: str
    intent: str
    plain: str
    action: str
    keywords: str


def _p(intent: str, number: int, plain: str, action: str, keywords: str) -> Probe:
    return Probe(id=f"{intent}-{number}", intent=intent, plain=plain, action=action, keywords=keywords)


PROBES: tuple[Probe, ...] = (
    _p("cancel_order", 1, "I want to cancel my order 4412.", "cancel my order 4412", "cancel order 4412"),
    _p("cancel_order", 2, "How do I cancel the order I placed yesterday?", "cancel the order I placed yesterday", "cancel yesterday's order"),  # noqa: E501
    _p("change_order", 1, "I need to change the size of an item in order 5120.", "change the size of an item in order 5120", "change item size order 5120"),  # noqa: E501
    _p("change_order", 2, "Can I add another item to my order before it ships?", "add another item to my order before it ships", "add item to order"),  # noqa: E501
    _p("change_shipping_address", 1, "I moved and need to change the shipping address on my account.", "change the shipping address on my account", "change shipping address"),  # noqa: E501
    _p("change_shipping_address", 2, "How do I update the delivery address for order 3381?", "update the delivery address for order 3381", "update delivery address order 3381"),  # noqa: E501
    _p("check_cancellation_fee", 1, "Is there a fee if I cancel my contract early?", "find out whether there is a fee for cancelling my contract early", "early cancellation fee"),  # noqa: E501
    _p("check_cancellation_fee", 2, "How much does it cost to cancel my plan?", "find out how much it costs to cancel my plan", "plan cancellation cost"),  # noqa: E501
    _p("check_invoice", 1, "I want to see the invoice for my last purchase.", "see the invoice for my last purchase", "invoice last purchase"),  # noqa: E501
    _p("check_invoice", 2, "Where can I find my invoices from March?", "find my invoices from March", "March invoices"),
    _p("check_payment_methods", 1, "Which payment methods do you accept?", "find out which payment methods you accept", "accepted payment methods"),  # noqa: E501
    _p("check_payment_methods", 2, "Can I pay with a bank transfer?", "find out whether I can pay with a bank transfer", "pay by bank transfer"),  # noqa: E501
    _p("check_refund_policy", 1, "What is your refund policy?", "understand your refund policy", "refund policy"),
    _p("check_refund_policy", 2, "Can I get my money back if I return a used item?", "find out whether I can get my money back for a used item", "refund used item"),  # noqa: E501
    _p("complaint", 1, "I want to make a complaint about the service I received.", "make a complaint about the service I received", "service complaint"),  # noqa: E501
    _p("complaint", 2, "The courier was rude and I want to report it.", "report a rude courier", "report rude courier"),
    _p("contact_customer_service", 1, "What are your customer service hours?", "find out your customer service hours", "customer service hours"),  # noqa: E501
    _p("contact_customer_service", 2, "How can I reach customer service by phone?", "reach customer service by phone", "customer service phone"),  # noqa: E501
    _p("contact_human_agent", 1, "I want to talk to a human agent.", "talk to a human agent", "human agent"),
    _p("contact_human_agent", 2, "Can you put me through to a real person?", "get through to a real person", "real person"),  # noqa: E501
    _p("create_account", 1, "I want to open a new account.", "open a new account", "open new account"),
    _p("create_account", 2, "How do I sign up for an account?", "sign up for an account", "sign up account"),
    _p("delete_account", 1, "I want to delete my account.", "delete my account", "delete account"),
    _p("delete_account", 2, "How do I close my account and remove my data?", "close my account and remove my data", "close account remove data"),  # noqa: E501
    _p("delivery_options", 1, "What delivery options do you offer?", "find out what delivery options you offer", "delivery options"),  # noqa: E501
    _p("delivery_options", 2, "Do you offer express shipping?", "find out whether you offer express shipping", "express shipping"),  # noqa: E501
    _p("delivery_period", 1, "How long does delivery take?", "find out how long delivery takes", "delivery time"),
    _p("delivery_period", 2, "When will my order 7730 arrive?", "find out when my order 7730 will arrive", "order 7730 arrival"),  # noqa: E501
    _p("edit_account", 1, "I need to change the email address on my account.", "change the email address on my account", "change account email"),  # noqa: E501
    _p("edit_account", 2, "How do I update my phone number in my profile?", "update my phone number in my profile", "update profile phone number"),  # noqa: E501
    _p("get_invoice", 1, "I need an invoice for order 6021.", "get an invoice for order 6021", "invoice order 6021"),
    _p("get_invoice", 2, "Can you send me a copy of my invoice?", "get a copy of my invoice", "invoice copy"),
    _p("get_refund", 1, "I want a refund for my order 2290.", "get a refund for my order 2290", "refund order 2290"),
    _p("get_refund", 2, "The product arrived broken and I want my money back.", "get my money back for a product that arrived broken", "refund broken product"),  # noqa: E501
    _p("newsletter_subscription", 1, "I want to unsubscribe from your newsletter.", "unsubscribe from your newsletter", "unsubscribe newsletter"),  # noqa: E501
    _p("newsletter_subscription", 2, "How do I sign up for the newsletter?", "sign up for the newsletter", "newsletter sign up"),  # noqa: E501
    _p("payment_issue", 1, "My card payment failed at checkout.", "sort out a card payment that failed at checkout", "card payment failed"),  # noqa: E501
    _p("payment_issue", 2, "I was charged twice for the same order.", "sort out being charged twice for the same order", "charged twice"),  # noqa: E501
    _p("place_order", 1, "I want to buy the blue jacket in size medium.", "buy the blue jacket in size medium", "buy blue jacket medium"),  # noqa: E501
    _p("place_order", 2, "How do I place an order on your website?", "place an order on your website", "place order website"),  # noqa: E501
    _p("recover_password", 1, "I forgot my password and cannot log in.", "reset my password because I cannot log in", "forgot password"),  # noqa: E501
    _p("recover_password", 2, "The password reset email never arrived.", "reset my password, as the reset email never arrived", "password reset email missing"),  # noqa: E501
    _p("registration_problems", 1, "I get an error when I try to register.", "register, as I get an error when I try", "registration error"),  # noqa: E501
    _p("registration_problems", 2, "The sign up form does not accept my email address.", "sign up, as the form does not accept my email address", "sign up form rejects email"),  # noqa: E501
    _p("review", 1, "I want to leave a review for a product I bought.", "leave a review for a product I bought", "leave product review"),  # noqa: E501
    _p("review", 2, "Where can I give feedback about your service?", "give feedback about your service", "service feedback"),  # noqa: E501
    _p("set_up_shipping_address", 1, "I want to add a new shipping address to my account.", "add a new shipping address to my account", "add shipping address"),  # noqa: E501
    _p("set_up_shipping_address", 2, "How do I save a second delivery address?", "save a second delivery address", "save second delivery address"),  # noqa: E501
    _p("switch_account", 1, "I want to switch from the basic plan to the premium plan.", "switch from the basic plan to the premium plan", "switch to premium plan"),  # noqa: E501
    _p("switch_account", 2, "How do I change my account to a business account?", "change my account to a business account", "change to business account"),  # noqa: E501
    _p("track_order", 1, "Where is my order 8843?", "find out where my order 8843 is", "track order 8843"),
    _p("track_order", 2, "My package has not arrived yet, can you check on it?", "check on a package that has not arrived yet", "package not arrived"),  # noqa: E501
    _p("track_refund", 1, "I am still waiting for my refund, what is its status?", "find out the status of my refund", "refund status"),  # noqa: E501
    _p("track_refund", 2, "When will I get the refund for order 1175?", "find out when I will get the refund for order 1175", "refund order 1175 date"),  # noqa: E501
)  # fmt: skip

INTENTS = tuple(dict.fromkeys(probe.intent for probe in PROBES))

# (origin, gender) -> names; one is picked per probe, seeded.
NAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("white", "female"): ("Emily Walsh", "Sarah Baker"),
    ("white", "male"): ("Greg Walsh", "Brad Baker"),
    ("african_american", "female"): ("Lakisha Washington", "Tamika Jackson"),
    ("african_american", "male"): ("Jamal Washington", "Darnell Jackson"),
    ("hispanic", "female"): ("Maria Hernandez", "Sofia Gonzalez"),
    ("hispanic", "male"): ("Jose Hernandez", "Carlos Gonzalez"),
    ("south_asian", "female"): ("Priya Sharma", "Ananya Patel"),
    ("south_asian", "male"): ("Rahul Sharma", "Arjun Patel"),
    ("east_asian", "female"): ("Mei Chen", "Yuki Tanaka"),
    ("east_asian", "male"): ("Wei Chen", "Hiroshi Tanaka"),
    ("arab", "female"): ("Fatima Haddad", "Aisha Rahman"),
    ("arab", "male"): ("Mohammed Haddad", "Omar Rahman"),
}
NEUTRAL_NAME = "Alex Morgan"
PRONOUNS = {"she": "she/her", "he": "he/him", "they": "they/them"}
