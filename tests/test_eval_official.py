"""Each official scoring rule on hand-made cases (issue 14). The expected values are derived by hand from the official
code (the facts in /work/ref/official/NOTES.md: LisaAnne/Hallucination utils/chair.py + pattern.en.singularize,
OPERA's chair.py + nltk word_tokenize/pos_tag/WordNetLemmatizer, MME tools/eval_tool/calculation.py, POPE
evaluate.py); each derivation is in the comment beside the case. Pure Python, no model: a few seconds."""

from __future__ import annotations

import json

import pytest
from anchorrt.runtime.eval import chair as C
from anchorrt.runtime.eval import mme
from anchorrt.runtime.eval.formats import (
    chair_caption_doc,
    pair_pope,
    pope_answer_lines,
    read_chair_captions,
    read_pope_answers,
)
from anchorrt.runtime.eval.loaders import EvalDataError, load_pope
from anchorrt.runtime.eval.metrics import parse_yes_no, pope_metrics
from click.testing import CliRunner

OPERA, ROHRBACH = C.Chair("opera"), C.Chair("rohrbach")

# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text, tokens", [
    # word_tokenize = Punkt sentences, then NLTKWordTokenizer per sentence: the final period of EACH sentence is split
    # off ("dog." mid-caption becomes "dog", "."), commas and "?"/"!" always are.
    ("a dog. a cat, two cats!", ["a", "dog", ".", "a", "cat", ",", "two", "cats", "!"]),
    # "mr." is a Punkt abbreviation: no sentence break, so the period stays on the token
    ("mr. smith has a dog.", ["mr.", "smith", "has", "a", "dog", "."]),
    # a closing quote after the period: Punkt breaks after the quote, and the period is split off
    ('he said "a dog." then a cat', ["he", "said", "``", "a", "dog", ".", "''", "then", "a", "cat"]),
    # a period not followed by white space is no break: "dog.a" stays one token
    ("a dog.a cat", ["a", "dog.a", "cat"]),
    # hyphens are kept inside a token; possessives split ('s), as do the contractions n't
    ("a hot-dog stand's sign isn't red", ["a", "hot-dog", "stand", "'s", "sign", "is", "n't", "red"]),
    # brackets, quotes and the ellipsis rule
    ('a "dog" (brown) ... near [a] car', ["a", "``", "dog", "''", "(", "brown", ")", "...", "near", "[", "a", "]",
                                          "car"]),
    # a comma before a digit is not split (3,000), before a letter it is
    ("3,000 cars,trucks", ["3,000", "cars", ",", "trucks"]),
])
def test_word_tokenize(text, tokens):
    assert C.word_tokenize(text) == tokens


# ------------------------------------------------------------------------------------------------ singularize


@pytest.mark.parametrize("word, singular", [
    ("dogs", "dog"),          # last rule, s$ -> ''
    ("bus", "bu"),            # no earlier rule matches "bus": s$ strips it (the Rohrbach code misses a singular bus)
    ("buses", "bus"),         # (bus)es$
    ("glass", "glas"),        # s$ again: hence the official 'wine glas' -> 'wine glass' double word
    ("glasses", "glass"),     # (x|ch|ss|sh)es$
    ("tennis", "tenni"),      # s$: "tennis racket" is no double word for Rohrbach, "racket" still matches
    ("ties", "ty"),           # ([^aeiouy]|qu)ies$ -> y ("^tie" in pattern's -ie list is a literal, never matches)
    ("cookies", "cookie"),    # "cookie" is in pattern 2.6's -ie list: that entry is returned
    ("doggies", "doggie"),    # likewise (on the dog line); pattern 3.6 would return "doggies"
    ("pies", "py"),           # "^pie" is a literal in the -ie list: the ies -> y rule applies
    ("people", "person"),     # irregular table
    ("women", "woman"),       # irregular ending "men" -> "man"
    ("policemen", "policeman"),
    ("children", "child"),
    ("mice", "mouse"),        # ([m|l])ice$
    ("geese", "goose"),       # irregular
    ("knives", "knife"),      # ([nlw]i)ves$ -> \1fe
    ("wolves", "wolf"),       # ([aeo]l)ves$ -> \1f
    ("shelves", "shelve"),    # the irregular table's "helves" -> "helve" is an ending of "shelves": checked first
    ("potatoes", "potato"),   # (o)es$
    ("sheep", "sheep"),       # no rule ends in p
    ("a", "a"),               # uninflected check is x.endswith(word): "tuna" ends with "a"
    ("scissors", "scissors"),  # uninflected
    ("mothers-in-law", "mother-in-law"),  # compound with a preposition: first part singularized
    ("dogs'", "dog's"),       # trailing apostrophe
    ("skis", "ski"),
])
def test_pattern_singularize(word, singular):
    assert C.singularize(word) == singular


# ------------------------------------------------------------------------------------------------ WordNet lemmas


@pytest.mark.parametrize("word, pos, lemma", [
    ("dogs", "n", "dog"),        # rule s -> '' ; "dog" in index.noun
    ("glasses", "n", "glass"),   # candidates glasses, glasse(no), glass: shortest found = glass
    ("women", "n", "woman"),     # noun.exc
    ("mice", "n", "mouse"),      # noun.exc
    ("geese", "n", "goose"),     # noun.exc
    ("knives", "n", "knife"),    # noun.exc
    ("bus", "n", "bus"),         # "bu" is not a WordNet noun: bus stays (unlike pattern's "bu")
    ("buses", "n", "bus"),
    ("skiing", "v", "ski"),      # verb rule ing -> ''
    ("skiing", "n", "skiing"),   # a noun in WordNet: unchanged
    ("tied", "v", "tie"),        # verb rule ed -> e
    ("women", "v", "women"),     # no verb: unchanged (CHAIR then misses it)
    ("drier", "a", "dry"),       # adj.exc
    ("people", "n", "people"),   # a noun itself ("person" is the synonym table's job)
])
def test_wordnet_lemmatize(word, pos, lemma):
    assert C.lemmatize(word, pos) == lemma


def test_lemma_table_covers_every_synonym_word():
    """Every single-word synonym entry and double-word part is a target of the shipped table (built by
    scripts/build_chair_lemmas.py); the demo world's words are there too."""
    targets = set(json.loads(C.LEMMAS.read_text())["targets"])
    assert C.relevant_words() <= targets
    from anchorrt.runtime.eval.world import SHAPES

    assert set(SHAPES) <= targets


# ------------------------------------------------------------------------------------------------ CHAIR words


def nodes(chair, caption):
    return chair.caption_words(caption).nodes


@pytest.mark.parametrize("caption, opera, rohrbach", [
    # plural double words: the merge runs on singular/lemma tokens ("glasses" -> "glass" in both)
    ("two wine glasses, traffic lights and stop signs.", ["wine glass", "traffic light", "stop sign"],
     ["wine glass", "traffic light", "stop sign"]),
    ("potted plants, baseball bats, baseball gloves and parking meters",
     ["potted plant", "baseball bat", "baseball glove", "parking meter"],
     ["potted plant", "baseball bat", "baseball glove", "parking meter"]),
    # a singular "wine glass": Rohrbach singularizes glass -> glas, caught by 'wine glas'
    ("a wine glass", ["wine glass"], ["wine glass"]),
    # irregular plurals: woman/mouse/goose (goose is on the bird line)
    ("three women, two mice and geese", ["person", "mouse", "bird"], ["person", "mouse", "bird"]),
    # toilet seat -> toilet (double word); "seat" alone is dropped when "toilet" is in the caption
    ("a toilet seat", ["toilet"], ["toilet"]),
    ("the seat of the toilet", ["toilet"], ["toilet"]),
    ("a seat", ["chair"], ["chair"]),
    # baby/adult + animal -> the animal only (no person); passenger jet/train -> the vehicle only
    ("a baby elephant and an adult giraffe", ["elephant", "giraffe"], ["elephant", "giraffe"]),
    ("a baby and an adult", ["person", "person"], ["person", "person"]),
    ("a passenger jet", ["airplane"], ["airplane"]),
    # train tracks: OPERA's extra double word 'train track' swallows "train"; Rohrbach counts a train
    ("a train on the train tracks", ["train"], ["train", "train"]),
    # bow tie -> tie
    ("a man in a bow tie", ["person", "tie"], ["person", "tie"]),
    # the table's quirks: " motor bike" (double space -> leading space) can never match, and the merged token
    # "motor bike" is then no object, so "bike" is not counted either; "iPhone" is upper case: never matches
    ("a motor bike and an iphone", [], []),
    # a hyphenated word is one token: "hot-dog" matches nothing, "hot dog" does
    ("a hot-dog and a hot dog", ["hot dog"], ["hot dog"]),
    # Rohrbach: bus -> bu (missed); OPERA: bus stays bus
    ("a red bus", ["bus"], []),
    # ties: OPERA tie, Rohrbach ty (missed)
    ("two ties", ["tie"], []),
    # OPERA: "skiing" after a noun is tagged VBG -> lemma "ski" -> skis; "tied to" -> VBN -> tie.
    # Rohrbach: pattern leaves -ing/-ed words alone.
    ("a man skiing down a hill. a dog tied to a bench.", ["person", "skis", "dog", "tie", "bench"],
     ["person", "dog", "bench"]),
    # "bed" before a preposition: a verb reading would lemmatize it to "be"; its noun lemma is an object word, so
    # it is a noun (as the perceptron tags it: NN)
    ("a bed with a teddy bear", ["bed", "teddy bear"], ["bed", "teddy bear"]),
    # -ing after a determiner is a noun: "a bowling ball" -> ball only; after a noun a verb: "a man bowling" -> bowl
    ("a bowling ball", ["sports ball"], ["sports ball"]),
    ("a man bowling", ["person", "bowl"], ["person"]),
    # irregular verb forms the tagger tags VBN/VBD: "born" -> bear, "sank" -> sink (OPERA); "sunken" is JJ
    ("a calf born in a barn", ["cow", "bear"], ["cow"]),
    ("the boat sank near a sunken ship", ["boat", "sink", "boat"], ["boat", "boat"]),
    # common -ing nouns stay nouns: "outdoor seating" is no chair, "a man seated at a table" is (VBN -> seat)
    ("outdoor seating and a man seated at a table", ["person", "chair", "dining table"],
     ["person", "dining table"]),
    # "-ed" before a preposition is a participle: "sandwiched between" -> sandwich (VBN); before a noun an
    # adjective: "a bottled drink" stays "bottled"
    ("a cat sandwiched between pillows and a bottled drink", ["cat", "sandwich"], ["cat"]),
    # every mention counts
    ("a dog and another dog", ["dog", "dog"], ["dog", "dog"]),
])
def test_caption_words(caption, opera, rohrbach):
    assert nodes(OPERA, caption) == opera
    assert nodes(ROHRBACH, caption) == rohrbach


def test_synonym_table_parsing_quirks():
    # split(', '): a double space leaves a leading space in the entry; OPERA's table also has the entry ''
    assert " motor bike" in OPERA.objects and "motor bike" not in OPERA.objects
    assert "" in OPERA.objects and "" not in ROHRBACH.objects
    assert "iPhone" in OPERA.objects and OPERA.inverse["iPhone"] == "cell phone"
    assert OPERA.inverse["toilet"] == "toilet" and OPERA.inverse["seat"] == "chair"
    assert len(OPERA.categories) == 80


def test_chair_scores_hand_computed():
    captions = {"1": "a dog and a cat on a couch. another dog.",  # dog, cat, couch, dog
                "2": "a man with a frisbee.",                      # person, frisbee
                "3": "a bus."}                                    # bus (OPERA only)
    gt = {"1": {"dog", "couch", "bed"}, "2": {"person", "frisbee"}, "3": {"car"}}
    m = OPERA.score(captions, gt)
    # mentions 4 + 2 + 1 = 7; hallucinated: cat (1), bus (3) -> CHAIR_i 2/7; captions 1 and 3 -> CHAIR_s 2/3
    # recall: unique correct {dog, couch} + {person, frisbee} + {} = 4 over 3 + 2 + 1 = 6 ground-truth objects
    assert (m["mentions"], m["hallucinated_mentions"]) == (7, 2)
    assert m["chair_i"] == pytest.approx(2 / 7) and m["chair_s"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(4 / 6)
    r = ROHRBACH.score(captions, gt)
    # Rohrbach: "bus" -> "bu" is no object: mentions 6, hallucinated 1 (cat); CHAIR_s 1/3; recall 4/6
    assert (r["mentions"], r["hallucinated_mentions"]) == (6, 1)
    assert r["chair_s"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(4 / 6)


def test_old_wrong_chair_behaviours_now_official():
    """The issue's examples: the old matcher missed plural multi-word categories and irregular plurals, counted
    the special cases as extra objects, and matched the leading-space / upper-case / hyphenated entries."""
    for chair in (OPERA, ROHRBACH):
        assert nodes(chair, "wine glasses") == ["wine glass"]
        assert nodes(chair, "women") == ["person"]
        assert nodes(chair, "mice") == ["mouse"]
        assert nodes(chair, "geese") == ["bird"]
        assert nodes(chair, "a toilet seat") == ["toilet"]          # not toilet + chair
        assert nodes(chair, "a baby cat") == ["cat"]                # not person + cat
        assert nodes(chair, "a passenger train") == ["train"]       # not person + train
        assert nodes(chair, "a motor bike") == []                   # not motorcycle
        assert nodes(chair, "an iPhone") == []                      # not cell phone
        assert nodes(chair, "a hot-dog") == []                      # not hot dog


def test_chair_objects_of_ground_truth():
    # categories by name + the nodes the human captions mention
    assert OPERA.objects_of(["Two women near a bus."], ["dog"]) == {"dog", "person", "bus"}
    assert ROHRBACH.objects_of(["Two women near a bus."], ["dog"]) == {"dog", "person"}


def test_unknown_chair_impl_and_uncovered_synonyms():
    with pytest.raises(ValueError, match="unknown CHAIR implementation"):
        C.Chair("coco")
    with pytest.raises(ValueError, match="frankfurter.*--chair-impl rohrbach"):
        C.Chair("opera", "hot dog, frankfurter\n")
    assert C.Chair("rohrbach", "hot dog, frankfurter\n").caption_words("two frankfurters").nodes == ["hot dog"]


# ------------------------------------------------------------------------------------------------ MME


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("no", "no"),
    ("NO", "no"),              # lower-cased first
    ("Not sure", "no"),        # first four characters "not " hold "no"
    ("", "other"),             # nothing -> other (wrong)
    (" yes", "yes"),           # " yes"[:4] = " yes"
    ("  yes", "other"),        # "  ye": neither
    ("nope", "no"),
    ("know", "no"),            # "know" holds "no"
    ("yes, no", "yes"),        # yes is looked for first
    ("The answer is yes", "other"),
    ("Yes\n", "yes"),          # the tool reads lines with their newline
])
def test_mme_parse(answer, parsed):
    assert mme.parse_answer(answer) == parsed


def test_mme_task_score_hand_computed():
    rows = [("Yes", "yes"), ("No", "Not sure"),   # image 1: both right (Not sure -> no)
            ("Yes", ""), ("No", "no"),            # image 2: "" -> other (wrong), one right
            ("Yes", "NO"), ("No", "NO")]          # image 3: NO -> no: one right
    s = mme.task_score(rows, "existence")
    # acc = 4/6, acc+ = 1/3, score = 100*(4/6) + 100*(1/3) = 100
    assert s["acc"] == pytest.approx(4 / 6) and s["acc_plus"] == pytest.approx(1 / 3)
    assert s["score"] == pytest.approx(100.0) and s["other"] == 1
    with pytest.raises(mme.MMEFormatError, match="not pairs"):
        mme.task_score(rows[:3], "existence")
    with pytest.raises(mme.MMEFormatError, match="not yes or no"):
        mme.task_score([("maybe", "yes"), ("No", "no")], "existence")


def test_old_mme_rule_now_official():
    """POPE's rule on MME gave "NO", "Not sure" and "" as yes; the tool: no, no, other. 240 answers, 60 per
    hallucination subset, 30 images each, every ground truth "no": officially "NO" and "Not sure" are right and ""
    is wrong; with POPE's rule all three are wrong."""
    answers = ["NO", "Not sure", ""] * 20
    records = [{"subset": t, "label": "no", "answer": a} for t in mme.HALLUCINATION for a in answers]
    res = mme.score_records(records)
    # per subset: 40 of 60 right -> acc 2/3; images (pairs in order): (NO,Not sure) right, ("",NO) no,
    # (Not sure,"") no -> the pattern repeats every 3 images: 10 of 30 images right -> acc+ 1/3; score 100
    assert res["existence"]["acc"] == pytest.approx(2 / 3) and res["existence"]["acc_plus"] == pytest.approx(1 / 3)
    assert res["totals"]["hallucination"] == pytest.approx(400.0)
    assert all(parse_yes_no(a) == "yes" for a in ("NO", "Not sure", ""))  # the old rule's reading


def test_mme_totals_and_results_round_trip(tmp_path):
    records = []
    for t in mme.SUBSETS:
        for k in range(2):
            records += [{"subset": t, "image": f"{t}_{k}.jpg", "prompt": "Is it? Please answer yes or no.",
                         "label": "yes", "answer": "Yes\tsure" if k else "yes"},
                        {"subset": t, "image": f"{t}_{k}.jpg", "prompt": "Is it not?", "label": "no",
                         "answer": "No,\nnot at all" if k else "yes"}]
    ours = mme.score_records(records)
    folder = tmp_path / "results"
    folder.mkdir()
    for task, text in mme.result_lines(records).items():
        (folder / f"{task}.txt").write_text(text)
    back = mme.read_results_dir(folder)
    assert set(back) == set(mme.SUBSETS)
    tool = {t: mme.task_score(rows, t) for t, rows in back.items()}
    for t in mme.SUBSETS:
        assert tool[t] == ours[t]
        # image 0: yes right, "yes" for no wrong; image 1: both right -> acc 3/4, acc+ 1/2, score 125
        assert tool[t]["score"] == pytest.approx(125.0)
    assert ours["totals"]["perception"] == pytest.approx(1250.0) and ours["totals"]["cognition"] == pytest.approx(500)
    assert ours["totals"]["hallucination"] == pytest.approx(500.0)
    (folder / "color.txt").write_text("a.jpg\tq\tYes\n")
    with pytest.raises(mme.MMEFormatError, match="exactly 4"):
        mme.read_results_dir(folder)


# ------------------------------------------------------------------------------------------------ POPE


def test_pope_all_no_answers():
    # evaluate.py: TP = FP = 0 -> precision = 0/0 (ZeroDivisionError there); we report 0 and F1 0
    m = pope_metrics(["no"] * 4, ["yes", "no", "no", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 2, 2)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == pytest.approx(0.5) and m["yes_ratio"] == 0.0


def _pope_files(tmp_path, array: bool):
    rows = [{"question_id": i, "image": f"{i}.jpg", "text": f"Is there a {o} in the image?", "label": lab}
            for i, (o, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("bus", "no")], start=1)]
    q = tmp_path / ("q.json" if array else "q.jsonl")
    q.write_text(json.dumps(rows) if array else "".join(json.dumps(r) + "\n" for r in rows))
    return q


@pytest.mark.parametrize("array", [False, True])
def test_pope_formats_round_trip(tmp_path, array):
    q = _pope_files(tmp_path, array)
    items = load_pope(q, tmp_path)
    texts = ["Yes, there is a dog.", "No", "There is not a car.", "yes"]
    records = [{"id": it.id, "prompt": it.prompt, "answer": t, "label": it.label} for it, t in zip(items, texts)]
    a = tmp_path / "answers.jsonl"
    a.write_text(pope_answer_lines(records))
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert rows[0] == {"question_id": 1, "prompt": items[0].prompt, "text": texts[0], "answer": texts[0]}
    back = pair_pope(read_pope_answers(a), items, "answers")
    preds = [parse_yes_no(r["answer"]) for r in back]
    assert preds == ["yes", "no", "no", "yes"]
    m = pope_metrics(preds, [r["label"] for r in back])
    # TP 1 (dog), FN 1 (car), TN 1 (cat), FP 1 (bus)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (1, 1, 1, 1)
    with pytest.raises(EvalDataError, match="3 answers for 4 questions"):
        pair_pope(read_pope_answers(a)[:3], items, "answers")
    a.write_text("".join(json.dumps({"question_id": 5 - i, "answer": "yes"}) + "\n" for i in range(4)))
    with pytest.raises(EvalDataError, match="question file's order"):
        pair_pope(read_pope_answers(a), items, "answers")


def test_chair_caption_formats(tmp_path):
    records = [{"id": "42", "answer": "a dog."}, {"id": "7", "answer": "a cat."}]
    p = tmp_path / "caps.json"
    p.write_text(chair_caption_doc(records))
    assert json.loads(p.read_text()) == [{"image_id": 42, "caption": "a dog."}, {"image_id": 7, "caption": "a cat."}]
    assert read_chair_captions(p) == [("42", "a dog."), ("7", "a cat.")]
    jl = tmp_path / "caps.jsonl"
    jl.write_text('{"question_id": 1, "text": "x"}\n{"question_id": 2, "text": "y"}\n')
    assert read_chair_captions(jl, "question_id", "text") == [("1", "x"), ("2", "y")]
    lisa = tmp_path / "lisa.json"
    lisa.write_text(json.dumps({"overall": {}, "imgToEval": {"5": {"image_id": 5, "caption": "a bus"}}}))
    assert read_chair_captions(lisa) == [("5", "a bus")]
    with pytest.raises(EvalDataError, match="--image-id-key"):
        read_chair_captions(jl)


# ------------------------------------------------------------------------------------------------ eval score CLI


def _coco(tmp_path):
    inst = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 6}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 6, "name": "bus"}]}
    caps = {"annotations": [{"image_id": 1, "caption": "A dog on a couch."}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    return tmp_path / "inst.json", tmp_path / "caps.json"


def test_eval_score_commands(tmp_path):
    from anchorrt.cli import main

    runner = CliRunner()
    inst, caps = _coco(tmp_path)
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps([{"image_id": 1, "caption": "A dog and a cat on a couch."},
                               {"image_id": 2, "caption": "A bus next to a car."}]))
    out = tmp_path / "chair.json"
    r = runner.invoke(main, ["eval", "score", "chair", str(gen), "--instances", str(inst), "--captions", str(caps),
                             "--json", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["results"]
    # gt 1 = {dog, couch} (couch from the human caption), gt 2 = {bus}; mentions dog cat couch | bus car:
    # hallucinated cat, car -> CHAIR_i 2/5, CHAIR_s 2/2, recall (2 + 1) / (2 + 1) = 1
    assert m["chair_i"] == pytest.approx(2 / 5) and m["chair_s"] == 1.0 and m["recall"] == 1.0
    r = runner.invoke(main, ["eval", "score", "chair", str(gen), "--instances", str(inst), "--captions", str(caps),
                             "--chair-impl", "rohrbach", "--json", str(out)])
    m = json.loads(out.read_text())["results"]
    # Rohrbach: "bus" -> "bu": image 2 mentions only car (wrong); gt 2 = {bus} (annotation); recall 2/3
    assert r.exit_code == 0 and m["chair_i"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert "rohrbach" in runner.invoke(main, ["eval", "score", "chair", "--help"]).output
    # the annotations split over two files (as train2014 + val2014), and an image id in neither: the official
    # defaultdict gives it no ground truth, so its one mention (dog) is hallucinated
    full = json.loads(inst.read_text())
    part = dict(full, annotations=full["annotations"][:1], images=full["images"][:1])
    rest = dict(full, annotations=full["annotations"][1:], images=full["images"][1:])
    (tmp_path / "i1.json").write_text(json.dumps(part))
    (tmp_path / "i2.json").write_text(json.dumps(rest))
    gen.write_text(json.dumps([{"image_id": 1, "caption": "A dog and a cat on a couch."},
                               {"image_id": 2, "caption": "A bus next to a car."},
                               {"image_id": 99, "caption": "A dog."}]))
    r = runner.invoke(main, ["eval", "score", "chair", str(gen), "--instances", str(tmp_path / "i1.json"),
                             "--instances", str(tmp_path / "i2.json"), "--captions", str(caps), "--json", str(out)])
    assert r.exit_code == 0 and "warning: 1 image id(s)" in r.output
    m = json.loads(out.read_text())["results"]
    assert m["chair_i"] == pytest.approx(3 / 6) and m["chair_s"] == 1.0 and m["recall"] == 1.0

    q = _pope_files(tmp_path, False)
    ans = tmp_path / "pope.jsonl"
    ans.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                           for i, t in enumerate(["No.", "No", "no", "no"], start=1)))
    r = runner.invoke(main, ["eval", "score", "pope", str(ans), "-q", str(q), "--json", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["results"]["q"]
    assert m["yes_ratio"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == pytest.approx(0.5)

    res = tmp_path / "mme"
    res.mkdir()
    (res / "existence.txt").write_text("a.jpg\tIs there a dog?\tYes\tYes\na.jpg\tIs there a cat?\tNo\tNot sure\n")
    (res / "count.txt").write_text("b.jpg\tTwo dogs?\tYes\t\nb.jpg\tThree dogs?\tNo\tNO\n")
    r = runner.invoke(main, ["eval", "score", "mme", str(res), "--json", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["results"]
    # existence: both right -> 200; count: "" other (wrong), NO right -> acc 1/2, acc+ 0 -> 50
    assert m["existence"]["score"] == pytest.approx(200.0) and m["count"]["score"] == pytest.approx(50.0)
    r = runner.invoke(main, ["eval", "score", "mme", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "error: MME results folder" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------ comparison script

_FAKE_OFFICIAL = '''
import json
from anchorrt.runtime.eval.chair import Chair
class CHAIR:
    """Stands in for an official chair.py (its interface only): scores with our code, minus DROP mentions."""
    DROP = {drop}
    def __init__(self, coco_path):
        self.chair = Chair("opera")
        self.gt = {{}}
        for split in ("val", "train"):
            inst = json.load(open(f"{{coco_path}}/instances_{{split}}2014.json"))
            names = {{c["id"]: c["name"] for c in inst["categories"]}}
            for a in inst["annotations"]:
                self.gt.setdefault(a["image_id"], set()).add(self.chair.inverse[names[a["category_id"]]])
    def compute_chair(self, cap_file, image_id_key, caption_key):
        caps = json.load(open(cap_file))
        sentences, bad, words, wrong = [], 0, 0, 0
        for c in caps:
            nodes = self.chair.caption_words(c[caption_key]).nodes[self.DROP:]
            miss = [n for n in nodes if n not in self.gt.get(c[image_id_key], set())]
            sentences.append({{"caption": c[caption_key], "mscoco_generated_words": nodes}})
            bad += bool(miss); words += len(nodes); wrong += len(miss)
        return {{"sentences": sentences, "overall_metrics": {{"CHAIRs": bad / len(caps), "CHAIRi": wrong / words}}}}
'''


@pytest.mark.parametrize("drop, code", [(0, 0), (1, 1)])
def test_compare_official_chair_script(tmp_path, drop, code, capsys):
    """scripts/compare_official_chair.py loads an official chair.py by path and reports every difference (here a
    stand-in with the official interface: identical -> exit 0; one mention dropped per caption -> exit 1)."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("compare_official_chair", ROOT / "scripts" / "compare_official_chair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inst, caps = _coco(tmp_path)
    coco = tmp_path / "coco"
    coco.mkdir()
    empty = {"images": [], "annotations": [], "categories": json.loads(inst.read_text())["categories"]}
    (coco / "instances_val2014.json").write_text(inst.read_text())
    (coco / "instances_train2014.json").write_text(json.dumps(empty))
    (coco / "captions_val2014.json").write_text(json.dumps({"annotations": []}))
    (coco / "captions_train2014.json").write_text(json.dumps({"annotations": []}))
    (tmp_path / "official.py").write_text(_FAKE_OFFICIAL.format(drop=drop))
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps([{"image_id": 1, "caption": "A dog and a cat."}, {"image_id": 2, "caption": "A bus."}]))
    assert mod.main(["--official", str(tmp_path / "official.py"), "--coco-path", str(coco), "--cap-file",
                     str(gen)]) == code
    out = capsys.readouterr().out
    assert ("DIFFERENT" in out) == bool(drop) and f"differ: {2 if drop else 0} of 2" in out
