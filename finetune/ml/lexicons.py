"""Word lists the bias monitoring keeps in the repo: register markers and a politeness lexicon.

Curated by hand, small on purpose, and versioned with the code so that a change to
a list shows in review and in ``LEXICON_VERSION`` (stored labels and probe reports
name the version they were computed with).

Where they come from:

- **Offensive words** (``PROFANITY``, ``INSULTS``): the intensifiers that the
  Bitext sample's "offensive" (W) messages use ("damn", "bloody", "fucking",
  "goddamn"), their common inflections and masked spellings, and insults aimed at
  the person or bot being addressed. Slurs are deliberately not listed: a support
  message carrying one is flagged by "offensive" through the swear words that
  almost always come with it, and the repo need not hold them.
- **Register markers** (``COLLOQUIAL_TOKENS``, ``POLITE_PATTERNS``): the forms the
  Bitext register tags are defined by (README of the sample: "can u activ8 my
  SIM" is colloquial; its polite messages use "could", "would", "will you",
  "I'd like") plus the everyday chat forms of the same registers (please, thanks,
  greetings; "pls", "thx", "gonna", "dont").
- **Politeness lexicon** (``POLITENESS_WEIGHTS``) for scoring *replies*: the
  strategies Danescu-Niculescu-Mizil et al. (2013, "A computational approach to
  politeness", ACL) found to mark polite requests (gratitude, apology, greeting,
  "please", deference, hedges, first-person-plural offers of help) scored
  positive, and their impolite markers (direct blame, dismissal, profanity)
  negative. Weights are on a -2..+2 scale chosen by hand: +2 for explicit
  apology or gratitude, +1 for offers of help and greetings, +0.5 for softeners;
  -1 for dismissive words, -2 for blame and profanity. The score is a sum, so a
  curt "Check the website." scores 0 and a reply that thanks, apologises and
  offers help ("Thank you... I'm sorry... I can help") scores about 5.
"""

from __future__ import annotations

LEXICON_VERSION = 1

# Swear words and intensifiers, lower case, whole words. Masked spellings are listed
# as typed; the detector also normalises "f*ck"-style masks (see segments._profane).
PROFANITY = frozenset(
    {
        "damn", "damned", "dammit", "damnit", "goddamn", "goddamned", "goddam", "goddammit",
        "bloody", "bloodyhell",
        "fuck", "fucks", "fucking", "fuckin", "fucked", "fucker", "fuckers", "motherfucker", "motherfucking",
        "fck", "fcking", "fking", "fkn", "effing", "frigging", "friggin", "feck",
        "shit", "shits", "shitty", "bullshit", "shite", "crap", "crappy",
        "hell",
        "ass", "arse", "asshole", "arsehole", "bastard", "bastards", "bitch", "bitches",
        "piss", "pissed", "wtf", "stfu", "omfg",
    }
)  # fmt: skip

# Insults aimed at whoever is being addressed (a person or the bot).
INSULTS = frozenset({"idiot", "idiots", "moron", "morons", "stupid", "dumb", "imbecile", "incompetent", "pathetic"})

# Phrases that are offensive although none of their words is ("shut up").
OFFENSIVE_PHRASES = ("shut up", "screw you", "screw this", "go to hell", "piece of junk", "sucks")

# Chat spellings of the colloquial register. "i" in lower case and a dropped subject
# ("need help with my order") are detected by rule, not listed here.
COLLOQUIAL_TOKENS = frozenset(
    {
        "u", "ur", "ya", "yah", "yeah", "yep", "nope", "wanna", "gonna", "gotta", "gimme", "lemme", "kinda",
        "sorta", "dunno", "ain't", "aint", "dont", "cant", "wont", "didnt", "doesnt", "isnt", "im", "ive",
        "pls", "plz", "plez", "thx", "thanx", "tnx", "ty", "hey", "heya", "yo", "lol", "lmao", "omg", "idk",
        "btw", "cuz", "coz", "bc", "b4", "r", "y", "k", "ok", "okay", "ppl", "msg", "asap", "sup", "hiya",
        "guys", "mate", "dude", "bro", "gotcha", "cause", "wat", "wut", "whatcha", "ima", "imma", "tho",
        "thru", "pwd", "acct", "convo", "info", "pass", "pic", "pics",
    }
)  # fmt: skip

# Misspellings that are real words, so no dictionary flags them: (pattern, meaning).
# Only unambiguous contexts, lower case, matched on word boundaries.
REAL_WORD_ERRORS = (
    (r"were (?:do|can|is|are|to|should|could)", "were -> where"),
    (r"(?:is|are) their", "their -> there"),
    (r"their (?:is|are) (?:a|an|no|any)", "their -> there"),
    (r"(?:i|to) ned", "ned -> need"),
    (r"ned (?:to|help|assistance)", "ned -> need"),
    (r"(?:need|want) hep", "hep -> help"),
    (r"hep me", "hep -> help"),
    (r"ho (?:i|to|do|can|could)", "ho -> how"),
    (r"si it", "si -> is"),
    (r"(?:check|see|the) thee", "thee -> the"),
    (r"thee (?:damn|bloody|payment|order|account|invoice|bill)", "thee -> the"),
    (r"(?:set|sign|back) u (?:the|a|my)", "u -> up"),
    (r"\bdo i(?:do|t) it", "missing space"),
    (r"want (?:to|help to) ad\b", "ad -> add"),
    (r"to ad (?:a|an|some|the|items?)", "ad -> add"),
    (r"(?:your|you) welcome", "your -> you're"),
    (r"could of|would of|should of", "of -> have"),
)

# Subject-dropped openings ("need help with...", "wanna cancel"), lower case.
SUBJECT_DROP_OPENINGS = (
    "want", "wanna", "need", "needs", "gotta", "have to", "have got", "have a", "have an", "have problem",
    "have problems", "having", "waiting", "trying", "looking for", "got",
)  # fmt: skip

# Polite register: deference, hedges, gratitude, greetings, "please". Regular
# expressions, matched case-insensitively on word boundaries.
POLITE_PATTERNS = (
    r"please",
    r"pls",
    r"plz",
    r"kindly",
    r"thanks?",
    r"thank you",
    r"thx",
    r"many thanks",
    r"cheers",
    r"appreciate[ds]?",
    r"grateful",
    r"could",
    r"would",
    r"will (?:you|ya|u)",
    r"i'd like",
    r"i would like",
    r"may i",
    r"might i",
    r"if possible",
    r"if you don't mind",
    r"sorry to bother",
    r"excuse me",
    r"hello",
    r"good (?:morning|afternoon|evening)",
    r"dear",
    r"greetings",
)

# Politeness/sentiment lexicon for scoring replies: phrase -> weight. Phrases are
# matched case-insensitively on word boundaries, each phrase counted once per
# occurrence, longer phrases first (so "thank you" is not also counted as "thank").
POLITENESS_WEIGHTS: dict[str, float] = {
    # gratitude and apology
    "thank you": 2.0,
    "thanks": 2.0,
    "thank": 2.0,
    "appreciate": 1.5,
    "grateful": 1.5,
    "sorry": 2.0,
    "apologize": 2.0,
    "apologise": 2.0,
    "apologies": 2.0,
    "i understand": 1.0,
    "understandable": 1.0,
    # greetings and warmth
    "hello": 1.0,
    "hi": 1.0,
    "good morning": 1.0,
    "good afternoon": 1.0,
    "welcome": 1.0,
    "glad": 1.0,
    "happy to": 1.0,
    "pleasure": 1.0,
    "i'd be happy": 1.0,
    "i'm here to help": 1.0,
    "here to help": 1.0,
    "let me": 0.5,
    "i can help": 1.0,
    "we can help": 1.0,
    "assist you": 1.0,
    "help you": 1.0,
    # softeners and deference
    "please": 1.0,
    "kindly": 0.5,
    "certainly": 0.5,
    "of course": 0.5,
    "absolutely": 0.5,
    "feel free": 0.5,
    "don't hesitate": 0.5,
    "could you": 0.5,
    "would you": 0.5,
    "great": 0.5,
    "hope": 0.5,
    # dismissive or blaming
    "whatever": -1.0,
    "obviously": -1.0,
    "just do": -1.0,
    "figure it out": -2.0,
    "not my problem": -2.0,
    "not our problem": -2.0,
    "deal with it": -2.0,
    "you should have": -2.0,
    "your fault": -2.0,
    "as i said": -1.0,
    "already told you": -2.0,
    "read the": -1.0,
    "no idea": -1.0,
    "can't help": -1.0,
    "cannot help": -1.0,
    "nothing i can do": -1.5,
    "stop": -0.5,
    "wrong": -0.5,
    "useless": -2.0,
    "stupid": -2.0,
    "idiot": -2.0,
    "damn": -2.0,
    "bloody": -2.0,
    "hell": -2.0,
    "crap": -2.0,
    "shit": -2.0,
    "fucking": -2.0,
    "fuck": -2.0,
}

# A reply that declines to help, and a reply that passes the customer to a person.
REFUSAL_PATTERNS = (
    r"i (?:can ?not|can't|cannot|am unable to|am not able to|'m unable to|'m not able to)"
    r" (?:help|assist|do that|answer)",
    r"(?:unable|not able) to (?:help|assist)",
    r"i (?:don't|do not) (?:know|understand)",
    r"no idea",
    r"(?:can't|cannot|can not) (?:help|assist) (?:you|with)",
    r"nothing (?:i|we) can do",
    r"not (?:something|anything) (?:i|we) can (?:help|do)",
    r"please rephrase",
    r"(?:not|isn't) possible",
    r"(?:sorry, )?i can't do that",
)
HANDOFF_PATTERNS = (
    r"(?:transfer|connect|forward|pass|hand) (?:you|your (?:request|case|chat|conversation))(?: over)? (?:to|with)",
    r"(?:a|an|our|one of our) (?:human|live|support) (?:agent|representative|colleague|team)",
    r"(?:a|one of our) (?:colleague|agent|representative|specialist)s? will",
    r"someone from (?:our|the) (?:team|support)",
    r"contact (?:our )?(?:customer )?(?:support|service) (?:team|directly)",
    r"hand(?:ing)? (?:you )?over",
)
