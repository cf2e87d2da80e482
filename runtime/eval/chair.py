"""CHAIR (Rohrbach et al. 2018) scored word for word as the official code scores it, in its two variants.

- ``rohrbach``: LisaAnne/Hallucination `utils/chair.py` (the paper's code, Python 2): nltk `word_tokenize` of the
  lower-cased caption, then `pattern.en.singularize` on every token.
- ``opera``: the Python-3 copy that OPERA (shikiw/OPERA `chair.py`), VCD and most hallucination-mitigation papers
  run: the same tokenization, then nltk `pos_tag` and `WordNetLemmatizer().lemmatize(word, pos)` with the tag's
  WordNet part of speech (J* adjective, V* verb, N* noun, R* adverb, anything else noun); it adds "train track" to
  the double words and reports recall.

Both then (the facts, from /work/ref/official/NOTES.md and the files it names): merge double words left to right
(a pair of consecutive tokens in the double-word table becomes its entry, e.g. "traffic light", "baby cat" -> "cat",
"passenger train" -> "train", "bow tie" -> "tie", "toilet seat" -> "toilet", "wine glas" -> "wine glass"); drop
every "seat" when the caption also says "toilet"; keep the words that are entries of the synonym table (exact
string match: an entry with a leading space, " motor bike", or an upper-case one, "iPhone", never matches; a
hyphenated token, "hot-dog", is one token that matches nothing) and map each to its line's first entry. Every
mention counts (CHAIR_i), a caption with any word outside the image's ground truth is hallucinated (CHAIR_s);
OPERA's recall = unique correct objects / ground-truth objects, summed over images.

No NLTK or pattern at run time and nothing downloaded:
- the tokenizer is nltk's `NLTKWordTokenizer` rules (nltk/tokenize/destructive.py) applied per sentence; the
  sentences are split where Punkt splits a lower-cased caption: after a token ending in one "." (or "?", "!")
  that is followed by white space, unless the token is one of Punkt's English abbreviations that occur in captions
  (ABBREVIATIONS). Punkt's model is not shipped: this is exact for every token that can be a synonym-table word.
- `singularize` follows pattern.en 2.6's rules (clips/pattern `pattern/text/en/inflect.py`, "SINGULARIZE"; the
  Python-2 release the Rohrbach code ran with), with its quirks: "bus" -> "bu", "glass" -> "glas", "ties" -> "ty",
  "people" -> "person", "shelves" -> "shelve". (pattern 3.6 differs only in its -ie list: it returns "cookies"
  and "doggies" unchanged where 2.6 gives "cookie", "doggie".)
- the lemmatizer is WordNet 3.0 morphy as nltk 3.6+ applies it (scripts/build_chair_lemmas.py builds
  chair_lemmas.json, the lemmas of every form whose lemma is a word CHAIR looks at).
- the part-of-speech tag matters only for a token whose lemma differs by part of speech among those words (e.g.
  "skiing": verb -> "ski" -> skis, noun -> "skiing"). nltk's averaged-perceptron tagger (trained weights) cannot
  be shipped; `coarse_pos` decides those tokens with the rules in its docstring, which is the one approximate
  step of the ``opera`` variant. Every other token's result does not depend on its tag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
COCO_SYNONYMS = HERE / "coco_synonyms.txt"  # LisaAnne/Hallucination data/synonyms.txt (as embedded in OPERA's)
LEMMAS = HERE / "chair_lemmas.json"
IMPLS = ("opera", "rohrbach")
WORLD_WORDS = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "moon", "disc", "disk", "plus",
               "rhombus", "lozenge", "annulus", "donut", "crescent")  # world.SHAPES + make_eval_sets.SYNONYMS
DEFAULT_IMPL = "opera"

# ------------------------------------------------------------------------------------------------ tables (facts)

DOUBLE_WORDS = (  # LisaAnne utils/chair.py coco_double_words (duplicates as in the original)
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear", "home plate")
OPERA_EXTRA_DOUBLE_WORDS = ("train track",)
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
                "cub")
VEHICLE_WORDS = ("jet", "train")


def double_word_table(impl: str) -> dict[str, str]:
    """The double-word dict in the official construction order (later assignments win)."""
    words = DOUBLE_WORDS + (OPERA_EXTRA_DOUBLE_WORDS if impl == "opera" else ())
    table = {w: w for w in words}
    for a in ANIMAL_WORDS:
        table[f"baby {a}"] = a
        table[f"adult {a}"] = a
    for v in VEHICLE_WORDS:
        table[f"passenger {v}"] = v
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


def parse_synonyms(text: str, impl: str) -> tuple[list[list[str]], set[str], dict[str, str]]:
    """`[line.strip().split(', ') ...]` as the official code parses the table: -> (lines, objects, word -> node).
    LisaAnne reads the file's lines; OPERA splits an embedded string that starts with a newline, so its table also
    holds the entry '' (harmless: no token is empty)."""
    raw = text.splitlines()
    if impl == "opera":
        raw = [""] + raw
    lines = [s.strip().split(", ") for s in raw]
    objects = {w for line in lines for w in line}
    inverse = {w: line[0] for line in lines for w in line}
    return lines, objects, inverse


def relevant_words(synonym_texts: Iterable[str] | None = None) -> set[str]:
    """Single words whose lemma CHAIR looks at: synonym entries without a space, the words of every double-word
    key (both variants), "toilet" and "seat". Default tables: COCO's and the demo world's (runtime/eval/world.py)."""
    if synonym_texts is None:
        synonym_texts = [COCO_SYNONYMS.read_text(encoding="utf-8"), ", ".join(WORLD_WORDS)]
    words = {"toilet", "seat"}
    for text in synonym_texts:
        words.update(w for w in parse_synonyms(text, "rohrbach")[1] if w and " " not in w)
    for key in double_word_table("opera"):
        words.update(key.split(" "))
    return words


# ------------------------------------------------------------------------------------------------ tokenizer

ABBREVIATIONS = frozenset({  # Punkt English abbreviation types a caption may hold (no synonym word among them)
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "u.s", "inc", "co", "ltd", "mt", "ft",
    "no", "approx", "a.m", "p.m"})

_RULES_START = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r'^"'), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_RULES_PUNCT = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$"), r"\1 \2 \3 "),  # nltk: *+ (same matches here)
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_RULE_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_RULE_DASHES = (re.compile(r"--"), r" -- ")
_RULES_END = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b", r"(?i)\b(gon)(?#X)(na)\b",
    r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b", r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
    r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b")]
_SENT_END = re.compile(r"\S*?[.?!][\"')\]}»”’]*(?=\s|$)")  # closing quotes/brackets join the sentence (Punkt)


def split_sentences(text: str) -> list[str]:
    """Punkt's sentence breaks for a caption (see the module docstring): after `...x.`, `x?`, `x!` + white space."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        tok = m.group().rstrip("\"')]}»”’")
        if tok.endswith("."):
            typ = tok[:-1].lower().lstrip("\"'([{`")
            if tok.endswith("..") or typ in ABBREVIATIONS or typ.split("-")[-1] in ABBREVIATIONS:
                continue
        out.append(text[start:m.end()])
        start = m.end()
    if text[start:].strip():
        out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def tokenize_sentence(text: str) -> list[str]:
    """nltk's NLTKWordTokenizer on one sentence (the rule order of nltk/tokenize/destructive.py)."""
    for rx, sub in _RULES_START:
        text = rx.sub(sub, text)
    for rx, sub in _RULES_PUNCT:
        text = rx.sub(sub, text)
    for rx, sub in (_RULE_PARENS, _RULE_DASHES):
        text = rx.sub(sub, text)
    text = f" {text} "
    for rx, sub in _RULES_END:
        text = rx.sub(sub, text)
    for rx in _CONTRACTIONS:
        text = rx.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize: sentences, then the word tokenizer on each."""
    return [t for s in split_sentences(text) for t in tokenize_sentence(s)]


# ------------------------------------------------------------------------------------------------ pattern.en

_SG_RULES = [(re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"), (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"), (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"), (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"), (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"), (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"), (r"(?i)([^aeiouy]|qu)ies$", r"\1y"), (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"), (r"([nlw]i)ves$", r"\1fe"),
    (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"), (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""))]
_SG_UNINFLECTED = (
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors", "christmas",
    "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod", "graffiti", "mews",
    "species", "contretemps", "mumps", "swine", "corps", "news", "swiss")
_SG_UNCOUNTABLE = (
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information",
    "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research", "water",
    "cheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard", "sand")
_SG_IE = (  # pattern 2.6's list; "^pie" and "^tie" are literal strings: they never match
    "algerie", "auntie", "beanie", "birdie", "bogie", "bombie", "bookie", "collie", "cookie", "cutie", "doggie",
    "eyrie", "freebie", "goonie", "groupie", "hankie", "hippie", "hoagie", "hottie", "indie", "junkie", "laddie",
    "laramie", "lingerie", "meanie", "nightie", "oldie", "^pie", "pixie", "quickie", "reverie", "rookie", "softie",
    "sortie", "stoolie", "sweetie", "techie", "^tie", "toughie", "valkyrie", "veggie", "weenie", "yuppie", "zombie")
_SG_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon"}
_PLURAL_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below", "for",
    "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto", "around",
    "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart", "betwixt", "beyond",
    "but", "by"))


@lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """pattern.en.singularize (noun, pattern 2.6), its checks in its order: compounds with a preposition
    ("mothers-in-law"), a trailing apostrophe, uninflected and uncountable words (any whose END is this word: "a"
    -> "a" because of "tuna"), -ie words ("doggies" -> "doggie"), irregular endings ("women" -> "woman"), then
    the first matching suffix rule."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PLURAL_PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _SG_UNINFLECTED) or any(x.endswith(w) for x in _SG_UNCOUNTABLE):
        return word
    for x in _SG_IE:
        if w.endswith(x + "s"):
            return x  # pattern 2.6 returns the list's word ("cookies" -> "cookie"; 3.6 returns "cookies")
    for x, sg in _SG_IRREGULAR.items():
        if w.endswith(x):
            return re.sub("(?i)" + x + "$", sg, word)
    for rx, repl in _SG_RULES:
        m = rx.search(word)
        if m:
            for k, g in enumerate(m.groups()):
                if g is None:
                    repl = repl.replace("\\" + str(k + 1), "")
            return rx.sub(repl, word)
    return word


# ------------------------------------------------------------------------------------------------ WordNet lemmas

DETACH = {  # WordNet morphy's detachment rules per part of speech, in nltk's order (wordnet.py)
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


@lru_cache(maxsize=1)
def _lemma_table() -> dict[str, dict[str, str]]:
    return json.loads(LEMMAS.read_text(encoding="utf-8"))["lemmas"]


def lemmatize(word: str, pos: str) -> str:
    """WordNetLemmatizer().lemmatize(word, pos) for every word whose lemma CHAIR can use (see chair_lemmas.json);
    any other word comes back unchanged, which CHAIR cannot tell from its true lemma."""
    return _lemma_table()[pos].get(word, word)


_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "our",
                          "my", "your", "some", "each", "every", "no", "any", "one", "two", "three", "several",
                          "many", "few"})
_VERB_FOLLOWERS = frozenset({  # words after which an "-ed" form is a verb (a participle, not an adjective)
    "to", "on", "in", "with", "by", "up", "down", "at", "near", "next", "together", "a", "an", "the", "his", "her",
    "their", "its", "into", "onto", "from", "off", "over", "through", "around", "along", "across", "behind", "under",
    "between", "beside", "against", "inside", "outside", "beneath", "underneath", "above", "below", "atop", "for",
    "as", "of", "out", "away", "back", "toward", "towards", "within", "upon", "while", "and", "or", "but", ",", ".",
    "!", "?", ";", ":"})


_NOUN_ING = frozenset({  # -ing words that are nouns in the tagger's training text (tagged NN in any context)
    "seating", "lighting", "parking", "bedding", "shipping", "training", "booking", "planting", "monitoring",
    "trafficking", "topping", "tracking", "signing"})
_IRREGULAR_VERB = {"born": "v", "borne": "v", "sank": "v", "sunk": "v", "lit": "v", "rang": "v", "rung": "v",
                   "sunken": "a"}  # irregular forms whose verb lemma is an object word (verb.exc): VBN/VBD, JJ


def coarse_pos(words: Sequence[str], i: int, objects: frozenset[str] | set[str] = frozenset()) -> str:
    """WordNet part of speech for token `i` where the tagger's choice matters (approximating nltk's perceptron
    tagger on captions): a word whose noun lemma is an object word is a noun ("bed", which as a verb would become
    "be"; "stove", "stave"); the irregular verb forms "born"/"borne" (-> bear), "sank"/"sunk" (-> sink), "lit",
    "rang", "rung" are verbs, "sunken" an adjective; an "-ing" form is a noun when it is a common noun (_NOUN_ING:
    "seating", "parking", "training"), follows a determiner or starts a double word ("a bowling ball", "parking
    meter"), else a verb (VBG: "a man skiing" -> ski); an "-ed" form is a verb (VBN/VBD) when a preposition,
    determiner, conjunction or punctuation (or nothing) follows it ("a dog tied to a pole"), else an adjective
    ("a potted plant"); anything else is a noun (plural nouns are NNS)."""
    w = words[i]
    prev = words[i - 1] if i > 0 else ""
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if lemmatize(w, "n") in objects:
        return "n"
    if w in _IRREGULAR_VERB:
        return _IRREGULAR_VERB[w]
    if w.endswith("ing"):
        if w in _NOUN_ING:
            return "n"
        if prev in _DETERMINERS or (nxt and f"{lemmatize(w, 'n')} {lemmatize(nxt, 'n')}" in _OPERA_DOUBLE):
            return "n"
        return "v"
    if w.endswith("ed"):
        return "v" if (not nxt or nxt in _VERB_FOLLOWERS) else "a"
    return "n"


_OPERA_DOUBLE = double_word_table("opera")


def lemmatize_caption(words: Sequence[str], objects: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """OPERA's lemma per token; the part of speech is looked at only where the lemmas differ (see coarse_pos;
    `objects`: the synonym table's words)."""
    table = _lemma_table()
    out = []
    for i, w in enumerate(words):
        by_pos = {p: table[p].get(w, w) for p in "nvar"}
        if len(set(by_pos.values())) == 1:
            out.append(by_pos["n"])
        else:
            out.append(by_pos[coarse_pos(words, i, objects)])
    return out


# ------------------------------------------------------------------------------------------------ scorer

@dataclass
class CaptionWords:
    words: list[str]  # synonym-table words, in order, one per mention
    nodes: list[str]  # their categories
    tokens: list[str] = field(default_factory=list)  # singular/lemma tokens after the double-word merge (OPERA's
    #                                                   "double_words", whose mean length gives its Len metric)


class Chair:
    """The official CHAIR of one variant over one synonym table (default: COCO's, the official file)."""

    def __init__(self, impl: str = DEFAULT_IMPL, synonyms: str | None = None):
        if impl not in IMPLS:
            raise ValueError(f"unknown CHAIR implementation {impl!r}; choose {' or '.join(IMPLS)}")
        self.impl = impl
        text = COCO_SYNONYMS.read_text(encoding="utf-8") if synonyms is None else synonyms
        self.lines, self.objects, self.inverse = parse_synonyms(text, impl)
        self.double = double_word_table(impl)
        if impl == "opera":
            known = set(json.loads(LEMMAS.read_text(encoding="utf-8"))["targets"])
            missing = sorted(w for w in self.objects if w and " " not in w and w == w.lower() and w not in known)
            if missing:
                raise ValueError(f"the shipped WordNet lemma table does not cover synonym word(s) "
                                 f"{', '.join(missing[:5])}; rebuild it (scripts/build_chair_lemmas.py) or use "
                                 "--chair-impl rohrbach")

    @property
    def categories(self) -> list[str]:
        return [line[0] for line in self.lines if line[0]]

    def caption_words(self, caption: str) -> CaptionWords:
        tokens = word_tokenize(caption.lower())
        if self.impl == "opera":
            tokens = lemmatize_caption(tokens, self.objects)
        else:
            tokens = [singularize(t) for t in tokens]
        merged, i = [], 0
        while i < len(tokens):
            pair = " ".join(tokens[i:i + 2])
            if pair in self.double:
                merged.append(self.double[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        kept = merged
        if "toilet" in kept and "seat" in kept:
            kept = [w for w in kept if w != "seat"]
        words = [w for w in kept if w in self.objects]
        return CaptionWords(words, [self.inverse[w] for w in words], merged)

    def objects_of(self, captions: Iterable[str], categories: Iterable[str] = ()) -> set[str]:
        """Ground truth of one image: its annotated categories' nodes and the nodes its human captions mention."""
        gt = {self.inverse[c] for c in categories if c in self.inverse}
        for cap in captions:
            gt.update(self.caption_words(cap).nodes)
        return gt

    def score(self, captions: Mapping[str, str] | Iterable[tuple[str, str]],
              ground_truth: Mapping[str, Iterable[str]]) -> dict:
        """`captions`: image id -> generated caption, or (image id, caption) pairs (each counts, repeated ids
        too, as compute_chair reads its list); `ground_truth`: image id -> category nodes (an id without any:
        no object, as the official defaultdict gives). -> {"chair_s", "chair_i", "recall", "len", ...} as
        compute_chair computes them (recall and Len: OPERA's additions, reported for both variants)."""
        pairs = list(captions.items()) if isinstance(captions, Mapping) else list(captions)
        n_caps = n_bad = mentions = wrong = n_gt = n_recalled = n_tokens = 0
        per_image = {}
        for image_id, caption in pairs:
            gt = set(ground_truth.get(image_id, ()))
            cw = self.caption_words(caption)
            bad = [(w, n) for w, n in zip(cw.words, cw.nodes) if n not in gt]
            recalled = {n for n in cw.nodes if n in gt}
            mentions += len(cw.nodes)
            wrong += len(bad)
            n_caps += 1
            n_bad += bool(bad)
            n_gt += len(gt)
            n_recalled += len(recalled)
            n_tokens += len(cw.tokens)
            per_image[image_id] = {"mentioned": cw.nodes, "hallucinated": [n for _, n in bad],
                                   "ground_truth": sorted(gt)}
        return {
            "chair_s": n_bad / n_caps if n_caps else 0.0,
            "chair_i": wrong / mentions if mentions else 0.0,
            "recall": n_recalled / n_gt if n_gt else 0.0,
            "len": 0.01 * n_tokens / n_caps if n_caps else 0.0,
            "n_captions": n_caps, "mentions": mentions, "hallucinated_mentions": wrong,
            "impl": self.impl, "per_image": per_image,
        }
