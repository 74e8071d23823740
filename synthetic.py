"""
The synthetic multilingual world: a seeded stand-in for the paper's 100-language pre-training text and
for XTREME, small enough for a laptop and built offline in a few seconds (about 7 MB).

    python synthetic.py --out data/synthetic [--seed 1]   # or make_synthetic("data/synthetic", seed=0)

Seven languages say one set of meanings in different surface forms. They share a concept inventory
(nouns in 7 classes, verbs with selectional restrictions, adjectives, time adverbs, function words) and
a grammar of meanings: a clause has an agent, an action, a patient, a place, a source and destination,
a time that agrees with its tense, negation, passive, a linked clause, reported speech or a wh-question.
Pre-training lines hold one to three sentences, later ones referring back with pronouns. Named entities
(PER, ORG, LOC), numbers and most punctuation are spelled alike in every language: the anchors that let
a byte-level model line the languages up. In CS_LINES of the pre-training lines of every language but
en, each content word takes its English form with probability CS_WORDS (code-switching, as on the web).

  code script      order adj    adp    words                                              mlm size
  en   Latin       SVO   before prep.  real English; irregular verbs, do-support            1.5 MB
  es   Latin       SVO   after  prep.  cognates of en by sound changes; ¿ inverted ?        1.0 MB
  de   Latin       SOV   before prep.  cognates by other sound changes; nouns capitalised   0.75 MB
  ru   Cyrillic    SVO   before prep.  own; no articles; accusative suffix                  0.55 MB
  el   Greek       SOV   after  postp. own; future particle; final sigma; asks with ;       0.38 MB
  ar   Arabic      VSO   after  prep.  own, from consonant roots; article "al"; ، ؟          0.24 MB
  hi   Devanagari  SOV   before postp. own; ergative and object postpositions; ।             0.12 MB
The codes are stand-ins ("ru" is this world's Cyrillic language); each inflects for number, tense, agreement.

Files, in the layout of XTREME's download script (test files keep their gold labels, for scoring):
  mlm/<lang>.txt                             pre-training text, one line = one to three sentences
  udpos/train-en.tsv, {dev,test}-<lang>.tsv  word<TAB>UPOS, a blank line between sentences
  panx/  (same names)                        token<TAB>IOB2 tag (PER ORG LOC); every sentence has one
  pawsx/ (same names)                        sentence1<TAB>sentence2<TAB>label by csv.writer (CRLF, '"'
                                             quoted): 1 paraphrase, 0 the same words scrambled
  squad/train-v1.1.json, dev-v1.1.json       English extractive QA, SQuAD v1.1 JSON
  xquad/xquad.<lang>.json                    the test paragraphs in every language, question ids shared
  {udpos,panx,pawsx,xquad}/languages.json    {"languages": [...]}: the task's test languages, this world's
                                             own, which eval_xtreme.py averages over instead of XTREME's
SIZES: items per file. Train is English only; dev and test are parallel across languages; the labelled
files never code-switch. Tokens are separated by single spaces, so QA answers lie on word boundaries.
English tagging sentences have at most 100 bytes and English PAWS-X sentences at most 60, sized for the
small preset's 256 byte tokens: Devanagari takes up to 2.3 times the bytes of English, and with seed 0
the longest translated sentence has 228 bytes (it fits whole) and the longest pair 276 (finetune.py cuts
the 10 of the 500 Hindi dev and test pairs over the 252 left beside the four special tokens). Deterministic
for a seed; standard library only.
"""

import argparse
import csv
import io
import json
import random
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple, Optional

LANGS = ("en", "es", "de", "ru", "el", "ar", "hi")
TRAIN_LANG = "en"
SIZES = {"train": 2000, "dev": 200, "test": 300}  # sentences / pairs / questions per file
MLM_BYTES = {"en": 1_500_000, "es": 1_000_000, "de": 750_000, "ru": 550_000, "el": 380_000,
             "ar": 240_000, "hi": 120_000}  # target size of mlm/<lang>.txt
CS_LINES, CS_WORDS = 0.3, 0.3  # code-switching, another anchor (see above): a share of lines, then of words

LANG_INFO = {  # script; order of subject, verb, object; adjective before/after noun; adpositions; wh-words
    "en": dict(script="Latin", order="SVO", adj="before", adp="prepositions", wh="front", relation="training"),
    "es": dict(script="Latin", order="SVO", adj="after", adp="prepositions", wh="front+inversion", relation="close"),
    "de": dict(script="Latin", order="SOV", adj="before", adp="prepositions", wh="front", relation="close"),
    "ru": dict(script="Cyrillic", order="SVO", adj="before", adp="prepositions", wh="front", relation="distant"),
    "el": dict(script="Greek", order="SOV", adj="after", adp="postpositions", wh="front", relation="distant"),
    "ar": dict(script="Arabic", order="VSO", adj="after", adp="prepositions", wh="front", relation="distant"),
    "hi": dict(script="Devanagari", order="SOV", adj="before", adp="postpositions", wh="in situ", relation="distant"),
}

# ------------------------------------------------------------------------------------------------
# The concepts, with their English forms. Noun classes: p people, a animals, f food, v vehicles,
# t texts, x objects, l places (B = buildings, a subset of l); o = organisations (named only).

NOUNS = {  # "word[/plural][@gender]", the most frequent first
    "p": "teacher doctor farmer child/children woman/women@f man/men@m king@m queen@f soldier student merchant sailor "
         "baker singer painter driver judge nurse writer friend neighbour girl@f boy@m guard pilot",
    "a": "dog cat horse bird cow goat wolf/wolves bear fox/foxes lion mouse/mice rabbit duck",
    "f": "apple cake egg pie pear lemon melon cookie sandwich/sandwiches potato/potatoes",
    "v": "car boat ship bus/buses train bicycle truck wagon",
    "t": "book letter story/stories poem map report newspaper message note song",
    "x": "key box/boxes cup knife/knives basket lamp chair table ring coin bottle hammer rope bag mirror clock bell "
         "flag hat coat",
    "l": "house city/cities river market school garden forest bridge road village park library/libraries harbour "
         "station hospital museum farm mountain island castle shop square hill tower",
    "B": "house bridge road school tower castle shop library museum hospital station farm",
}
ZIPF = [1.0 / (rank + 1) ** 0.8 for rank in range(30)]  # the frequency of a class's nouns, by rank

TRANSITIVE, INTRANSITIVE, MOTION, COPULA, SPEECH = "transitive", "intransitive", "motion", "copula", "speech"
VERBS = {  # base/past[/participle] and the classes of the agent [and of the patient]
    TRANSITIVE: """
see/saw/seen pa pafvtxl      find/found/found pa pafvtx    buy/bought/bought po fvtx     sell/sold/sold po fvtx
build/built/built po Bv      carry/carried/carried pa fxt  open/opened/opened p xt       write/wrote/written p t
read/read/read p t           paint/painted/painted p xvl   bring/brought/brought pa fxt  take/took/taken p fxtv
love/loved/loved pa pafl     visit/visited/visited po plo  help/helped/helped poa pao    call/called/called po pao
follow/followed/followed pa pav  meet/met/met p p          teach/taught/taught p p       eat/ate/eaten pa f
cook/cooked/cooked p f       drive/drove/driven p v        wash/washed/washed p xva      clean/cleaned/cleaned po xvl
break/broke/broken pa xv     fix/fixed/fixed po xv         lose/lost/lost po xt          keep/kept/kept po xtfa
watch/watched/watched pa pav  hear/heard/heard pa pat      steal/stole/stolen pa fxvt    hide/hid/hidden pa fxt""",
    INTRANSITIVE: """sleep/slept pa  sing/sang pa  dance/danced p  work/worked po  wait/waited pa
arrive/arrived pav  laugh/laughed p  cry/cried p  smile/smiled p  rest/rested pa  fall/fell pax
play/played pa  shout/shouted p""",
    MOTION: """travel/travelled p  walk/walked pa  run/ran pa  swim/swam pa  fly/flew pa  return/returned pv
sail/sailed p""",
    SPEECH: "say/said p  think/thought p",
}
SYMMETRIC = "see find love help call follow meet teach watch hear visit".split()  # people on both sides
ADJECTIVES = """old:pavtxl new:vtxl young:pa big:pavxl small:pavxfl red:vxf blue:vx green:vxf white:vxa black:vxa
yellow:vxf happy:pa sad:pa tired:pa brave:pa clever:pa kind:p strong:pa quiet:pal loud:pa famous:ptl beautiful:pvtxl
heavy:vx cheap:fvtx expensive:fvtx fresh:f sweet:f ripe:f long:tv short:pt dark:xl bright:xl busy:pl empty:xvl
dirty:xval broken:xv wooden:xvl golden:x fast:av slow:av wild:a hungry:pa rich:p poor:p funny:pt strange:pavtxl
tall:pl ancient:tl"""  # adjective:noun classes
TIME_ADVERBS = {"pres": "today now often always rarely", "past": "yesterday recently", "fut": "tomorrow soon"}
ADVERBS = " ".join(TIME_ADVERBS.values()).split()

# Function words: one key per grammatical concept; a language may lack some (no articles, ...).
FUNC_KEYS = (
    "det.def.sg det.def.pl det.indef.sg det.this.sg det.this.pl I you he she it we they me you.o him her it.o us them "
    "who what where when how_many in near behind under at on from to by erg acc fut.sg fut.pl pres.sg pres.pl "
    "cop.pres.sg cop.pres.pl cop.past.sg cop.past.pl pass.pres.sg pass.pres.pl pass.past.sg pass.past.pl "
    "and but or because while after before that not fut.part").split()
# The words of en and its close relatives for FUNC_KEYS. "-": none (en builds its verb forms in code);
# "_" joins the two words of one form.
FUNC_WORDS = {
    "en": "the the a this these I you he she it we they me you him her it us them who what where when "
          "how_many in near behind under at on from to by - - - - - - - - - - - - - - and but or because "
          "while after before that not -",
    "es": "el los un este estos yo tú él ella ello nosotros ellos mí ti él ella ello nosotros ellos quién "
          "qué dónde cuándo cuántos en cerca tras bajo a sobre de hacia por - - - - - - es son era eran es "
          "son fue fueron y pero o porque mientras después antes que no -",
    "de": "der die ein dieser diese ich du er sie es wir sie mich dich ihn sie es uns sie wer was wo wann "
          "wie_viele in bei hinter unter an auf von nach durch - - wird werden - - ist sind war waren wird "
          "werden wurde wurden und aber oder weil während nachdem bevor dass nicht -",
}
COORDINATORS = ("and", "but", "or")  # CCONJ; the other clause linkers are SCONJ
OBJECT_PRONOUN = {"I": "me", "you": "you.o", "he": "him", "she": "her", "it": "it.o", "we": "us", "they": "them"}
# Function keys (prefixes) a distant language lacks; erg, acc, pres.* and fut.* only where ONLY_FUNC says
NO_FUNC = {"ru": ("det.def", "det.indef", "cop.pres"), "hi": ("det.def", "det.indef"), "ar": ("det.indef",)}
ONLY_FUNC = {"hi": ("erg", "acc", "pres."), "el": ("fut.part",), "ru": ("fut.sg", "fut.pl")}

# Inflection templates ("~" = stem; digits = the consonants of an Arabic root; "-" = no such form),
# written in each language's romanisation and converted to its script afterwards (so Greek gets its final
# sigma): nouns sg pl [sg.acc pl.acc]; adjectives sg pl; verbs in the order of VERB_FORMS.
VERB_FORMS = ("pres.sg", "pres.pl", "past.sg", "past.pl", "fut.sg", "fut.pl", "inf", "part")
MORPH = {
    "es": ("~ ~s", "~ ~s", "~a ~an ~ó ~aron ~ará ~arán - ~ado"),
    "de": ("~ ~en", "~e ~en", "~t ~en ~te ~ten - - ~en ge~t"),
    "ru": ("~ ~y ~u ~ov", "~yj ~ye", "~et ~ut ~al ~ali - - ~atʲ ~an"),
    "el": ("~os ~oi", "~os ~oi", "~ei ~Un e~e e~an - - - ~menos"),
    "ar": ("~ ~At", "~ ~Un", "ya12u3 ya12u3Un 1a2a3a 1a2a3U saya12u3 saya12u3Un - ma12U3"),
    "hi": ("~ ~eM", "~A ~e", "~tA ~te ~A ~e ~egA ~eMge - ~A"),
}
FUTURE = {"es": "suffix", "de": "aux", "ru": "aux", "el": "part", "ar": "suffix", "hi": "suffix"}
PUNCT = {"hi": {".": "।"}, "ar": {",": "،", "?": "؟"}, "el": {"?": ";"}}
EN_VERB_KEY = dict(zip(VERB_FORMS, "s3 base past past base base base part".split()))  # for a borrowed verb

# Romanisations of the distant languages: one character per sound, then a script table.
PHON = {  # onsets, vowels, codas
    "ru": ("b v g d ž z k l m n p r s t f x c č š b v d k l m n p r s t st pr kr", "a o u e i y a o",
           "n l r s t k v m j"),
    "el": ("p t k b d g m n l r s z f θ x ξ ψ p t k m n l r s pr tr st", "a e i o u h w a o", "s n r"),
    "hi": ("k K g G c C j J T D N t θ d ð n p P b B m y r l v š s h", "a A i I u U e E o O a a", "k t n r l m s"),
    "ar": ("b t θ j H x d ð r z s š S D T Z c ɣ f q k l m n h w y", "a i u", ""),
}
AR_PATTERNS = {"n": ("1i2A3", "1a23", "1u2U3", "ma12a3", "1A2i3", "1a2A3"), "a": ("1a2I3",), "v": ("123",),
               "f": ("1A", "1I", "1a2", "1U", "1a2I3")}  # nouns and adverbs, adjectives, verbs, function words
SCRIPT_MAP = {
    "Cyrillic": dict(zip("abvgdežzijklmnoprstufxcčšyʲ", "абвгдежзийклмнопрстуфхцчшыь")),
    "Greek": {**dict(zip("abgdezhθiklmnξoprstufxψw", "αβγδεζηθικλμνξοπρστυφχψω")), "U": "ου"},
    "Arabic": dict(zip("btθjHxdðrzsšSDTZcɣfqklmnhwyAIU", "بتثجحخدذرزسشصضطظعغفقكلمنهويايو")),
}
DEVA_CONS = dict(zip("kKgGcCjJTDNtθdðnpPbBmyrlvšsh", "कखगघचछजझटडणतथदधनपफबभमयरलवशसह"))
DEVA_VOWEL = {"a": ("अ", ""), "A": ("आ", "ा"), "i": ("इ", "ि"), "I": ("ई", "ी"), "u": ("उ", "ु"),
              "U": ("ऊ", "ू"), "e": ("ए", "े"), "E": ("ऐ", "ै"), "o": ("ओ", "ो"), "O": ("औ", "ौ")}
# Cognates of the close relatives: sound changes (regular expressions) applied to the English word, in order
ES_CHANGES = (("^w", "gu"), ("tch", "ch"), ("th", "t"), ("sh", "ch"), ("ck", "c"), ("ph", "f"), ("wr", "r"),
              ("kn", "n"), ("gh", ""), ("wh", "u"), ("qu", "cu"), ("k", "c"), ("ee", "i"), ("oo", "u"), ("ea", "e"),
              ("ou", "o"), ("ai", "ei"), ("y", "i"), ("x", "j"), ("z", "s"), ("w", "u"),
              (r"([bcdfglmnprstv])\1", r"\1"), (r"(?<=...)e$", ""))
DE_CHANGES = (("tch", "tsch"), ("th", "d"), ("sh", "sch"), ("ph", "f"), ("wh", "w"), ("gh", "ch"), ("qu", "kw"),
              ("ee", "ie"), ("oo", "u"), ("ea", "e"), ("ou", "au"), ("ow", "au"), ("v", "w"), ("y", "i"),
              ("c(?![hk])", "k"), ("^p(?=[aeiou])", "pf"), ("^t(?=[aeiou])", "z"), ("d$", "t"), (r"(?<=...)e$", ""))
# Named entities: the words of organisations and locations besides their names
ORG_WORDS = "Bank Group Motors Labs Press Union Works Foods Systems Airlines Institute Partners Studios Trust"
LOC_WORDS = "Harbour Valley Bay Falls Hills City Island Springs Lake Port"

# ------------------------------------------------------------------------------------------------
# The dials: every probability of the generator. A dict of probabilities is one draw among its keys.

# clauses
KIND_P = {TRANSITIVE: 0.52, INTRANSITIVE: 0.13, MOTION: 0.1, COPULA: 0.13, SPEECH: 0.12}  # a clause's kind
TENSE_P = {"past": 0.45, "pres": 0.35, "fut": 0.2}  # a clause's tense
NEG_P = 0.1               # a clause is negated
PASSIVE_P = 0.12          # a transitive clause not in the future is passive
SOURCE_P, DEST_P = 0.7, 0.8  # a motion has a source; a destination (always when it has no source)
QUOTE_P = 0.35            # "say" quotes directly (else "said that ...")
PLACE_P = {TRANSITIVE: 0.35, INTRANSITIVE: 0.45}  # a clause gets a place
TIME_P, YEAR_P = 0.35, 0.6  # a clause gets a time; a past or future time is a year (else a time adverb)
LINKED_P = 0.15           # a main clause gets a subordinate or coordinated clause
SUB_FIRST_P = 0.35        # a subordinate clause comes first ("Because ..., ...")
FRONT_P = 0.15            # a main clause's time or place moves to the front
# noun phrases
CLASS_WEIGHTS = {"p": 4, "a": 1.2, "o": 2, "l": 2}  # of a referent's class (others 1): people and places lead
NAMED_P, PRONOUN_P = 0.45, 0.1  # a person is a named entity ("Maria", not "the doctor"), or else a pronoun
NAMED_PLACE_P = 0.5       # a place is a named location
SURNAME_P = 0.55          # a named person has a surname too
PLURAL_P, COUNT_P = 0.3, 0.3  # a common noun is plural; a plural takes a numeral (2 to 20), not a determiner
DETERMINERS = ("def", "def", "def", "indef", "indef", "this")  # uniform; a plural's "indef" is none: "cats"
ADJ_P, ADJ_P_SIMPLE = 0.45, 0.25  # a noun phrase has an adjective (in sentence pairs: less, they must be short)
# words and names
FUNC_CODA_P = 0.25        # a distant language's function word ends in a consonant
CODA_P = 0.3              # ... and so does a content word its rules leave open
ONE_WORD_LOC_P = 0.4      # a location is one word ("Vela"), else two ("Vela Harbour")
# pre-training lines
LINE_P = {1: 0.52, 2: 0.27, 3: 0.13, "question": 0.08}  # the sentences of a line, or a question
BACK_REFERENCE_P = 0.5    # a later sentence's agent is a pronoun for the first one's
# sentence pairs (PAWS-X)
PAIR_TIME_P = 0.6         # a pair's clause gets a time, so that fronting has one to move
PAIR_PLACE_P = 0.5        # a fronting pair with a time gets a place too
PAIR_NAMED_P = 0.6        # a swapped person is named
SCRAMBLE_FRONT_P = 0.3    # a scrambled pair also moves an adverbial, so that word order gives no label away
PAIR_SWAP_P = 0.5         # the two sentences of a pair trade places
# QA paragraphs
QA_ORG_P = 0.35           # the second sentence's agent is an organisation (else a pronoun for the first's)
# lengths, so that translations (nearly) all fit the small preset's 256 byte tokens (see the module docstring)
PAIR_MAX_EN_BYTES = 60    # each sentence of an English pair
TAG_MAX_EN_BYTES = 100    # an English tagging sentence: cuts the long tail; translated, they fit whole


def draw(rng, probs):
    """One key of a dict of probabilities (or weights)."""
    return rng.choices(list(probs), list(probs.values()))[0]


# ------------------------------------------------------------------------------------------------
# Types: tokens, noun phrases and clauses (meanings are language-independent until realised)

class Token(NamedTuple):
    form: str
    upos: str
    ner: str = "O"  # IOB2 tag
    role: Optional[str] = None  # the clause slot it belongs to, to find QA answer spans


class Entity(NamedTuple):  # spelled the same in every language
    type: str  # PER, ORG or LOC
    words: tuple  # ("Nova", "Harbour")
    gender: str  # m or f for people, n otherwise


class Pronoun(NamedTuple):  # personal or interrogative
    word: str  # its function key: I, you, he, she, it, we, they, who, what or how_many
    noun: Optional[str] = None  # how_many: the noun counted ("how many apples")


@dataclass
class NounPhrase:
    noun: str
    cls: str  # the noun's class letter
    num: str  # sg or pl
    det: Optional[str]  # def, indef, this or None
    count: Optional[int]  # a numeral instead of a determiner
    adj: Optional[str]
    gender: str


@dataclass
class Clause:
    """A meaning: who does what to whom, where and when; realize() says it in any language."""
    kind: str  # TRANSITIVE, INTRANSITIVE, MOTION, COPULA or SPEECH
    tense: str  # past, pres or fut
    neg: bool = False
    verb: Optional[str] = None
    agent: object = None  # Entity, Pronoun or NounPhrase
    patient: object = None
    passive: bool = False
    loc: object = None  # a place
    adp: str = "in"  # the English key of the place's adposition: in, near, at, ...
    source: object = None  # motion: from ...
    dest: object = None  # motion: to ...
    time: object = None  # a year (int) or a time adverb (str)
    pred: Optional[str] = None  # a copula's adjective: "is old"
    said: Optional["Clause"] = None  # speech: the reported clause
    quote: bool = False  # speech: direct, in quotes
    conj: Optional[str] = None  # the English key of the linked clause's linker: because, and, ...
    linked: Optional["Clause"] = None
    linked_first: bool = False
    front: Optional[str] = None  # "time" or "loc": the adverbial moved before the subject


class Question(NamedTuple):
    clause: Clause  # the meaning asked about
    slot: str  # agent, patient, count, loc or time
    sentence: int  # the paragraph's sentence that holds the answer


class Verb(NamedTuple):
    past: str
    part: str
    agents: str  # class letters
    patients: str


@dataclass
class Lexicon:
    """One language: the switches of its grammar and its finished word forms, in its script."""
    code: str
    info: dict  # LANG_INFO[code]: script, word order, adjective and adposition order, wh-questions
    nouns: dict = field(default_factory=dict)  # (noun, num, case: nom or acc) -> form
    adjs: dict = field(default_factory=dict)  # (adjective, num) -> form
    verbs: dict = field(default_factory=dict)  # (verb, form key) -> form
    advs: dict = field(default_factory=dict)  # adverb -> form
    func: dict = field(default_factory=dict)  # function key (also . , ?) -> form


@dataclass
class World:
    """The concepts with their English forms, the named entities, and one lexicon per language."""
    nouns: dict  # class letter -> nouns
    gender: dict  # noun -> m, f or None (every noun, in NOUNS's order)
    plural: dict  # noun -> English plural
    verbs: dict  # verb -> Verb
    by_kind: dict  # TRANSITIVE, INTRANSITIVE, MOTION, SPEECH -> its verbs
    adjectives: dict  # adjective -> the noun classes it may describe
    adj_for: dict  # class letter -> the adjectives that may describe it
    names: dict = field(default_factory=dict)  # PER: (first name, gender), last: names, ORG and LOC: words
    lexicons: dict = field(default_factory=dict)  # lang -> Lexicon


# ------------------------------------------------------------------------------------------------
# Words: scripts, cognates, random words, named entities, one lexicon per language, the world

def translit(script, s):
    """A romanised word -> its spelling in the language's script."""
    if script == "Latin":
        return s
    if script in ("Greek", "Cyrillic"):
        return re.sub("σ$", "ς", "".join(SCRIPT_MAP[script][ch] for ch in s))  # Greek final sigma
    if script == "Arabic":  # short vowels are not written, except a word-initial alif
        return "".join(("ا" if i == 0 else "") if ch in "aiu" else SCRIPT_MAP[script][ch] for i, ch in enumerate(s))
    out = []  # Devanagari: an abugida; consonant + vowel sign, virama between consonants
    for i, ch in enumerate(s):
        if ch == "M":
            out.append("ं")
        elif ch in DEVA_CONS:
            out.append(DEVA_CONS[ch] + ("्" if s[i + 1:i + 2] in DEVA_CONS else ""))
        else:
            out.append(DEVA_VOWEL[ch][1 if i > 0 and s[i - 1] in DEVA_CONS else 0])
    return "".join(out)


def apply(template, stem):
    if "~" in template:
        return template.replace("~", stem)
    return "".join(stem[int(ch) - 1] if ch.isdigit() else ch for ch in template)  # Arabic root


def cognate(lang, word, pos, gender=None):
    """English word -> its es/de cognate (pos: n noun, a adjective, v verb stem, r adverb)."""
    ly = pos == "r" and word.endswith("ly")
    s = word[:-2] if ly else word
    for pattern, change in ES_CHANGES if lang == "es" else DE_CHANGES:
        s = re.sub(pattern, change, s)
    if lang == "de":
        return s + "lich" if ly else s.capitalize() if pos == "n" else s
    if pos in "na" and s[-1] not in "aeiou":  # Spanish gender
        s += "a" if gender == "f" else "o"
    return s + "amente" if ly else s


def distant_word(rng, lang, pos):
    """A random romanised word of a distant language (pos: n, a, v, r adverb, f function word)."""
    onsets, vowels, codas = (x.split() for x in PHON[lang])
    if lang == "ar":  # a root of three consonants in a pattern (the verb templates hold the vowels)
        return apply(rng.choice(AR_PATTERNS.get(pos, AR_PATTERNS["n"])), "".join(rng.sample(onsets, 3)))
    if pos == "f":
        nsyl, coda = rng.choice((1, 1, 1, 2)), rng.random() < FUNC_CODA_P
    else:  # verb and adjective stems (but in el), ru and hi nouns end in a consonant before their suffixes
        nsyl = rng.choice((1, 1, 1, 2, 2, 2, 2)) if pos in "nv" else rng.choice((1, 1, 2))
        coda = pos in "va" and lang != "el" or lang in ("ru", "hi") and pos == "n" or rng.random() < CODA_P
    word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(nsyl))
    return word + rng.choice(codas) if coda else word


def sample_names(rng, taken):
    """Named entities shared by every language: first names, last names, organisations, locations."""
    def fresh(nsyl):  # a Latin-script name, new and not an English word
        while True:
            name = "".join(rng.choice("b c d f g h j k l m n p r s t v z br dr gr kr st tr th l m n r s".split())
                           + rng.choice("a e i o u a e ai ei ia o".split()) for _ in range(nsyl))
            name = name.capitalize() + rng.choice([""] * 5 + "n r l s m x".split())
            if name.lower() not in taken and len(name) > 2:
                taken.add(name.lower())
                return name
    return dict(PER=[(fresh(rng.choice((2, 2, 3))), rng.choice("mf")) for _ in range(200)],
                last=[fresh(rng.choice((2, 3))) for _ in range(200)],
                ORG=[(fresh(2), rng.choice(ORG_WORDS.split())) for _ in range(150)],
                LOC=[(fresh(rng.choice((2, 3))),) if rng.random() < ONE_WORD_LOC_P else
                     (fresh(2), rng.choice(LOC_WORDS.split())) for _ in range(150)])


def inflect(L, W, stem):
    """Fill L's content words: a stem per concept, then the language's inflection templates."""
    script = LANG_INFO[L.code]["script"]
    nouns, adjs, verbs = (dict(zip(keys, t.split())) for keys, t in zip(
        (("sg", "pl", "sg.acc", "pl.acc"), ("sg", "pl"), VERB_FORMS), MORPH[L.code]))
    for n in W.gender:
        s = stem(n, "n", W.gender[n])
        for num, case in (("sg", "nom"), ("sg", "acc"), ("pl", "nom"), ("pl", "acc")):
            template = nouns.get(f"{num}.acc", nouns[num]) if case == "acc" else nouns[num]
            form = s + "n" if L.code == "de" and num == "pl" and s.endswith("e") else apply(template, s)
            L.nouns[n, num, case] = translit(script, form)
    for a in W.adjectives:
        s = stem(a, "a")
        L.adjs.update({(a, num): translit(script, apply(adjs[num], s)) for num in ("sg", "pl")})
    for v in W.verbs:
        s = stem(v, "v")
        L.verbs.update({(v, key): translit(script, apply(t, s)) for key, t in verbs.items() if t != "-"})
    L.advs = {a: translit(script, stem(a, "r")) for a in ADVERBS}


def build_lexicon(lang, rng, W):
    info, distant = LANG_INFO[lang], lang not in FUNC_WORDS
    L = Lexicon(lang, info, func={".": ".", ",": ",", "?": "?", **PUNCT.get(lang, {})})
    if not distant:  # en and its close relatives: hand-written function words
        L.func.update((key, w.replace("_", " ")) for key, w in zip(FUNC_KEYS, FUNC_WORDS[lang].split()) if w != "-")
    if lang == "en":  # real English words
        L.nouns = {(n, num, case): pl if num == "pl" else n for n, pl in W.plural.items() for num in ("sg", "pl")
                   for case in ("nom", "acc")}
        L.adjs = {(a, num): a for a in W.adjectives for num in ("sg", "pl")}
        for v, d in W.verbs.items():
            s3 = re.sub(r"([^aeiou])y$", r"\1ie", v) + ("es" if re.search(r"(s|x|z|ch|sh|o)$", v) else "s")
            L.verbs.update({(v, "base"): v, (v, "s3"): s3, (v, "past"): d.past, (v, "part"): d.part})
        L.advs = {a: a for a in ADVERBS}
        return L
    used = {w.lower() for w in L.func.values()}

    def stem(word, pos, gender=None):
        """A new word for a concept: an es/de cognate, with a letter more where taken, or a random one."""
        extra = ("", "h", "e", "n", "i", "a", "u", "el") if lang == "de" else ("", "e", "i", "a", "o", "u", "ie")
        tries = (distant_word(rng, lang, pos) for _ in range(200)) if distant else \
            (cognate(lang, word, pos, gender) + x for x in extra)
        for roman in tries:
            form = translit(info["script"], roman).lower()
            if form not in used:
                used.add(form)
                return roman
        raise RuntimeError(f"could not find a new word for {word} in {lang}")
    if distant:  # the Arabic article is "al"
        keys = [k for k in FUNC_KEYS if k.startswith(ONLY_FUNC.get(lang, ()))
                or not k.startswith(("erg", "acc", "pres.", "fut.") + NO_FUNC.get(lang, ()))]
        L.func.update({k: translit(info["script"], "al" if lang == "ar" and k.startswith("det.def") else stem(k, "f"))
                       for k in keys})
    inflect(L, W, stem)
    return L


def build_world(seed):
    """The concepts (parsed from the tables), the named entities and the lexicons."""
    nouns, gender, plural = {}, {}, {}
    for cls, words in NOUNS.items():
        for word, pl, g in re.findall(r"(\w+)/?(\w*)@?(\w?)", words):
            nouns.setdefault(cls, []).append(word)
            gender[word], plural[word] = g or None, pl or word + "s"
    verbs, by_kind = {}, {}
    for kind, table in VERBS.items():
        for forms, agents, patients in re.findall(r"(\S+/\S+) (\w+)(?: (\w+))?", table):
            base, past, *part = forms.split("/")
            verbs[base] = Verb(past, part[0] if part else past, agents, patients)
            by_kind.setdefault(kind, []).append(base)
    adjectives = dict(item.split(":") for item in ADJECTIVES.split())
    adj_for = {c: [a for a in adjectives if c in adjectives[a]] for c in NOUNS}
    adj_for["B"] = adj_for["l"]
    W = World(nouns, gender, plural, verbs, by_kind, adjectives, adj_for)
    english = set(gender) | set(adjectives) | set(verbs) | set(ADVERBS) | set(FUNC_WORDS["en"].split())
    W.names = sample_names(random.Random(f"xmoe-synthetic:{seed}:world"), taken=english)
    W.lexicons = {lang: build_lexicon(lang, random.Random(f"xmoe-synthetic:{seed}:lexicon:{lang}"), W)
                  for lang in LANGS}
    return W


# ------------------------------------------------------------------------------------------------
# Meanings: noun phrases and clauses, sampled from the world (language-independent)

def sample_entity(rng, W, etype):
    if etype != "PER":
        return Entity(etype, rng.choice(W.names[etype]), "n")
    name, gender = rng.choice(W.names["PER"])
    return Entity("PER", (name, rng.choice(W.names["last"])) if rng.random() < SURNAME_P else (name,), gender)


def sample_noun(rng, W, cls, num=None, adj_p=ADJ_P):
    """A common noun phrase of the class: noun (Zipf weights), number, determiner or count, adjective."""
    noun = rng.choices(W.nouns[cls], ZIPF[:len(W.nouns[cls])])[0]
    num = num or ("pl" if rng.random() < PLURAL_P else "sg")
    det, count = rng.choice(DETERMINERS), None
    if num == "pl" and rng.random() < COUNT_P:
        det, count = None, rng.randint(2, 20)
    elif num == "pl" and det == "indef":
        det = None
    adj = rng.choice(W.adj_for[cls]) if rng.random() < adj_p else None
    return NounPhrase(noun, cls, num, det, count, adj, W.gender[noun] or (rng.choice("mf") if cls == "p" else "n"))


def sample_np(rng, W, classes, pron=True, named=NAMED_P, adj_p=ADJ_P):
    """A noun phrase whose referent belongs to one of the classes (letters, see NOUNS)."""
    cls, r = rng.choices(classes, [CLASS_WEIGHTS.get(c, 1) for c in classes])[0], rng.random()
    if r < {"o": 1, "p": named, "l": NAMED_PLACE_P}.get(cls, 0):
        return sample_entity(rng, W, {"o": "ORG", "p": "PER", "l": "LOC"}[cls])
    if cls == "p" and pron and r < named + PRONOUN_P:
        return Pronoun(rng.choice(("I", "you", "he", "she", "we", "they")))
    return sample_noun(rng, W, cls, adj_p=adj_p)


def class_of(np):
    if isinstance(np, Entity):
        return {"PER": "p", "ORG": "o", "LOC": "l"}[np.type]
    return np.cls if isinstance(np, NounPhrase) else "p"


def pronoun_for(np):  # of an entity or a common noun phrase
    plural = isinstance(np, NounPhrase) and np.num == "pl"
    return "they" if plural else {"m": "he", "f": "she"}.get(np.gender, "it")


def sample_time(rng, tense, year_p=YEAR_P):
    """A year or a time adverb, agreeing with the tense."""
    if tense != "pres" and rng.random() < year_p:
        return rng.randint(1800, 2023) if tense == "past" else rng.randint(2026, 2060)
    return rng.choice(TIME_ADVERBS[tense].split())


def sample_clause(rng, W, depth=0, kind=None, simple=False, tense=None):
    """A meaning. depth 1: a linked or reported clause; simple: fewer optional parts, for short pairs."""
    np = partial(sample_np, rng, W, adj_p=ADJ_P_SIMPLE if simple else ADJ_P)
    kind = kind or draw(rng, KIND_P)
    if kind == SPEECH and depth > 0:  # no speech within speech
        kind = TRANSITIVE
    tense = tense or draw(rng, TENSE_P)
    c = Clause(kind, "past" if kind == COPULA and tense == "fut" else tense, neg=rng.random() < NEG_P)
    if kind == COPULA:  # no future copula
        c.agent = np("pavtxl")
        c.pred = rng.choice(W.adj_for[class_of(c.agent)])
    elif kind == SPEECH:
        c.verb, c.agent = rng.choice(("say", "say", "think")), np("p")
        c.said = sample_clause(rng, W, depth + 1, simple=simple)
        c.quote = c.verb == "say" and rng.random() < QUOTE_P
    else:
        c.verb = rng.choice(W.by_kind[kind])
        verb = W.verbs[c.verb]
        c.agent = np(verb.agents)
        if kind == TRANSITIVE:
            c.patient = np(verb.patients)
            if c.patient == c.agent:  # not "Maria saw Maria"
                c.patient = np(verb.patients, named=0)
            c.passive = tense != "fut" and rng.random() < PASSIVE_P
        if kind == MOTION:
            c.source = np("l") if rng.random() < SOURCE_P else None
            c.dest = np("l") if rng.random() < DEST_P or c.source is None else None
    if kind in PLACE_P and rng.random() < PLACE_P[kind]:
        place = np("l")
        adps = ("in", "near", "at") + (() if isinstance(place, Entity) else ("in", "behind", "under", "on"))
        c.adp, c.loc = rng.choice(adps), place
    if kind != SPEECH and rng.random() < TIME_P:
        c.time = sample_time(rng, c.tense)
    if depth == 0 and kind != SPEECH and not simple and rng.random() < LINKED_P:
        c.conj = rng.choice(("because", "while", "after", "before", "because", "and", "but", "or"))
        c.linked = sample_clause(rng, W, 1, rng.choice((TRANSITIVE, INTRANSITIVE, MOTION, COPULA)), tense=tense)
        c.linked_first = c.conj not in COORDINATORS and rng.random() < SUB_FIRST_P
    movable = [s for s in ("time", "loc") if getattr(c, s) is not None]
    if movable and depth == 0 and rng.random() < FRONT_P:
        c.front = rng.choice(movable)
    return c


# ------------------------------------------------------------------------------------------------
# Realisation: a meaning -> tokens in one language

def np_tokens(L, np, case, role):
    """Tokens of a noun phrase; case: nom, acc, erg or obl; role labels the tokens for QA spans."""
    F = L.func
    if isinstance(np, Entity):
        toks = [Token(w, "PROPN", ("B-" if i == 0 else "I-") + np.type, role) for i, w in enumerate(np.words)]
    elif isinstance(np, Pronoun):  # questions are never tagged: "how many" may be a PRON
        word = OBJECT_PRONOUN.get(np.word, np.word) if case in ("acc", "obl") else np.word
        toks = [Token(w, "PRON", role=role) for w in F[word].split()]
        if np.noun:  # how many <noun>s
            toks.append(Token(L.nouns[np.noun, "pl", "acc" if case == "acc" else "nom"], "NOUN", role=role))
    else:
        noun = Token(L.nouns[np.noun, np.num, "acc" if case == "acc" else "nom"], "NOUN", role=role)
        det = F.get(f"det.{np.det}.{np.num}") if np.det else None
        adj = [Token(L.adjs[np.adj, np.num], "ADJ", role=role)] if np.adj else []
        if adj and L.code == "ar" and np.det == "def":  # the article again: "the house the old"
            adj.insert(0, Token(det, "DET", role=role))
        if det == "a" and L.code == "en" and (adj or [noun])[0].form[0] in "aeiou":
            det = "an"
        toks = [Token(det, "DET", role=role)] if det else []
        if np.count:
            toks.append(Token(str(np.count), "NUM", role=role + ".count" if role else None))
        toks += adj + [noun] if L.info["adj"] == "before" else [noun] + adj
    marked = not isinstance(np, NounPhrase) or np.cls in "pa" or np.det == "def"  # definite or animate
    if L.code == "hi" and (case == "erg" or case == "acc" and marked):  # the ergative, a marked object
        toks.append(Token(F[case], "ADP"))
    return toks


def english_verb(L, c, person, question=False):
    """(auxiliary, the rest): do-support, irregular forms, agreement (-s, am/is/are, was/were)."""
    t, no = c.tense, [Token("not", "PART")] if c.neg else []
    if c.kind == COPULA or c.passive:
        be = ("am" if person == "1sg" else "is" if person == "3sg" else "are") if t == "pres" else \
            ("was" if person in ("3sg", "1sg") else "were")
        return [Token(be, "AUX")], no + ([Token(L.verbs[c.verb, "part"], "VERB")] if c.passive else [])
    base = [Token(L.verbs[c.verb, "base"], "VERB")]
    if t == "fut":
        return [Token("will", "AUX")], no + base
    if c.neg or question:
        return [Token("did" if t == "past" else "does" if person == "3sg" else "do", "AUX")], no + base
    return [], [Token(L.verbs[c.verb, "past" if t == "past" else "s3" if person == "3sg" else "base"], "VERB")]


def verb_tokens(L, c, num):
    """The verb complex of any other language, from its morphology table and auxiliaries."""
    F, t, sov = L.func, c.tense, L.info["order"] == "SOV"
    out = [Token(F["not"], "PART")] if c.neg else []
    if c.kind == COPULA:
        aux = F.get(f"cop.{t}.{num}")
        return out + ([Token(aux, "AUX")] if aux else [])
    if c.passive or t == "fut" and FUTURE[L.code] == "aux":
        verb = [Token(L.verbs[c.verb, "part" if c.passive else "inf"], "VERB")]
        aux = [Token(F[f"pass.{t}.{num}" if c.passive else f"fut.{num}"], "AUX")]
        return out + (verb + aux if sov else aux + verb)
    if t == "fut" and FUTURE[L.code] == "part":
        return out + [Token(F["fut.part"], "PART"), Token(L.verbs[c.verb, "pres." + num], "VERB")]
    out.append(Token(L.verbs[c.verb, f"{t}.{num}"], "VERB"))
    if L.code == "hi" and t == "pres":
        out.append(Token(F["pres." + num], "AUX"))
    return out


def pp(L, adp, np, role):
    """An adpositional phrase; np may be a year."""
    inner = [Token(str(np), "NUM", role=role)] if isinstance(np, int) else np_tokens(L, np, "obl", role)
    adposition = [Token(L.func[adp], "ADP")]
    return adposition + inner if L.info["adp"] == "prepositions" else inner + adposition


# Constituent slots in their order: A the part of the verb that goes before the subject in a question
# (English do-support, Spanish inversion), S subject, V verb, O object or predicate, X obliques
SLOT_ORDER = {"SVO": "ASVOX", "SOV": "ASXOV", "VSO": "AVSOX"}
WH_SLOT = {"agent": "S", "patient": "O", "count": "O", "loc": "Xloc", "time": "Xtime"}


def constituents(L, c, wh):
    """The clause's (slot, tokens), in no particular order; wh: the slot a question asks about."""
    subject = c.patient if c.passive else c.agent
    if wh == "agent":
        subject = Pronoun("who" if class_of(c.agent) in "pao" else "what")
    erg = L.code == "hi" and c.kind == TRANSITIVE and not c.passive and c.tense == "past"
    parts = [("S", np_tokens(L, subject, "erg" if erg else "nom", "patient" if c.passive else "agent"))]
    pronoun = subject.word if isinstance(subject, Pronoun) else pronoun_for(subject)  # the subject's person
    person = {"I": "1sg", "you": "2sg", "we": "pl", "they": "pl"}.get(pronoun, "3sg")
    num = "pl" if person == "pl" else "sg"
    inverted = wh not in (None, "agent") and (L.code == "en" or L.info["wh"] == "front+inversion")
    if L.code == "en":
        aux, rest = english_verb(L, c, person, question=inverted)
        parts += [("A", aux), ("V", rest)] if inverted else [("V", aux + rest)]
    else:
        parts.append(("A" if inverted else "V", verb_tokens(L, c, num)))
    if c.kind == TRANSITIVE and not c.passive:
        patient = Pronoun("who" if class_of(c.patient) in "pao" else "what") if wh == "patient" else \
            Pronoun("how_many", c.patient.noun) if wh == "count" else c.patient
        parts.append(("O", np_tokens(L, patient, "acc", "patient")))
    elif c.pred:
        parts.append(("O", [Token(L.adjs[c.pred, num], "ADJ")]))
    if c.passive:
        parts.append(("X", pp(L, "by", c.agent, "agent")))
    if c.loc:
        parts.append(("Xloc", [Token(L.func["where"], "ADV")] if wh == "loc" else pp(L, c.adp, c.loc, "loc")))
    for adp, role in (("from", "source"), ("to", "dest")):  # motion
        if getattr(c, role):
            parts.append(("X", pp(L, adp, getattr(c, role), role)))
    if wh == "time":
        parts.append(("Xtime", [Token(L.func["when"], "ADV")]))
    elif c.time is not None:
        when = pp(L, "in", c.time, "time") if isinstance(c.time, int) else [Token(L.advs[c.time], "ADV", role="time")]
        parts.append(("Xtime", when))
    return parts


def realize(L, c, wh=None):
    """Tokens of one clause, or of a question about its slot wh (agent, patient, count, loc, time)."""
    parts = sorted(constituents(L, c, wh), key=lambda p: SLOT_ORDER[L.info["order"]].index(p[0][0]))  # stable
    front = None
    if c.front and wh is None:  # the fronted adverbial, then a comma
        front = next(p for p in parts if p[0] == "X" + c.front)
        parts.insert(0, ("P", [Token(L.func[","], "PUNCT")]))
    if wh is not None and L.info["wh"] != "in situ":  # the wh-phrase moves to the front
        front = next(p for p in parts if p[0] == WH_SLOT[wh])
    if front is not None:
        parts.remove(front)
        parts.insert(0, front)
    toks = [t for _, ts in parts for t in ts]
    if c.kind == SPEECH and c.quote:
        toks += [Token(":", "PUNCT"), Token('"', "PUNCT")] + realize(L, c.said) + [Token('"', "PUNCT")]
    elif c.kind == SPEECH:
        toks += [Token(L.func["that"], "SCONJ")] + realize(L, c.said)
    if c.linked and wh is None:
        linked = [Token(L.func[c.conj], "CCONJ" if c.conj in COORDINATORS else "SCONJ")] + realize(L, c.linked)
        toks = linked + [Token(L.func[","], "PUNCT")] + toks if c.linked_first else toks + linked
    return toks


def sentence(L, c, wh=None):
    """A full sentence: clause + final punctuation, capitalised where the script has case."""
    toks = realize(L, c, wh)
    if L.info["script"] in ("Latin", "Cyrillic", "Greek"):  # scripts with upper case
        toks[0] = toks[0]._replace(form=toks[0].form[0].upper() + toks[0].form[1:])
    opening = [Token("¿", "PUNCT")] if wh is not None and L.code == "es" else []
    return opening + toks + [Token(L.func["." if wh is None else "?"], "PUNCT")]


def as_text(toks):
    return " ".join(t.form for t in toks)


def nbytes(s):
    return len(s.encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# Pre-training text: lines of one to three sentences, with pronouns referring back

def sample_line(rng, W):
    """Meanings for one line: a list of (clause, wh slot or None)."""
    first, n = sample_clause(rng, W), draw(rng, LINE_P)
    if n == "question" and first.kind in (TRANSITIVE, INTRANSITIVE, MOTION) and not first.passive:
        first.neg, first.linked, first.front = False, None, None  # a plain question
        slots = ["agent"] + [s for s in ("patient", "loc", "time") if getattr(first, s) is not None]
        if isinstance(first.patient, NounPhrase) and first.patient.count:
            slots.append("count")
        return [(first, rng.choice(slots))]
    out = [(first, None)]
    for _ in range(n - 1 if n != "question" else 0):
        c = sample_clause(rng, W)
        if not isinstance(first.agent, Pronoun) and c.kind != COPULA and rng.random() < BACK_REFERENCE_P \
                and class_of(first.agent) in W.verbs[c.verb].agents:
            c.agent = Pronoun(pronoun_for(first.agent))
            if c.patient == c.agent:
                c.patient = sample_np(rng, W, W.verbs[c.verb].patients, pron=False)
        out.append((c, None))
    return out


def mlm_lines(W, lang, seed, target):
    """Pre-training lines of one language, about target bytes in all."""
    rng = random.Random(f"xmoe-synthetic:{seed}:mlm:{lang}")
    L, en, lines, size = W.lexicons[lang], W.lexicons["en"], [], 0
    while size < target:
        lx = L
        if lang != "en" and rng.random() < CS_LINES:  # code-switched: a lexicon with English words mixed in
            borrow = {w for w in [*W.gender, *W.adjectives, *W.verbs, *ADVERBS] if rng.random() < CS_WORDS}
            lx = replace(L, nouns={k: en.nouns[k[0], k[1], "nom"] if k[0] in borrow else f for k, f in L.nouns.items()},
                         adjs={k: en.adjs[k] if k[0] in borrow else f for k, f in L.adjs.items()},
                         verbs={k: en.verbs[k[0], EN_VERB_KEY[k[1]]] if k[0] in borrow else f
                                for k, f in L.verbs.items()},
                         advs={k: en.advs[k] if k in borrow else f for k, f in L.advs.items()})
        lines.append(" ".join(as_text(sentence(lx, c, wh)) for c, wh in sample_line(rng, W)))
        size += nbytes(lines[-1]) + 1
    return lines


# ------------------------------------------------------------------------------------------------
# Task items, sampled once per split and realised in every language. Sentence pairs share their words:
# paraphrases (label 1) and scrambles (label 0), by construction and its weight.
PARAPHRASES = {"fronting": 3, "clause order": 2, "direct or reported": 1, "passive": 1}
SCRAMBLES = {"roles": 3, "places": 1, "adjectives": 1}


def pair_meanings(rng, W, how):
    """(meaning 1, meaning 2) of one construction; which one comes first is drawn later."""
    simple = partial(sample_clause, rng, W, simple=True)
    if how == "clause order":  # A because B . / Because B , A .
        c = simple(kind=rng.choice((TRANSITIVE, INTRANSITIVE)))
        linked = simple(depth=1, kind=rng.choice((TRANSITIVE, INTRANSITIVE)), tense=c.tense)
        c = replace(c, front=None, passive=False, conj=rng.choice(("because", "while", "after", "before")),
                    linked=replace(linked, passive=False))
        return c, replace(c, linked_first=True)
    if how == "direct or reported":  # Maria said : " ... " / Maria said that ...
        c = replace(simple(kind=SPEECH), verb="say", quote=True)
        return c, replace(c, quote=False)
    if how == "places":  # from Lima to Oslo / from Oslo to Lima
        place = partial(sample_np, rng, W, "l", adj_p=ADJ_P_SIMPLE)
        c = replace(simple(kind=MOTION), neg=False, front=None, source=place(), dest=place())
        return c, replace(c, source=c.dest, dest=c.source)
    c = replace(simple(kind=TRANSITIVE, tense=rng.choice(("past", "pres"))), neg=False, passive=False, front=None)
    if c.time is None and rng.random() < PAIR_TIME_P:
        c.time = sample_time(rng, c.tense)
    if how == "fronting":  # Maria bought a car in 1932 . / In 1932 , Maria bought a car .
        if c.loc is None and (c.time is None or rng.random() < PAIR_PLACE_P):
            c.adp, c.loc = "in", sample_entity(rng, W, "LOC")
        return c, replace(c, front=rng.choice([s for s in ("time", "loc") if getattr(c, s) is not None]))
    if how == "passive":  # Maria bought the car . / The car was bought by Maria .
        return c, replace(c, passive=True)
    c.verb = rng.choice(SYMMETRIC)
    if how == "roles":  # Maria saw the doctor . / The doctor saw Maria .
        person = partial(sample_np, rng, W, "p", named=PAIR_NAMED_P, adj_p=ADJ_P_SIMPLE)
        c.agent, c.patient = person(), person()
        return c, replace(c, agent=c.patient, patient=c.agent)
    # "adjectives": the old man saw the young girl . / the young man saw the old girl .
    c.agent, c.patient = sample_noun(rng, W, "p"), sample_noun(rng, W, "p")
    c.agent.adj, c.patient.adj = rng.sample(W.adj_for["p"], 2)
    return c, replace(c, agent=replace(c.agent, adj=c.patient.adj), patient=replace(c.patient, adj=c.agent.adj))


def paws_meaning(rng, W, label):
    """(meaning 1, meaning 2) with the same words: 1 = same meaning, 0 = roles scrambled."""
    while True:
        c, c2 = pair_meanings(rng, W, draw(rng, PARAPHRASES if label else SCRAMBLES))
        movable = [s for s in ("time", "loc") if getattr(c2, s) is not None]
        if label == 0 and rng.random() < SCRAMBLE_FRONT_P and not c2.passive and movable:
            c2 = replace(c2, front=rng.choice(movable))
        s1, s2 = as_text(sentence(W.lexicons["en"], c)), as_text(sentence(W.lexicons["en"], c2))
        if s1 != s2 and max(len(s1), len(s2)) <= PAIR_MAX_EN_BYTES:
            return (c, c2) if rng.random() < PAIR_SWAP_P else (c2, c)


def qa_paragraph(rng, W):
    """Two plain sentences (meanings) and the questions one can ask about them."""
    per1, tense = sample_entity(rng, W, "PER"), rng.choice(("past", "past", "fut"))
    verbs = [v for v in W.by_kind[TRANSITIVE] if "p" in W.verbs[v].agents]
    v1 = rng.choice(verbs)
    patient = sample_np(rng, W, W.verbs[v1].patients, pron=False)
    while patient == per1:
        patient = sample_np(rng, W, W.verbs[v1].patients, pron=False)
    c1 = Clause(TRANSITIVE, tense, verb=v1, agent=per1, patient=patient, time=sample_time(rng, tense, year_p=1),
                adp=rng.choice(("in", "near")), loc=sample_entity(rng, W, "LOC"))
    v2 = rng.choice([v for v in verbs if v != v1 and set(W.verbs[v].patients) & set("fvtxa")])
    things = sample_noun(rng, W, rng.choice([k for k in W.verbs[v2].patients if k in "fvtxa"]), num="pl")
    org = "o" in W.verbs[v2].agents and rng.random() < QA_ORG_P
    c2 = Clause(TRANSITIVE, tense, verb=v2, agent=sample_entity(rng, W, "ORG") if org else Pronoun(pronoun_for(per1)),
                patient=replace(things, det=None, count=rng.randint(2, 12)))
    qs = [Question(replace(c1, time=None), "agent", 0), Question(replace(c1, loc=None, time=None), "patient", 0),
          Question(replace(c1, time=None), "loc", 0), Question(replace(c1, loc=None), "time", 0),
          Question(replace(c2, agent=c2.agent if org else per1), "count", 1)]  # "How many apples will Maria buy?"
    if org:
        qs.append(Question(c2, "agent", 1))
    return [c1, c2], rng.sample(qs, rng.choice((1, 2, 2, 3)))


def squad(W, lang, items, id_prefix):
    """SQuAD v1.1 JSON of the paragraphs, realised in one language."""
    L, data = W.lexicons[lang], []
    for k, (sents, qs) in enumerate(items):
        toks = [sentence(L, c) for c in sents]
        texts = [as_text(t) for t in toks]
        context = " ".join(texts)
        qas = []
        for j, q in enumerate(qs):  # the answer: the tokens of the slot ("count": the patient's NUM)
            idx = [i for i, t in enumerate(toks[q.sentence]) if t.role and (t.role == "patient.count"
                   if q.slot == "count" else t.role.split(".")[0] == q.slot)]
            i0, i1 = idx[0], idx[-1] + 1
            assert idx == list(range(i0, i1)), (q, toks)
            start = sum(len(s) + 1 for s in texts[:q.sentence]) + len(as_text(toks[q.sentence][:i0])) + (i0 > 0)
            answer = as_text(toks[q.sentence][i0:i1])
            assert context[start:start + len(answer)] == answer
            qas.append({"id": f"{id_prefix}-{k:05d}-{j}", "question": as_text(sentence(L, q.clause, wh=q.slot)),
                        "answers": [{"answer_start": start, "text": answer}]})
        data.append({"title": f"{id_prefix}-{k:05d}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


# ------------------------------------------------------------------------------------------------
# Writers in XTREME's layouts

SPLITS = (("train", (TRAIN_LANG,)), ("dev", LANGS), ("test", LANGS))  # train: en only; dev, test: parallel
TEST_TASKS = ("udpos", "panx", "pawsx", "xquad")  # the tasks with test files (squad/ is xquad's train, dev)
# A task's own test languages, beside its files: without it, eval_xtreme.py would average this world
# over XTREME's official languages, most of which it lacks (eval_xtreme.py DECLARED, the same name)
DECLARED = "languages.json"


def write(text, out_dir, *parts):  # these characters exactly, on any platform
    Path(out_dir, *parts).write_text(text, encoding="utf-8", newline="")


def note(summary, task, name, n, key, longest):
    summary["counts"].setdefault(task, {})[name] = n
    summary["max_bytes"][key] = max(summary["max_bytes"].get(key, 0), longest)


def write_tagging(W, out_dir, seed, task, summary):
    """udpos or panx: word<TAB>UPOS or IOB2 tag lines, a blank line between sentences (XTREME.md 3.3, 3.4)."""
    for split, langs in SPLITS:
        rng = random.Random(f"xmoe-synthetic:{seed}:{task}:{split}")
        meanings = []
        while len(meanings) < SIZES[split]:  # short enough; for panx, with an entity
            c = sample_clause(rng, W)
            toks = sentence(W.lexicons["en"], c)
            if len(as_text(toks)) <= TAG_MAX_EN_BYTES and (task != "panx" or any(t.ner != "O" for t in toks)):
                meanings.append(c)
        for lang in langs:
            sents = [sentence(W.lexicons[lang], c) for c in meanings]
            lines = ["\n".join(f"{t.form}\t{t.upos if task == 'udpos' else t.ner}" for t in s) for s in sents]
            write("\n\n".join(lines) + "\n", out_dir, task, f"{split}-{lang}.tsv")
            note(summary, task, f"{split}-{lang}", len(sents), "sentence", max(nbytes(as_text(s)) for s in sents))


def write_pawsx(W, out_dir, seed, summary):
    """Rows as XTREME's utils_preprocess writes them: csv.writer with a TAB delimiter (CRLF, '"' quoted)."""
    for split, langs in SPLITS:
        rng = random.Random(f"xmoe-synthetic:{seed}:pawsx:{split}")
        labels = [i % 2 for i in range(SIZES[split])]  # balanced classes, shuffled
        rng.shuffle(labels)
        pairs = [(paws_meaning(rng, W, y), y) for y in labels]
        for lang in langs:
            L, buf = W.lexicons[lang], io.StringIO(newline="")
            rows = [[as_text(sentence(L, a)), as_text(sentence(L, b)), str(y)] for (a, b), y in pairs]
            csv.writer(buf, delimiter="\t").writerows(rows)
            write(buf.getvalue(), out_dir, "pawsx", f"{split}-{lang}.tsv")
            note(summary, "pawsx", f"{split}-{lang}", len(rows), "pair", max(nbytes(r[0]) + nbytes(r[1]) for r in rows))


def write_qa(W, out_dir, seed, summary):
    """SQuAD v1.1 train and dev (en) and XQuAD test files (every language, shared question ids)."""
    for split, task, name, prefix in (("train", "squad", "train-v1.1", "sq-train"),
                                      ("dev", "squad", "dev-v1.1", "sq-dev"), ("test", "xquad", "xquad.{}", "xq")):
        rng, items, total = random.Random(f"xmoe-synthetic:{seed}:qa:{split}"), [], 0
        while total < SIZES[split]:  # paragraphs with SIZES[split] questions in all
            sents, qs = qa_paragraph(rng, W)
            items.append((sents, qs[:SIZES[split] - total]))
            total += len(items[-1][1])
        for lang in [TRAIN_LANG] if task == "squad" else LANGS:
            obj = squad(W, lang, items, prefix)
            write(json.dumps(obj, ensure_ascii=False), out_dir, task, name.format(lang) + ".json")
            paragraphs = [p for art in obj["data"] for p in art["paragraphs"]]
            qas = [q for p in paragraphs for q in p["qas"]]
            note(summary, task, name.format(lang), len(qas), "context", max(nbytes(p["context"]) for p in paragraphs))
            note(summary, task, name.format(lang), len(qas), "question", max(nbytes(q["question"]) for q in qas))


def write_declarations(out_dir):
    """<task>/languages.json for every task with test files: the languages of its test split."""
    declaration = {"languages": list(dict(SPLITS)["test"]),
                   "about": "the test languages of this task in the synthetic world (not XTREME's); "
                            "eval_xtreme.py averages the task over these"}
    for task in TEST_TASKS:
        write(json.dumps(declaration, indent=1) + "\n", out_dir, task, DECLARED)


def make_synthetic(out_dir, seed=0):
    """Write the world under out_dir (files: see the module docstring). Returns a summary: languages, info
    (LANG_INFO plus mlm_bytes, mlm_lines), counts[task][file stem] and max_bytes (of the longest items)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    W = build_world(seed)
    for sub in ("mlm", "udpos", "panx", "pawsx", "squad", "xquad"):
        Path(out_dir, sub).mkdir(parents=True, exist_ok=True)
    summary = dict(out_dir=str(out_dir), seed=seed, languages=list(LANGS), train_language=TRAIN_LANG,
                   info={}, counts={}, max_bytes={})
    for lang in LANGS:
        text = "\n".join(mlm_lines(W, lang, seed, MLM_BYTES[lang])) + "\n"
        write(text, out_dir, "mlm", f"{lang}.txt")
        summary["info"][lang] = dict(LANG_INFO[lang], mlm_bytes=nbytes(text), mlm_lines=text.count("\n"))
    for task in ("udpos", "panx"):
        write_tagging(W, out_dir, seed, task, summary)
    write_pawsx(W, out_dir, seed, summary)
    write_qa(W, out_dir, seed, summary)
    write_declarations(out_dir)
    return summary


# ------------------------------------------------------------------------------------------------
# The command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="synthetic.py", description="Write the synthetic multilingual world "
                                     "(pre-training text and XTREME-layout tasks in 7 languages).")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write, like XTREME's download/")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same files; default 0)")
    args = parser.parse_args(argv)
    try:
        summary = make_synthetic(args.out, args.seed)
    except OSError as e:  # bad input: one clear line, no traceback (exit 2, like argparse)
        parser.exit(2, f"error: {e}\n")
    mb = sum(info["mlm_bytes"] for info in summary["info"].values()) / 1e6
    print(f"wrote a synthetic world (seed {args.seed}, {len(LANGS)} languages, {mb:.1f} MB of pre-training "
          f"text, {len(summary['counts'])} tasks) to {args.out}")


if __name__ == "__main__":
    main()
